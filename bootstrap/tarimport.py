"""Tar import/export of images, and the safe extraction that OCI layers share.

Why by hand: ``tarfile``'s extraction filters do not fit a rootfs (``data``
refuses absolute symlinks, which every distribution has, and drops setuid
bits; ``fully_trusted`` checks nothing), and GNU tar neither resolves paths
the way the container will see them nor knows OCI whiteouts. So each entry is
checked and created here, with ``tarfile`` only reading the archive:

* entry names must stay inside: absolute names and ``..`` are refused;
* every file system call is made relative to a directory fd reached from the
  image root one component at a time (:mod:`bootstrap.inroot`): a parent
  symlink such as ``bin -> usr/bin`` or ``/lib -> /usr/lib`` is followed
  *inside* the image, never on the host; the entry itself is never followed
  (``O_NOFOLLOW``, ``*at`` calls with ``follow_symlinks=False``), and
  directory metadata applied at the end goes to the very directory that was
  made, not to whatever a later entry put at its path;
* symlinks whose target climbs above the image root (seen from where the link
  really is) are refused ("links pointing out"); absolute targets are fine,
  they mean the image's own root; a hard link to a symlink is checked again
  at its new place;
* hard links must name an entry inside the image;
* character and block devices are refused unless ``allow_devices``;
* ownership is kept numerically, modes with setuid/setgid bits, mtimes and
  extended attributes (``SCHILY.xattr.*``, e.g. file capabilities) except
  overlayfs' own (``trusted.overlay.*``, ``user.overlay.*``: the image is an
  overlay's lower layer, and they would steer it);
* sparse members are written sparsely, and every entry is charged against
  the free space first (:mod:`bootstrap.space`).

Any refusal is an :class:`UnsafeEntry` (exit 2) naming the entry; a file system
error while writing becomes one line too (exit 1, or 2 when the archive's
shape caused it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bootstrap.inroot import DIR_NOFOLLOW, Located, Root, UnsafeEntry, remove_at, split
from bootstrap.progress import Progress
from bootstrap.space import NoSpace, SpaceBudget
from machined.errors import InvalidInput, PymachineError
from machined.images import ImageStore

__all__ = [
    "UnsafeEntry",
    "extract",
    "import_tar",
    "export_tar",
    "member_path",
    "open_archive",
    "resolve_in_root",
    "symlink_escapes",
    "write_tar",
]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
REFUSED_XATTRS = ("trusted.overlay.", "user.overlay.")
CHUNK = 1 << 20
# Errors of the host, not of the archive: exit 1 rather than 2.
HOST_ERRNOS = {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOMEM, errno.EMFILE}


# --- pure path logic -----------------------------------------------------------


def member_path(name: str) -> str:
    """The entry's path relative to the image root ("" = the root itself).

    Raises :class:`UnsafeEntry` for absolute names and any ``..`` component.
    """
    if name.startswith("/"):
        raise UnsafeEntry(f"refusing absolute path in archive: {name!r}")
    parts = split(name)
    if ".." in parts:
        raise UnsafeEntry(f"refusing path with '..' in archive: {name!r}")
    return "/".join(parts)


def symlink_escapes(link: str, target: str) -> bool:
    """True if symlink ``link`` (relative to the root) -> ``target`` points above the root.

    Resolved lexically as the container would see it: an absolute target
    starts at the image root, a relative one at the link's directory.
    """
    if not target or "\0" in target:
        return True
    stack = [] if target.startswith("/") else split(link)[:-1]
    for part in split(target):
        if part == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(part)
    return False


def resolve_in_root(root: Path, rel: str, *, create: bool = False) -> Path:
    """Where ``rel`` really is below ``root`` (parents resolved inside, the last kept).

    For showing and tests: extraction itself works on the fds of
    :meth:`bootstrap.inroot.Root.locate`, never on the path returned here.
    """
    if not split(rel):
        return root
    with Root(root) as r, r.locate(rel, create=create) as at:
        return root.joinpath(*at.parent, at.name)


def _entry_error(name: str, exc: OSError) -> PymachineError:
    """One line for a file system error while extracting ``name``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left while extracting {name!r}: {exc.strerror}")
    if exc.errno in HOST_ERRNOS:
        return PymachineError(f"cannot extract {name!r}: {exc.strerror or exc}")
    return UnsafeEntry(f"refusing {name!r}: {exc.strerror or exc}")


# --- extraction ------------------------------------------------------------------


@dataclass
class ExtractStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0


@dataclass
class _Dir:
    """A directory this archive made, for its metadata at the end."""

    rel: tuple[str, ...]
    ino: tuple[int, int]
    member: tarfile.TarInfo


@dataclass
class _Extractor:
    root: Root
    budget: SpaceBudget
    allow_devices: bool = False
    whiteouts: bool = False
    progress: Progress | None = None
    stats: ExtractStats = field(default_factory=ExtractStats)
    _dirs: list[_Dir] = field(default_factory=list)
    _touched: set[str] = field(default_factory=set)  # real paths this archive wrote
    _kept: set[str] = field(default_factory=set)  # … and their parents
    _same_owner: bool = field(default_factory=lambda: os.geteuid() == 0)

    def extract(self, archive: tarfile.TarFile) -> ExtractStats:
        for member in archive:
            try:
                self._member(archive, member)
            except OSError as exc:
                raise _entry_error(member.name, exc) from exc
            except (OverflowError, ValueError) as exc:  # an owner, time or device number
                raise UnsafeEntry(f"refusing {member.name!r}: value out of range ({exc})") from exc
        # Directories last, deepest first: their mtimes and read-only modes
        # must not be disturbed by the entries created inside them.
        for d in sorted(self._dirs, key=lambda d: len(d.rel), reverse=True):
            try:
                self._dir_metadata(d)
            except OSError as exc:
                raise _entry_error(d.member.name, exc) from exc
            except (OverflowError, ValueError) as exc:
                raise UnsafeEntry(
                    f"refusing {d.member.name!r}: value out of range ({exc})"
                ) from exc
        return self.stats

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = member_path(member.name)
        base = rel.rsplit("/", 1)[-1]
        if self.whiteouts and base.startswith(WHITEOUT_PREFIX):
            self._whiteout(rel, base)
            return
        if (member.ischr() or member.isblk()) and not self.allow_devices:
            raise UnsafeEntry(
                f"refusing device node {member.name!r} (use --allow-devices to create it)"
            )
        if member.islnk() and not member_path(member.linkname):
            raise UnsafeEntry(f"refusing hard link to the image root: {member.name!r}")

        if not rel:  # the root directory itself
            if member.isdir():
                st = os.fstat(self.root.fd)
                self._dirs.append(_Dir((), (st.st_dev, st.st_ino), member))
                return
            raise UnsafeEntry(f"refusing non-directory entry for the image root: {member.name!r}")

        self.budget.charge(self.budget.block if member.isdir() else 0, inodes=1)
        with self.root.locate(rel, create=True) as at:
            self._touch(at.rel)
            self.stats.entries += 1
            if member.issym() and symlink_escapes(at.rel, member.linkname):
                raise UnsafeEntry(
                    f"refusing symlink pointing outside the image: "
                    f"{member.name!r} -> {member.linkname!r}"
                )
            if member.isdir():
                self._directory(at, member)
            elif member.islnk():
                self._hardlink(at, member)
            elif member.isreg():
                self._file(archive, at, member)
            else:
                self._special(at, member)

    def _touch(self, rel: str) -> None:
        self._touched.add(rel)
        parts = rel.split("/")
        for n in range(1, len(parts)):
            self._kept.add("/".join(parts[:n]))

    def _directory(self, at: Located, member: tarfile.TarInfo) -> None:
        st = at.lstat()
        if st is None or not stat.S_ISDIR(st.st_mode):
            remove_at(at.dir_fd, at.name)
            os.mkdir(at.name, 0o700, dir_fd=at.dir_fd)
            st = at.lstat()
            assert st is not None
        self._dirs.append(_Dir((*at.parent, at.name), (st.st_dev, st.st_ino), member))
        self._advance(0)

    def _hardlink(self, at: Located, member: tarfile.TarInfo) -> None:
        def refuse(why: str) -> UnsafeEntry:
            return UnsafeEntry(f"refusing hard link {member.name!r} -> {member.linkname!r}: {why}")

        with contextlib.ExitStack() as stack:
            try:
                target = stack.enter_context(self.root.locate(member_path(member.linkname)))
            except (FileNotFoundError, NotADirectoryError, UnsafeEntry) as exc:
                raise refuse("its target is missing") from exc
            st = target.lstat()
            if st is None or stat.S_ISDIR(st.st_mode):
                raise refuse("its target is missing or a directory")
            if stat.S_ISLNK(st.st_mode):
                pointing = os.readlink(target.name, dir_fd=target.dir_fd)
                if symlink_escapes(at.rel, pointing):
                    raise refuse(f"the symlink ({pointing!r}) would point outside from there")
            mine = at.lstat()
            if mine is not None and (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                return  # already that very file
            if target.rel.startswith(at.rel + "/"):
                raise refuse("its target is inside what it would replace")
            remove_at(at.dir_fd, at.name)
            os.link(
                target.name,
                at.name,
                src_dir_fd=target.dir_fd,
                dst_dir_fd=at.dir_fd,
                follow_symlinks=False,
            )
        self._advance(0)  # metadata is the target's

    def _file(self, archive: tarfile.TarFile, at: Located, member: tarfile.TarInfo) -> None:
        sparse = member.sparse
        self.budget.charge(member.size if sparse is None else sum(n for _, n in sparse))
        remove_at(at.dir_fd, at.name)
        source = archive.extractfile(member)
        assert source is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(at.name, flags, 0o600, dir_fd=at.dir_fd)
        try:
            with source:
                written = self._copy(source, fd, member)
            self._metadata(fd, member)
        finally:
            os.close(fd)
        self._advance(written)

    def _copy(self, source: IO[bytes], fd: int, member: tarfile.TarInfo) -> int:
        """Write the member's data; a sparse member's holes stay holes. Returns bytes written."""
        if member.sparse is None:
            segments = [(0, member.size)]
            raw: IO[bytes] = source
        else:
            segments = [(o, n) for o, n in member.sparse if n > 0]
            raw = getattr(source, "raw", source)  # the unbuffered reader seeks over holes
        written = end = 0
        for offset, size in segments:
            if offset < end or offset + size > member.size:
                raise UnsafeEntry(f"refusing {member.name!r}: broken sparse map")
            if member.sparse is not None:
                raw.seek(offset)
            position = offset
            while position < offset + size:
                chunk = raw.read(min(CHUNK, offset + size - position))
                if not chunk:
                    raise InvalidInput(f"broken tar archive: {member.name!r} is cut short")
                os.pwrite(fd, chunk, position)
                position += len(chunk)
            written += size
            end = offset + size
        os.ftruncate(fd, member.size)
        return written

    def _special(self, at: Located, member: tarfile.TarInfo) -> None:
        if member.issym():
            remove_at(at.dir_fd, at.name)
            os.symlink(member.linkname, at.name, dir_fd=at.dir_fd)
        elif member.ischr() or member.isblk():
            remove_at(at.dir_fd, at.name)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(at.name, kind | 0o600, device, dir_fd=at.dir_fd)
        elif member.isfifo():
            remove_at(at.dir_fd, at.name)
            os.mkfifo(at.name, 0o600, dir_fd=at.dir_fd)
        else:
            self._message(f"skipping {member.name!r}: unsupported entry type {member.type!r}")
            return
        self._metadata_at(at, member)
        self._advance(0)

    def _whiteout(self, rel: str, base: str) -> None:
        victim = base[len(WHITEOUT_PREFIX) :]
        if base != OPAQUE_MARKER and victim in ("", ".", ".."):
            raise UnsafeEntry(f"refusing whiteout {rel!r}")
        try:
            with self.root.locate(rel) as at:
                self.stats.whiteouts += 1
                if base == OPAQUE_MARKER:
                    self._make_opaque(at.dir_fd, "/".join(at.parent))
                else:
                    remove_at(at.dir_fd, victim)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to hide
        except UnsafeEntry:
            return  # a parent is a file or a symlink loop: nothing below either

    def _make_opaque(self, dir_fd: int, rel: str) -> None:
        """Hide every entry below ``rel`` (open as ``dir_fd``) that this layer did not create."""
        fd = os.open(".", DIR_NOFOLLOW, dir_fd=dir_fd)
        try:
            for entry in list(os.scandir(fd)):
                child = f"{rel}/{entry.name}" if rel else entry.name
                if child not in self._touched and child not in self._kept:
                    remove_at(fd, entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    sub = os.open(entry.name, DIR_NOFOLLOW, dir_fd=fd)
                    try:
                        self._make_opaque(sub, child)
                    finally:
                        os.close(sub)
        finally:
            os.close(fd)

    def _dir_metadata(self, d: _Dir) -> None:
        """Apply a directory's metadata, if that very directory is still where it was made."""
        try:
            with self.root.open_dir("/".join(d.rel)) as fd:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == d.ino:
                    self._metadata(fd, d.member)
        except (FileNotFoundError, NotADirectoryError, UnsafeEntry):
            return  # replaced by a later entry (a file, a symlink): not ours any more
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise

    def _xattrs(self, member: tarfile.TarInfo) -> Iterable[tuple[str, bytes]]:
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PREFIX):
                name = key[len(XATTR_PREFIX) :]
                if name.startswith(REFUSED_XATTRS):
                    continue
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                yield name, raw

    def _metadata(self, fd: int, member: tarfile.TarInfo) -> None:
        """Owner, xattrs, mode and mtime onto the open file or directory ``fd``."""
        if self._same_owner:
            with contextlib.suppress(OSError):
                os.chown(fd, member.uid, member.gid)
        for name, raw in self._xattrs(member):
            with contextlib.suppress(OSError):
                os.setxattr(fd, name, raw)
        os.chmod(fd, member.mode & 0o7777)
        with contextlib.suppress(OSError):
            os.utime(fd, (member.mtime, member.mtime))

    def _metadata_at(self, at: Located, member: tarfile.TarInfo) -> None:
        """The same for a symlink, fifo or device node just made at ``at`` (never followed)."""
        if self._same_owner:
            with contextlib.suppress(OSError):
                os.chown(at.name, member.uid, member.gid, dir_fd=at.dir_fd, follow_symlinks=False)
        # setxattr has no dir_fd: name the entry through its parent's fd, last part not followed.
        path = f"/proc/self/fd/{at.dir_fd}/{at.name}"
        for name, raw in self._xattrs(member):
            with contextlib.suppress(OSError):
                os.setxattr(path, name, raw, follow_symlinks=False)
        if not member.issym():
            try:
                os.chmod(at.name, member.mode & 0o7777, dir_fd=at.dir_fd, follow_symlinks=False)
            except NotImplementedError as exc:  # glibc does this through /proc/self/fd
                raise PymachineError(
                    f"cannot set the mode of {member.name!r} without following links: "
                    "is /proc mounted?"
                ) from exc
        with contextlib.suppress(OSError):
            os.utime(at.name, (member.mtime, member.mtime), dir_fd=at.dir_fd, follow_symlinks=False)

    def _advance(self, nbytes: int) -> None:
        self.stats.bytes += nbytes
        if self.progress is not None:
            self.progress.advance(1, nbytes)

    def _message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.message(text)
        else:
            print(text, file=sys.stderr)


def open_archive(stream: IO[bytes]) -> tarfile.TarFile:
    """A streaming reader for plain, gzip, bzip2 or xz tar (zstd is refused clearly)."""
    peek = stream.peek(4)[:4] if hasattr(stream, "peek") else b""
    if peek == b"\x28\xb5\x2f\xfd":
        raise InvalidInput("zstd-compressed archives are not supported: decompress with zstd -d")
    try:
        return tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape")
    except tarfile.ReadError as exc:
        raise InvalidInput(f"not a tar archive: {exc}") from exc


def extract(
    stream: IO[bytes],
    root: Path,
    *,
    allow_devices: bool = False,
    whiteouts: bool = False,
    progress: Progress | None = None,
    budget: SpaceBudget | None = None,
) -> ExtractStats:
    """Safely unpack a tar stream into ``root`` (see the module docstring).

    ``budget``: the space this may use (shared by the layers of one image);
    by default what is free on ``root``'s file system.
    """
    with Root(root) as opened:
        extractor = _Extractor(
            root=opened,
            budget=budget or SpaceBudget.for_path(root),
            allow_devices=allow_devices,
            whiteouts=whiteouts,
            progress=progress,
        )
        try:
            with open_archive(stream) as archive:
                return extractor.extract(archive)
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise InvalidInput(f"broken tar archive: {exc}") from exc


# --- verbs -----------------------------------------------------------------------


def import_tar(
    source: str | os.PathLike[str],
    name: str,
    *,
    allow_devices: bool = False,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Path:
    """Make image ``name`` from a tar archive (``"-"``: stdin). Nothing is left on failure."""
    store = store or ImageStore()
    progress = progress or Progress()
    started = time.monotonic()
    label = "stdin" if os.fspath(source) == "-" else os.path.abspath(source)
    with store.staging(name) as staging:
        progress.step(f"importing {label}")
        if os.fspath(source) == "-":
            stats = extract(
                sys.stdin.buffer, staging, allow_devices=allow_devices, progress=progress
            )
        else:
            if not os.path.isfile(source):
                raise PymachineError(f"{source}: no such file")
            with open(source, "rb") as f:
                stats = extract(f, staging, allow_devices=allow_devices, progress=progress)
        path = store.commit(name, staging, meta={"source": f"tar {label}"})
    progress.finish(
        f"image '{name}' imported: {stats.entries} entries in {time.monotonic() - started:.1f}s"
    )
    return path


def _tar_mode(dest: str) -> str:
    for suffixes, mode in (
        ((".tar.gz", ".tgz", ".gz"), "w|gz"),
        ((".tar.bz2", ".tbz2", ".bz2"), "w|bz2"),
        ((".tar.xz", ".txz", ".xz"), "w|xz"),
    ):
        if dest.endswith(suffixes):
            return mode
    if dest.endswith((".zst", ".tzst")):
        raise InvalidInput("zstd compression is not supported: pipe 'export-tar IMAGE -' to zstd")
    return "w|"


def walk(root: Path) -> Iterable[str]:
    """Paths below ``root`` (relative), sorted, parents first; one file system only."""
    root_dev = os.lstat(root).st_dev
    stack = [""]
    while stack:
        rel = stack.pop()
        directory = root / rel if rel else root
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            yield child
            if (
                entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_dev == root_dev
            ):
                stack.append(child)


def write_tar(
    root: Path, out: IO[bytes], mode: str = "w|", progress: Progress | None = None
) -> int:
    """Write the tree at ``root`` as a PAX tar (numeric owners, xattrs). Returns entries."""
    count = 0
    with tarfile.open(
        fileobj=out,
        mode=mode,
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as archive:
        for rel in [".", *walk(root)]:
            path = root if rel == "." else root / rel
            info = archive.gettarinfo(str(path), arcname=rel)
            if info is None:  # sockets
                continue
            info.uname = info.gname = ""
            with contextlib.suppress(OSError):
                for xattr in os.listxattr(path, follow_symlinks=False):
                    value = os.getxattr(path, xattr, follow_symlinks=False)
                    info.pax_headers[XATTR_PREFIX + xattr] = value.decode(
                        "utf-8", "surrogateescape"
                    )
            if info.isreg():  # lstat said so; O_NOFOLLOW keeps it so
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(path, flags), "rb") as f:
                    archive.addfile(info, f)
            else:
                archive.addfile(info)
            count += 1
            if progress is not None:
                progress.advance(1, info.size if info.isreg() else 0)
    return count


def export_tar(
    name: str,
    dest: str | os.PathLike[str],
    *,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> int:
    """Write image ``name`` to ``dest`` (``"-"``: stdout); compression from the suffix."""
    store = store or ImageStore()
    root = store.path(name)
    progress = progress or Progress()
    dest = os.fspath(dest)
    started = time.monotonic()
    progress.step(f"exporting {name}")
    if dest == "-":
        count = write_tar(root, sys.stdout.buffer, "w|", progress)
        sys.stdout.buffer.flush()
    else:
        mode = _tar_mode(dest)
        tmp = f"{dest}.partial"
        try:
            with open(tmp, "wb") as f:
                count = write_tar(root, f, mode, progress)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    progress.finish(
        f"image '{name}' exported: {count} entries in {time.monotonic() - started:.1f}s"
    )
    return count
