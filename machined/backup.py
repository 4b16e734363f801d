"""Backups of a machine: one self-describing archive, and its safe restore.

The archive is a PAX tar (GNU tar lists and unpacks it), plain, gzip or
zstd, made of, in this order:

* ``pymachine-backup.json``: the format, the machine's name and definition,
  its image's name and recorded origin, whether the image is inside;
* ``layer/…``: the writable layer with *unshifted* owners (0 = the machine's
  root, whatever host range it had), modes, ns mtimes, every xattr
  (``SCHILY.xattr.*``: ``trusted.overlay.*``, ACLs, capabilities), whiteouts
  (0/0 character devices), hard links, sparse files as GNU sparse 1.0;
* ``image/…`` with ``--with-image``: the image as it is on disk;
* ``pymachine-backup.sha256``: the manifest, last: a SHA-256 of every
  entry's header fields and data. An archive cut anywhere lacks it.

Restore reads the whole archive into hidden staging directories, checking
each entry against the manifest, and renames them into place only when all
of it was read and matched: a corrupt or truncated archive leaves nothing.
It is as strict as an import of a hostile archive, stricter in one way: the
archive's tree is made of the entries alone, so an entry's parent must be a
directory the archive itself made before (never a symlink, never something
already on disk), names are never reused, hard links only name earlier
entries; device nodes other than whiteouts are refused unless allowed.
Owners are shifted into the new machine's user-namespace range as they are
written (before the set-ID bits and capabilities, which a chown would clear).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from machined.errors import Conflict, InvalidInput, NotFound, PymachineError
from machined.machines import Machines
from machined.names import validate_image_name, validate_machine_name
from machined.runtime import userns
from machined.treecopy import open_same, read_xattrs

FORMAT = "pymachine-backup"
VERSION = 1
HEADER = "pymachine-backup.json"
MANIFEST = "pymachine-backup.sha256"
LAYER = "layer"
IMAGE = "image"
XATTR = "SCHILY.xattr."
MTIME_NS = "PYMACHINE.mtime_ns"
OVERFLOW_ID = 65534  # an owner outside the machine's range, as the machine sees it
CHUNK = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
STAGING_PREFIX = ".#restore."


class CorruptArchive(InvalidInput):
    """Not a whole, intact pymachine backup."""


# --- compression ---------------------------------------------------------------------


def compression_for(dest: str, asked: str | None = None) -> str:
    """zstd, gzip or none: ASKED, else from DEST's suffix ('-': none)."""
    if asked:
        return asked
    if dest == "-" or dest.endswith(".tar"):
        return "none"
    if dest.endswith((".tar.zst", ".tzst")):
        return "zstd"
    if dest.endswith((".tar.gz", ".tgz")):
        return "gzip"
    raise InvalidInput(f"{dest}: name the backup .tar.zst, .tar.gz or .tar (or '-' for stdout)")


@contextlib.contextmanager
def _compressed_writer(out: IO[bytes], compression: str) -> Iterator[tuple[IO[bytes], str]]:
    """(stream, tarfile mode) writing OUT in COMPRESSION; zstd through the zstd tool."""
    if compression == "gzip":  # level 6, gzip's own default (tarfile's "w|gz" takes 9: 3x slower)
        import gzip

        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as packed:
            yield packed, "w|"  # type: ignore[misc]
        return
    if compression != "zstd":
        yield out, "w|"
        return
    out.flush()
    try:
        proc = subprocess.Popen(["zstd", "-q", "-c", "-T0"], stdin=subprocess.PIPE, stdout=out)
    except FileNotFoundError:
        raise PymachineError("zstd is not installed (apt-get install zstd); use .tar.gz") from None
    assert proc.stdin is not None
    try:
        yield proc.stdin, "w|"
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        if proc.wait() != 0:
            raise PymachineError(f"zstd failed (exit status {proc.returncode})")


@contextlib.contextmanager
def _decompressed(stream: IO[bytes]) -> Iterator[IO[bytes]]:
    """STREAM decompressed: zstd through the zstd tool (fed by a thread, since
    the bytes peeked at are already read); gzip/xz/bz2 are left to tarfile."""
    peek = stream.peek(4)[:4] if hasattr(stream, "peek") else b""
    if peek[:2] == GZIP_MAGIC:  # here, not in tarfile: gzip checks its CRC and length at the end
        import gzip

        with gzip.GzipFile(fileobj=stream, mode="rb") as plain:
            yield plain  # type: ignore[misc]
        return
    if peek != ZSTD_MAGIC:
        yield stream
        return
    try:
        proc = subprocess.Popen(
            ["zstd", "-q", "-d", "-c"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise PymachineError("zstd is not installed (apt-get install zstd)") from None
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            shutil.copyfileobj(stream, proc.stdin, CHUNK)
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    ok = False
    try:
        yield proc.stdout
        ok = True
    finally:
        if not ok:
            proc.kill()
        rest = proc.stdout.read() if ok else b""
        proc.wait()
        feeder.join()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if ok and (proc.returncode != 0 or rest.strip(b"\0")):
            raise CorruptArchive(f"broken zstd stream: {err or 'trailing data'}")


# --- entries and their digests ---------------------------------------------------------


def entry_digest(info: tarfile.TarInfo, size: int, pax: dict[str, str]) -> Any:
    """A SHA-256 object over what restore makes of an entry (data added by the caller)."""
    fields = [
        info.name,
        info.type.decode(),
        info.mode & 0o7777,
        info.uid,
        info.gid,
        info.linkname,
        info.devmajor,
        info.devminor,
        size,
        sorted((k, v) for k, v in pax.items() if k.startswith((XATTR, "PYMACHINE."))),
    ]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=True).encode() + b"\0")


def header_digest(header: dict) -> str:
    """The header checks itself: restore acts on it (names, image, range) before
    the manifest at the end has been reached."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _segments(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the data of a file with holes."""
    result = []
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        result.append((data, hole - data))
        offset = hole
    return result


class _FileData(io.RawIOBase):
    """A file's data as tarfile reads it for an entry: the whole file, or for a
    sparse one the GNU 1.0 map block and its data segments; hashed as read."""

    def __init__(self, fd: int, size: int, digest: Any, segments: list | None) -> None:
        self.fd = fd
        self.digest = digest
        self.pieces: list[tuple[bytes | None, int, int]] = []  # (literal, offset, length)
        if segments is None:
            self.pieces.append((None, 0, size))
        else:
            mapping = f"{len(segments)}\n" + "".join(f"{o}\n{n}\n" for o, n in segments)
            block = mapping.encode()
            block += b"\0" * (-len(block) % tarfile.BLOCKSIZE)
            self.pieces.append((block, 0, len(block)))
            for offset, length in segments:
                digest.update(f"{offset}:{length}\n".encode())
                self.pieces.append((None, offset, length))
        self.stored = sum(n for _, _, n in self.pieces)
        self.index = 0
        self.done = 0  # in the current piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.index < len(self.pieces):
            literal, offset, length = self.pieces[self.index]
            if self.done == length:
                self.index += 1
                self.done = 0
                continue
            n = min(len(buffer), length - self.done)
            if literal is not None:
                chunk = literal[self.done : self.done + n]
            else:
                chunk = os.pread(self.fd, n, offset + self.done)
                if not chunk:  # the file shrank: the backup would not be one moment
                    raise PymachineError("a file changed while it was backed up")
                self.digest.update(chunk)
            buffer[: len(chunk)] = chunk
            self.done += len(chunk)
            return len(chunk)
        return 0


# --- writing ---------------------------------------------------------------------------


class _Writer:
    def __init__(self, archive: tarfile.TarFile, base: int, count: int) -> None:
        self.archive = archive
        self.base = base
        self.count = count
        self.manifest: list[tuple[str, str]] = []
        self.inodes: dict[tuple[int, int], str] = {}
        self.outside = 0  # owners outside the range, stored as OVERFLOW_ID

    def unshift(self, value: int) -> int:
        if not self.base:
            return value
        if self.base <= value < self.base + self.count:
            return value - self.base
        self.outside += 1
        return OVERFLOW_ID

    def add_json(self, name: str, value: Any) -> None:
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(time.time())
        digest = entry_digest(info, info.size, {})
        digest.update(data)
        self.manifest.append((name, digest.hexdigest()))
        self.archive.addfile(info, io.BytesIO(data))

    def add_tree(self, root: Path, prefix: str, *, shift: bool) -> None:
        """ROOT as entries PREFIX/…, reached through file descriptors only (as
        :mod:`machined.treecopy` walks a layer: nothing swapped in is followed)."""
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._directory(fd, prefix, os.fstat(fd), os.fstat(fd).st_dev, shift)
        finally:
            os.close(fd)

    def _directory(self, fd: int, name: str, st: os.stat_result, dev: int, shift: bool) -> None:
        self.add(name, st, read_xattrs(fd), shift=shift)
        if st.st_dev != dev:
            return  # another file system mounted below: its mount point only
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            child = f"{name}/{entry.name}"
            est = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(est.st_mode) or stat.S_ISREG(est.st_mode):
                flags = os.O_RDONLY | (
                    os.O_DIRECTORY if stat.S_ISDIR(est.st_mode) else os.O_NONBLOCK
                )
                sub = open_same(entry.name, fd, est, flags)
                try:
                    if stat.S_ISDIR(est.st_mode):
                        self._directory(sub, child, est, dev, shift)
                    else:
                        self.add(child, est, read_xattrs(sub), shift=shift, fd=sub)
                finally:
                    os.close(sub)
                continue
            link = os.readlink(entry.name, dir_fd=fd) if stat.S_ISLNK(est.st_mode) else ""
            xattrs = read_xattrs(f"/proc/self/fd/{fd}/{entry.name}")
            self.add(child, est, xattrs, shift=shift, link=link)

    def add(
        self,
        name: str,
        st: os.stat_result,
        xattrs: dict[str, bytes],
        *,
        shift: bool,
        fd: int = -1,
        link: str = "",
    ) -> None:
        """One entry: FD the open regular file, LINK a symlink's target."""
        mode = st.st_mode
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(mode)
        if shift and stat.S_ISCHR(mode) and st.st_rdev == 0:
            info.uid = info.gid = 0  # a whiteout: overlayfs makes it as its mounter, host root
        else:
            info.uid = self.unshift(st.st_uid) if shift else st.st_uid
            info.gid = self.unshift(st.st_gid) if shift else st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        pax: dict[str, str] = {MTIME_NS: str(st.st_mtime_ns)}
        for key, value in xattrs.items():
            pax[XATTR + key] = value.decode("utf-8", "surrogateescape")
        size = 0
        segments = None
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(mode) and st.st_nlink > 1 and key in self.inodes:
            info.type = tarfile.LNKTYPE
            info.linkname = self.inodes[key]
        elif stat.S_ISREG(mode):
            info.type = tarfile.REGTYPE
            size = st.st_size
            if st.st_nlink > 1:
                self.inodes[key] = name
        elif stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = link
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets: nothing to keep of them
        digest = entry_digest(info, size, pax)
        if info.type != tarfile.REGTYPE:
            info.pax_headers = pax
            self.archive.addfile(info)
            self.manifest.append((name, digest.hexdigest()))
            return
        if st.st_blocks * 512 < st.st_size:
            segments = _segments(fd, size)
        data = _FileData(fd, size, digest, segments)
        if segments is not None:
            pax.update(
                {
                    "GNU.sparse.major": "1",
                    "GNU.sparse.minor": "0",
                    "GNU.sparse.name": name,
                    "GNU.sparse.realsize": str(size),
                }
            )
            info.name = f"{name.split('/', 1)[0]}/GNUSparseFile.0/{len(self.manifest)}"
        info.pax_headers = pax
        info.size = data.stored
        self.archive.addfile(info, io.BufferedReader(data, CHUNK))
        self.manifest.append((name, digest.hexdigest()))

    def finish(self) -> None:
        total = hashlib.sha256("".join(f"{d}  {n}\n" for n, d in self.manifest).encode())
        self.add_json(MANIFEST, {"entries": self.manifest, "total": total.hexdigest()})


def backup(
    name: str,
    dest: str,
    *,
    with_image: bool = False,
    compression: str | None = None,
    stop: bool = False,
    snapshot: str | None = None,
    machines: Machines | None = None,
) -> dict[str, Any]:
    """Write machine NAME to DEST ('-': stdout). A running machine is copied
    from a snapshot made for it (frozen for that moment, or stopped with
    STOP), which is removed after; SNAPSHOT: back up that snapshot instead."""
    from machined.images import ImageStore
    from machined.snapshots import LAYER as SNAP_LAYER
    from machined.snapshots import Snapshots

    machines = machines or Machines()
    paths = machines.paths
    validate_machine_name(name)
    machines.load(name)  # NotFound, or a broken definition named
    mode = compression_for(dest, compression)
    snapshots = Snapshots(machines)
    temporary = None
    if snapshot is None and machines.is_running(name):
        temporary = snapshots.create(name, f"backup-tmp-{os.getpid()}", stop=stop)
        snapshot = temporary.name
    try:
        if snapshot is not None:
            info = snapshots.info(name, snapshot)
            layer = info.path / SNAP_LAYER
            definition_text = (info.path / "definition").read_text()
            base = info.uid_base
        else:
            layer = paths.machine_state(name) / "upper"
            layer.mkdir(parents=True, exist_ok=True)
            definition_text = paths.definition_file(name).read_text()
            from machined.snapshots import layer_base

            base = layer_base(paths.machine_state(name))
        from machined import definition as definitions

        image_name = definitions.from_text(name, definition_text).image
        store = ImageStore(paths)
        if with_image:
            store.path(image_name)  # NotFound if it is gone
        count = userns.allocations(paths.state).get(name, (0, userns.DEFAULT_COUNT))[1]
        header = {
            "format": FORMAT,
            "version": VERSION,
            "machine": name,
            "definition": definition_text,
            "created": time.time(),
            "snapshot": None if temporary else snapshot,
            "uid_count": count,
            "layer_owners": "unshifted" if base else "host",
            "image": {
                "name": image_name,
                "source": store.read_meta(image_name).get("source"),
                "included": with_image,
            },
        }
        return _write(dest, mode, header, layer, base, count, store, image_name, with_image)
    finally:
        if temporary is not None:
            snapshots.remove(name, temporary.name)


def _write(dest, mode, header, layer, base, count, store, image_name, with_image) -> dict:
    def write(out: IO[bytes]) -> _Writer:
        with (
            _compressed_writer(out, mode) as (stream, tar_mode),
            tarfile.open(
                fileobj=stream,
                mode=tar_mode,
                format=tarfile.PAX_FORMAT,
                encoding="utf-8",
                errors="surrogateescape",
                bufsize=CHUNK,
            ) as archive,
        ):
            writer = _Writer(archive, base, count)
            writer.add_json(HEADER, {**header, "sha256": header_digest(header)})
            writer.add_tree(layer, LAYER, shift=True)
            if with_image:
                writer.add_tree(store.path(image_name), IMAGE, shift=False)
            writer.finish()
        return writer

    if dest == "-":
        writer = write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        tmp = f"{dest}.partial"
        try:
            with open(tmp, "wb") as f:
                writer = write(f)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return {"entries": len(writer.manifest), "outside_range": writer.outside}


# --- reading ---------------------------------------------------------------------------


class _Tree:
    """One tree being made from entries (the layer, or the image)."""

    def __init__(self, root: Path, id_map) -> None:
        self.root = root
        self.id_map = id_map
        self.dirs: dict[str, tuple[tarfile.TarInfo, dict]] = {}
        self.others: set[str] = set()  # non-directories made (hard link targets)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else os.fspath(self.root)


class _Reader:
    def __init__(self, allow_devices: bool) -> None:
        self.allow_devices = allow_devices
        self.manifest: list[tuple[str, str]] = []
        self.header: dict | None = None
        self.trailer: dict | None = None
        self.trees: dict[str, _Tree | None] = {}  # prefix -> tree (None: read, not kept)

    def read(self, archive: tarfile.TarFile, on_header) -> None:
        for member in archive:
            if self.trailer is not None:
                raise CorruptArchive(f"entry after the manifest: {member.name!r}")
            name = member.pax_headers.get("GNU.sparse.name", member.name)
            if name == MANIFEST:
                self.trailer = self._json(archive, member, name, record=False)
                continue
            if self.header is None:
                if name != HEADER:
                    raise CorruptArchive("not a pymachine backup (no pymachine-backup.json first)")
                self.header = self._json(archive, member, name)
                if self.header.pop("sha256", None) != header_digest(self.header):
                    raise CorruptArchive(f"{HEADER}: checksum mismatch (the archive is corrupt)")
                on_header(self)
                continue
            self._member(archive, member, name)
        if self.header is None:
            raise CorruptArchive("not a pymachine backup (empty)")
        if self.trailer is None:
            raise CorruptArchive(
                "the archive is truncated: its manifest (the last entry) is missing"
            )
        self._check_manifest()
        for tree in self.trees.values():
            if tree is not None:
                # directories last, deepest first: what was made inside moved their mtimes
                for rel, (member, pax) in sorted(
                    tree.dirs.items(), key=lambda d: d[0].count("/") + bool(d[0]), reverse=True
                ):
                    self._metadata(tree, tree.path(rel), member, pax)

    def _json(self, archive, member, name: str, *, record: bool = True) -> dict:
        if not member.isreg() or member.size > 1 << 30:
            raise CorruptArchive(f"{name}: not a small regular file")
        source = archive.extractfile(member)
        data = source.read() if source else b""
        if len(data) != member.size:
            raise CorruptArchive(f"{name}: truncated")
        if record:
            digest = entry_digest(member, member.size, member.pax_headers)
            digest.update(data)
            self.manifest.append((name, digest.hexdigest()))
        try:
            value = json.loads(data)
        except ValueError:
            raise CorruptArchive(f"{name}: not JSON") from None
        if not isinstance(value, dict):
            raise CorruptArchive(f"{name}: not a JSON object")
        return value

    def _check_manifest(self) -> None:
        assert self.trailer is not None
        listed = self.trailer.get("entries")
        if not isinstance(listed, list) or [tuple(e) for e in listed] != self.manifest:
            mine = dict(self.manifest)
            for entry in listed if isinstance(listed, list) else []:
                if isinstance(entry, list) and len(entry) == 2 and mine.get(entry[0]) != entry[1]:
                    raise CorruptArchive(f"{entry[0]}: checksum mismatch (the archive is corrupt)")
            raise CorruptArchive("the archive's entries do not match its manifest")
        total = hashlib.sha256("".join(f"{d}  {n}\n" for n, d in self.manifest).encode())
        if self.trailer.get("total") != total.hexdigest():
            raise CorruptArchive("the manifest's checksum does not match (the archive is corrupt)")

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        rel_all = _member_path(name)
        prefix, _, rel = rel_all.partition("/")
        if prefix not in self.trees:
            raise CorruptArchive(f"unexpected entry {name!r} (only layer/ and image/)")
        tree = self.trees[prefix]
        pax = member.pax_headers
        size = member.size if member.isreg() else 0
        digest = entry_digest(_as_written(member, name), size, pax)
        if tree is None:  # verified, not kept (an image this host has already)
            if member.isreg():
                self._data(archive, member, None, digest)
            self.manifest.append((name, digest.hexdigest()))
            return
        self._make(archive, member, tree, rel, digest)
        self.manifest.append((name, digest.hexdigest()))

    def _make(self, archive, member, tree: _Tree, rel: str, digest) -> None:
        if not rel:
            if not member.isdir():
                raise CorruptArchive(f"{member.name!r}: the tree's root must be a directory")
            if "" in tree.dirs:
                raise CorruptArchive("the tree's root appears twice")
            tree.dirs[""] = (member, member.pax_headers)
            return
        parent = rel.rpartition("/")[0]
        if parent not in tree.dirs:
            raise CorruptArchive(f"{rel!r}: its directory is not an earlier directory entry")
        if rel in tree.dirs or rel in tree.others:
            raise CorruptArchive(f"{rel!r} appears twice")
        path = tree.path(rel)
        if member.isdir():
            os.mkdir(path, 0o700)
            tree.dirs[rel] = (member, member.pax_headers)
            return
        if member.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                self._data(archive, member, fd, digest)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            prefix, _, target = _member_path(member.linkname).partition("/")
            if self.trees.get(prefix) is not tree or target not in tree.others:
                raise CorruptArchive(f"hard link {rel!r}: {member.linkname!r} is no earlier file")
            os.link(tree.path(target), path, follow_symlinks=False)
            tree.others.add(rel)
            return  # the target's metadata
        elif member.ischr() or member.isblk():
            whiteout = member.ischr() and member.devmajor == 0 and member.devminor == 0
            if not (whiteout or self.allow_devices):
                raise CorruptArchive(
                    f"refusing device node {rel!r} (only overlayfs whiteouts; --allow-devices)"
                )
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise CorruptArchive(f"{rel!r}: unsupported entry type {member.type!r}")
        tree.others.add(rel)
        self._metadata(tree, path, member, member.pax_headers)

    def _data(self, archive, member: tarfile.TarInfo, fd: int | None, digest) -> None:
        source: Any = archive.extractfile(member)
        assert source is not None
        segments = member.sparse
        if segments is not None:
            # the raw reader: it seeks forward over the stream (the buffered one
            # asks a stream whether it is seekable, which a pipe's is not)
            source = source.raw
        if segments is None:
            pieces = [(0, member.size)]
        else:
            pieces = list(segments)
            for offset, length in pieces:
                digest.update(f"{offset}:{length}\n".encode())
        for offset, length in pieces:
            if offset < 0 or length < 0 or offset + length > member.size:
                raise CorruptArchive(f"{member.name!r}: a bad sparse map")
            if segments is not None:
                source.seek(offset)
            left = length
            position = offset
            while left:
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    raise CorruptArchive(f"{member.name!r}: truncated")
                digest.update(chunk)
                if fd is not None:
                    os.pwrite(fd, chunk, position)
                position += len(chunk)
                left -= len(chunk)
        if fd is not None:
            os.ftruncate(fd, member.size)

    def _metadata(self, tree: _Tree, path: str, member: tarfile.TarInfo, pax: dict) -> None:
        uid, gid = tree.id_map(member.uid), tree.id_map(member.gid)
        os.lchown(path, uid, gid)  # first: a chown clears set-ID bits and capabilities
        for key, value in pax.items():
            if key.startswith(XATTR):
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
                os.setxattr(path, key[len(XATTR) :], raw, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        mtime_ns = int(pax.get(MTIME_NS) or int(member.mtime) * 1_000_000_000)
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _member_path(name: str) -> str:
    """NAME relative to the archive's root: absolute names and '..' refused."""
    from bootstrap.tarimport import member_path

    try:
        return member_path(name)
    except InvalidInput as exc:
        raise CorruptArchive(str(exc)) from None


def _as_written(member: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    """MEMBER with the fields the writer hashed: its real name (a sparse
    entry's is in GNU.sparse.name), and the type REGTYPE for AREGTYPE."""
    info = tarfile.TarInfo(name)
    for field in ("mode", "uid", "gid", "linkname", "devmajor", "devminor"):
        setattr(info, field, getattr(member, field))
    info.type = tarfile.REGTYPE if member.isreg() else member.type
    return info


def _id_mapper(base: int | None, count: int):
    """Stored owner -> host owner: into [BASE, BASE+COUNT) (refusing any outside
    the range); None: as stored (PrivateUsers=no)."""
    if base is None:
        return lambda value: value

    def shift(value: int) -> int:
        if not 0 <= value < count:
            raise CorruptArchive(f"owner {value} lies outside the machine's {count} IDs")
        return base + value

    return shift


def restore(
    source: str,
    name: str | None = None,
    *,
    allow_devices: bool = False,
    machines: Machines | None = None,
) -> dict[str, Any]:
    """Make a machine (NAME, default the archive's) from backup SOURCE ('-': stdin)."""
    from machined import definition as definitions
    from machined import unitfile
    from machined.images import ImageStore

    machines = machines or Machines()
    paths = machines.paths
    if name is not None:
        validate_machine_name(name)
    state_root = paths.state / "machines"
    state_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(state_root)
    store = ImageStore(paths)
    plan: dict[str, Any] = {}
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=state_root))
    image_stage = contextlib.ExitStack()
    allocated_name: list[str] = []
    try:

        def on_header(reader: _Reader) -> None:
            header = reader.header or {}
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise CorruptArchive("not a pymachine backup of a version this pymachine reads")
            target = name or str(header.get("machine", ""))
            validate_machine_name(target)
            text = header.get("definition")
            if not isinstance(text, str):
                raise CorruptArchive("the backup has no definition")
            definition = definitions.from_text(target, text, f"{HEADER}:definition")
            if paths.definition_file(target).exists():
                raise Conflict(f"machine '{target}' already exists")
            if paths.machine_state(target).exists():
                raise Conflict(f"{paths.machine_state(target)} exists; remove it first")
            image = header.get("image") if isinstance(header.get("image"), dict) else {}
            image_name = validate_image_name(str(definition.image))
            have_image = store.exists(image_name)
            if not have_image and not image.get("included"):
                origin = image.get("source") or "unknown origin"
                raise NotFound(
                    f"image '{image_name}' ({origin}) is not on this host: make it first, "
                    "or back up with --with-image"
                )
            spec = userns.spec_of(definition)
            if target not in userns.allocations(paths.state):
                allocated_name.append(target)  # released again if the restore fails
            try:
                allocated = userns.allocate(paths.state, target, spec)
            except ValueError as exc:
                raise Conflict(str(exc)) from None
            # Owners go into the new range (the archive's are relative to the old
            # machine's, or host IDs of a PrivateUsers=no machine, which are its
            # own IDs too); with PrivateUsers=no they are kept as they are.
            base, count = allocated if allocated else (None, 0)
            (staging / "upper").mkdir()
            (staging / "work").mkdir()
            reader.trees[LAYER] = _Tree(staging / "upper", _id_mapper(base, count))
            if image.get("included"):
                if have_image:
                    reader.trees[IMAGE] = None
                else:
                    image_dir = image_stage.enter_context(store.staging(image_name))
                    reader.trees[IMAGE] = _Tree(image_dir, lambda value: value)
            plan.update(
                name=target,
                definition=definition,
                text=text,
                image=image_name,
                image_meta={"source": f"backup of {header.get('machine')}: {image.get('source')}"},
                layer_base=base or 0,
                image_restored=bool(image.get("included")) and not have_image,
                image_kept=bool(image.get("included")) and have_image,
            )

        reader = _Reader(allow_devices)
        _read_archive(source, reader, on_header)
        # Everything read and matched: now into place.
        target = plan["name"]
        (staging / userns.SHIFT_FILE).write_text(f"{plan['layer_base']}\n")
        if plan["image_restored"]:
            tree = reader.trees[IMAGE]
            assert tree is not None
            store.commit(plan["image"], tree.root, meta=plan["image_meta"])
        os.chmod(staging, 0o755)
        os.rename(staging, paths.machine_state(target))
        try:
            unitfile.write_atomic(paths.definition_file(target), plan["text"])
        except BaseException:
            shutil.rmtree(paths.machine_state(target), ignore_errors=True)
            raise
        image_stage.close()
        return {
            "machine": target,
            "image": plan["image"],
            "image_restored": plan["image_restored"],
            "warnings": privileges(plan["definition"])
            + (
                [
                    f"uses this host's image '{plan['image']}': the archive's copy was checked, not used"
                ]
                if plan["image_kept"]
                else []
            ),
        }
    except BaseException:
        image_stage.__exit__(*sys.exc_info())
        shutil.rmtree(staging, ignore_errors=True)
        for allocated in allocated_name:
            if not paths.definition_file(allocated).exists():
                userns.release(paths.state, allocated)
        raise


def privileges(definition) -> list[str]:
    """What a restored definition gives its machine of the host: the definition
    is the archive's, so these are said before anyone starts it."""
    said = []
    if str(definition.private_users) == "no":
        said.append("has PrivateUsers=no: root inside is host root")
    if definition.binds:
        said.append("binds host paths: " + ", ".join(str(b) for b in definition.binds))
    if definition.capability:
        said.append("adds capabilities: " + ", ".join(definition.capability))
    return said


def _read_archive(source: str, reader: _Reader, on_header) -> None:
    if source == "-":
        stream_cm: Any = contextlib.nullcontext(sys.stdin.buffer)
    else:
        if not os.path.isfile(source):
            raise NotFound(f"{source}: no such file")
        stream_cm = open(source, "rb")  # noqa: SIM115 - entered just below
    import gzip
    import zlib

    with stream_cm as stream, _decompressed(stream) as plain:
        try:
            with tarfile.open(
                fileobj=plain,
                mode="r|*",
                encoding="utf-8",
                errors="surrogateescape",
                bufsize=CHUNK,  # (the default 10 kB records: 100,000 reads a GB)
            ) as archive:
                reader.read(archive, on_header)
            while plain.read(CHUNK):  # to the end: a compressed stream checks itself there
                pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
            # (ValueError: tarfile's own parsing of a cut sparse map or number)
            raise CorruptArchive(f"broken archive: {exc}") from None


def _remove_stale(directory: Path) -> None:
    """Restore staging directories of processes that are gone (killed mid-read)."""
    for entry in os.scandir(directory):
        if entry.name.startswith(STAGING_PREFIX):
            pid = entry.name[len(STAGING_PREFIX) :].split(".", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(entry.path, ignore_errors=True)
