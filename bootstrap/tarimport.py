"""Tar import/export of images, and the safe extraction that OCI layers share.

Why by hand: ``tarfile``'s extraction filters do not fit a rootfs (``data``
refuses absolute symlinks, which every distribution has, and drops setuid
bits; ``fully_trusted`` checks nothing), and GNU tar neither resolves paths
the way the container will see them nor knows OCI whiteouts. So each entry is
checked and created here, with ``tarfile`` only reading the archive:

* entry names must stay inside: absolute names and ``..`` are refused;
* parent directories are resolved like a ``chroot`` would (an image symlink
  such as ``bin -> usr/bin`` or ``/lib -> /usr/lib`` is followed *inside* the
  image, never on the host), so no entry can be written through a link to
  outside;
* symlinks whose target climbs above the image root are refused ("links
  pointing out"); absolute targets are fine, they mean the image's own root;
* hard links must name an entry inside the image;
* character and block devices are refused unless ``allow_devices``;
* ownership is kept numerically, modes with setuid/setgid bits, mtimes and
  extended attributes (``SCHILY.xattr.*``, e.g. file capabilities).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bootstrap.progress import Progress
from machined.errors import InvalidInput, PymachineError
from machined.images import ImageStore

MAX_SYMLINKS = 40
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
CHUNK = 1 << 20


class UnsafeEntry(InvalidInput):
    """An archive entry that would land outside the image, or a refused device node."""


# --- pure path logic -----------------------------------------------------------


def member_path(name: str) -> str:
    """The entry's path relative to the image root ("" = the root itself).

    Raises :class:`UnsafeEntry` for absolute names and any ``..`` component.
    """
    if name.startswith("/"):
        raise UnsafeEntry(f"refusing absolute path in archive: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeEntry(f"refusing path with '..' in archive: {name!r}")
    return "/".join(parts)


def symlink_escapes(link: str, target: str) -> bool:
    """True if symlink ``link`` (relative to the root) -> ``target`` points above the root.

    Resolved lexically as the container would see it: an absolute target
    starts at the image root, a relative one at the link's directory.
    """
    if not target:
        return True
    stack = [] if target.startswith("/") else [p for p in link.split("/")[:-1] if p]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(part)
    return False


def resolve_in_root(root: Path, rel: str, *, create: bool = False) -> Path:
    """The real location of ``rel`` (parents resolved inside ``root``).

    Every directory component is followed like a chroot would: symlinks are
    read and re-resolved from ``root`` (absolute) or from where they are
    (relative), ``..`` stops at ``root``. The last component is returned as
    is, never followed. With ``create`` missing parents are made (0755).
    """
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        return root
    *dirs, last = parts
    current: list[str] = []
    pending = list(dirs)
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = root.joinpath(*current, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(candidate, 0o755)
            current.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise UnsafeEntry(f"too many levels of symbolic links resolving {rel!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry(
                f"cannot create {rel!r}: {'/'.join([*current, part])} is not a directory"
            )
        current.append(part)
    return root.joinpath(*current, last)


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# --- extraction ------------------------------------------------------------------


@dataclass
class ExtractStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0


@dataclass
class _Extractor:
    root: Path
    allow_devices: bool = False
    whiteouts: bool = False
    progress: Progress | None = None
    stats: ExtractStats = field(default_factory=ExtractStats)
    _dirs: list[tuple[Path, tarfile.TarInfo]] = field(default_factory=list)
    _touched: set[str] = field(default_factory=set)
    _opaque: list[str] = field(default_factory=list)
    _same_owner: bool = field(default_factory=lambda: os.geteuid() == 0)

    def extract(self, archive: tarfile.TarFile) -> ExtractStats:
        for member in archive:
            self._member(archive, member)
        # Directories last, deepest first: their mtimes and read-only modes
        # must not be disturbed by the entries created inside them.
        for path, member in sorted(self._dirs, key=lambda d: len(d[0].parts), reverse=True):
            self._metadata(path, member)
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
        if member.issym() and symlink_escapes(rel, member.linkname):
            raise UnsafeEntry(
                f"refusing symlink pointing outside the image: {member.name!r} -> {member.linkname!r}"
            )
        if member.islnk():
            link_rel = member_path(member.linkname)
            if not link_rel:
                raise UnsafeEntry(f"refusing hard link to the image root: {member.name!r}")

        if not rel:  # the root directory itself
            if member.isdir():
                self._dirs.append((self.root, member))
                return
            raise UnsafeEntry(f"refusing non-directory entry for the image root: {member.name!r}")

        dest = resolve_in_root(self.root, rel, create=True)
        self._touched.add(os.path.relpath(dest, self.root))
        self.stats.entries += 1

        if member.isdir():
            try:
                st = os.lstat(dest)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(dest)
                    os.mkdir(dest, 0o700)
            except FileNotFoundError:
                os.mkdir(dest, 0o700)
            self._dirs.append((dest, member))
            self._advance(member, 0)
            return

        _remove(dest)
        if member.isreg():
            source = archive.extractfile(member)
            assert source is not None
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, source:
                shutil.copyfileobj(source, out, CHUNK)
        elif member.issym():
            os.symlink(member.linkname, dest)
        elif member.islnk():
            target = resolve_in_root(self.root, member_path(member.linkname))
            if not os.path.lexists(target) or os.path.isdir(target) and not os.path.islink(target):
                raise UnsafeEntry(
                    f"hard link {member.name!r} -> {member.linkname!r}: target missing or a directory"
                )
            os.link(target, dest, follow_symlinks=False)
            self._advance(member, 0)
            return  # metadata is the target's
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(dest, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(dest, 0o600)
        else:
            self._message(f"skipping {member.name!r}: unsupported entry type {member.type!r}")
            return
        self._metadata(dest, member)
        self._advance(member, member.size if member.isreg() else 0)

    def _whiteout(self, rel: str, base: str) -> None:
        parent_rel = rel.rsplit("/", 1)[0] if "/" in rel else ""
        try:
            parent = (
                resolve_in_root(self.root, parent_rel + "/x").parent if parent_rel else self.root
            )
        except (FileNotFoundError, UnsafeEntry):
            return  # nothing below to hide
        self.stats.whiteouts += 1
        if base == OPAQUE_MARKER:
            self._make_opaque(parent)
            return
        victim = parent / base[len(WHITEOUT_PREFIX) :]
        if victim.name in ("", ".", ".."):
            raise UnsafeEntry(f"refusing whiteout {rel!r}")
        _remove(victim)

    def _make_opaque(self, directory: Path) -> None:
        """Hide every entry below ``directory`` that this layer did not create."""
        if not directory.is_dir() or directory.is_symlink():
            return
        for entry in list(os.scandir(directory)):
            rel = os.path.relpath(entry.path, self.root)
            if rel not in self._touched:
                _remove(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                self._make_opaque(Path(entry.path))

    def _metadata(self, path: Path, member: tarfile.TarInfo) -> None:
        if self._same_owner:
            with contextlib.suppress(OSError):
                os.lchown(path, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PREFIX):
                name = key[len(XATTR_PREFIX) :]
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                with contextlib.suppress(OSError):
                    os.setxattr(path, name, raw, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        with contextlib.suppress(OSError):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _advance(self, member: tarfile.TarInfo, nbytes: int) -> None:
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
) -> ExtractStats:
    """Safely unpack a tar stream into ``root`` (see the module docstring)."""
    extractor = _Extractor(
        root=root, allow_devices=allow_devices, whiteouts=whiteouts, progress=progress
    )
    try:
        with open_archive(stream) as archive:
            return extractor.extract(archive)
    except (tarfile.TarError, EOFError) as exc:
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
            if info.isreg():
                with open(path, "rb") as f:
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
