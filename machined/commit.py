"""``pymachine commit MACHINE NEW``: a machine's image plus its writable layer → a new image.

The new image is a plain directory (``systemd-nspawn -D`` and ``machinectl``
use it) that costs the disk of the machine's changes, not a full copy:

* the base image is copied with reflinks where the file system has them
  (``cp -a --reflink=always``), else as hard links (``cp -al``: directories
  are new, files shared with the base, which is a read-only lower layer);
* the upper layer is applied on top: an overlay whiteout (a 0/0 character
  device) removes the path, an opaque directory (``trusted.overlay.opaque``)
  drops what the base had in it, every other entry *replaces* its path
  (unlink, then create): a file shared with the base by a hard link is never
  written through;
* owners are unshifted from the machine's UID range (``PrivateUsers=``);
  an id outside the range becomes ``nobody`` (65534);
* device nodes and sockets are left out (``import-tar --allow-devices`` is
  the way to an image with device nodes);
* overlay bookkeeping (``trusted.overlay.*``) is not copied; a layer with
  redirected directories or metacopy files (overlay features pymachine does
  not enable) is refused rather than copied wrong.

When the base image came from ``pull`` (its manifest is in the blob cache),
the change is also written as one more gzip layer with OCI whiteouts, so
that ``push`` sends the base layers plus this one.

A running machine is frozen for the copy (``machined.quiesce``), or stopped
and started again with ``stop``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tarfile
import time
from pathlib import Path

from machined.errors import Conflict, NotFound, PymachineError
from machined.images import ImageStore
from machined.names import validate_image_name, validate_machine_name

NOBODY = 65534
FICLONE = 0x40049409
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")
REFUSED = ("trusted.overlay.redirect", "trusted.overlay.metacopy")


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _remove(path: Path) -> None:
    """rm -rf of one entry of the staging tree (a symlink itself, never its target)."""
    from machined.images import remove_tree

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)


class Shift:
    """Host ids of the machine's range → the image's own ids."""

    def __init__(self, base: int, count: int) -> None:
        self.base, self.count = base, count

    def __call__(self, value: int) -> int:
        if not self.base:
            return value
        if self.base <= value < self.base + self.count:
            return value - self.base
        return NOBODY


def can_reflink(directory: Path) -> bool:
    """Whether the file system under ``directory`` clones files (btrfs, xfs): one probe."""
    import tempfile

    with (
        tempfile.TemporaryFile(dir=directory) as a,
        tempfile.TemporaryFile(dir=directory) as b,
    ):
        a.write(b"x")
        a.flush()
        try:
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
        except OSError:
            return False
    return True


def copy_base(base: Path, target: Path) -> str:
    """``target`` (absent) = a copy of ``base`` sharing its data; returns how."""
    from bootstrap.run import run

    if can_reflink(target.parent):
        run(["cp", "-a", "--reflink=always", "--", str(base), str(target)], capture=True)
        return "reflinks"
    run(["cp", "-al", "--", str(base), str(target)], capture=True)
    return "hard links"


class Applier:
    """Applies an overlay upper directory onto a tree, optionally writing it as an OCI layer."""

    def __init__(self, upper: Path, root: Path, shift: Shift, tar: tarfile.TarFile | None) -> None:
        self.upper, self.root, self.shift, self.tar = upper, root, shift, tar
        self.links: dict[tuple[int, int], Path] = {}
        self.dirs: list[tuple[str, Path, os.stat_result]] = []
        self.changed = 0
        self.skipped: list[str] = []

    def run(self) -> int:
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(self.upper / rel if rel else self.upper) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if self._entry(child, entry.path):
                        stack.append(child)
        for src, dest, st in reversed(self.dirs):  # deepest last written first
            self._metadata(src, dest, st)
        return self.changed

    def _entry(self, rel: str, src: str) -> bool:
        """Apply one entry; True if it is a directory to descend into."""
        st = os.lstat(src)
        for name in REFUSED:
            if _xattr(src, name) is not None:
                raise PymachineError(
                    f"cannot commit: {rel} uses an overlay feature pymachine does not support ({name})"
                )
        dest = self.root / rel
        self.changed += 1
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # whiteout
            _remove(dest)
            self._tar_marker(rel, whiteout=True)
            return False
        if stat.S_ISDIR(st.st_mode):
            opaque = any(_xattr(src, name) == b"y" for name in OPAQUE)
            try:
                existing = os.lstat(dest)
            except FileNotFoundError:
                existing = None
            if existing is not None and (opaque or not stat.S_ISDIR(existing.st_mode)):
                _remove(dest)
                existing = None
            if existing is None:
                os.mkdir(dest, 0o700)
            self._metadata(src, dest, st)  # now for the layer's entry; again at the end (mtime)
            self.dirs.append((src, dest, st))
            self._tar_add(rel, dest)
            if opaque:
                self._tar_marker(f"{rel}/x", whiteout=False)
            return True
        _remove(dest)  # replace, never write through a link shared with the base
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], dest, follow_symlinks=False)
            self._tar_add(rel, dest)
            return False
        if stat.S_ISREG(st.st_mode):
            _copy_file(src, dest)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dest)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dest, 0o600)
        else:
            # sockets, and device nodes (a machine without a user namespace can
            # make them; an image gets them only through import --allow-devices)
            self.skipped.append(rel)
            return False
        if st.st_nlink > 1:
            self.links[key] = dest
        self._metadata(src, dest, st)
        self._tar_add(rel, dest)
        return False

    def _metadata(self, src: str, dest: Path, st: os.stat_result) -> None:
        os.lchown(dest, self.shift(st.st_uid), self.shift(st.st_gid))
        with contextlib.suppress(OSError):
            for name in os.listxattr(src, follow_symlinks=False):
                if name.startswith(OVERLAY_XATTRS):
                    continue
                with contextlib.suppress(OSError):
                    os.setxattr(
                        dest, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False,
                    )  # fmt: skip
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dest, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    # --- the OCI layer of the change ---------------------------------------------
    def _tar_add(self, rel: str, dest: Path) -> None:
        if self.tar is None:
            return
        from bootstrap.tarimport import XATTR_PREFIX

        info = self.tar.gettarinfo(str(dest), arcname=rel)
        if info is None:
            return
        info.uname = info.gname = ""
        with contextlib.suppress(OSError):
            for name in os.listxattr(dest, follow_symlinks=False):
                value = os.getxattr(dest, name, follow_symlinks=False)
                info.pax_headers[XATTR_PREFIX + name] = value.decode("utf-8", "surrogateescape")
        if info.isreg():
            with open(dest, "rb") as f:
                self.tar.addfile(info, f)
        else:
            self.tar.addfile(info)

    def _tar_marker(self, rel: str, *, whiteout: bool) -> None:
        if self.tar is None:
            return
        from bootstrap.tarimport import OPAQUE_MARKER, WHITEOUT_PREFIX

        parent, _, name = rel.rpartition("/")
        marker = WHITEOUT_PREFIX + name if whiteout else OPAQUE_MARKER
        info = tarfile.TarInfo(f"{parent}/{marker}" if parent else marker)
        info.mtime = int(time.time())
        self.tar.addfile(info)


def _copy_file(src: str, dest: Path) -> None:
    """A copy that shares blocks where the file system can (FICLONE), else a plain copy."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.ioctl(fd_out, FICLONE, fd_in)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
            size = os.fstat(fd_in).st_size
            copied = 0
            while copied < size:
                n = os.copy_file_range(fd_in, fd_out, size - copied)
                if n == 0:
                    break
                copied += n
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def machine_shift(store: ImageStore, machine: str) -> Shift:
    from machined.runtime.userns import DEFAULT_COUNT, SHIFT_FILE, allocations

    state = store.paths.machine_state(machine)
    try:
        base = int((state / SHIFT_FILE).read_text())
    except (OSError, ValueError):
        base = 0
    count = allocations(store.paths.state).get(machine, (base, DEFAULT_COUNT))[1]
    return Shift(base, count)


def commit(
    machine: str,
    new: str,
    *,
    stop: bool = False,
    store: ImageStore | None = None,
    progress=None,
) -> Path:
    from bootstrap.progress import Progress
    from machined.definition import load

    store = store or ImageStore()
    progress = progress or Progress()
    validate_machine_name(machine)
    validate_image_name(new)
    definition = load(machine, store.paths)
    base = definition.image
    base_root = store.path(base)
    if store.exists(new):
        raise Conflict(f"image '{new}' already exists")
    from machined.machines import Machines
    from machined.quiesce import quiesced

    upper = store.paths.machine_state(machine) / "upper"
    if not upper.is_dir():
        raise NotFound(f"machine '{machine}' has no writable layer")
    started = time.monotonic()
    shift = machine_shift(store, machine)
    base_origin = store.origin(base)
    with Machines(store.paths) as machines, store.staging(new) as staging:
        staging.rmdir()
        progress.step(f"copying image '{base}'")
        how = copy_base(base_root, staging)
        progress.step(f"applying machine '{machine}'s changes")
        # Only the writable layer's read needs the machine still: the base is read-only.
        with quiesced(machines, machine, stop=stop, what="commit"):
            manifest, applier = _apply(store, upper, staging, shift, base_origin, machine)
        if applier.skipped:
            progress.message(
                f"left out {len(applier.skipped)} device node(s) or socket(s): "
                + ", ".join(applier.skipped[:5])
            )
        origin = {"committed_from": machine, "base": base, "committed_at": time.time()}
        if manifest:
            origin["manifest"] = manifest
        if base_origin.get("reference"):
            origin["base_reference"] = base_origin["reference"]
        meta = {"source": f"commit of machine {machine} (image {base})", "origin": origin}
        path = store.commit(new, staging, meta=meta, config=store.config(base))
    progress.finish(
        f"image '{new}' committed from machine '{machine}': {applier.changed} changed entries over "
        f"'{base}' ({how}) in {time.monotonic() - started:.1f}s"
    )
    return path


def _apply(store, upper, staging, shift, base_origin, machine) -> tuple[str | None, Applier]:
    """Apply the upper layer; with a pulled base, also store base + change as an OCI image."""
    from bootstrap.blobcache import BlobCache

    cache = BlobCache(store.paths)
    base_manifest = base_origin.get("manifest")
    if not base_manifest or not cache.has(base_manifest):
        applier = Applier(upper, staging, shift, None)
        applier.run()
        return None, applier
    from bootstrap import ociwrite

    with cache.locked():
        written: list[ociwrite.WrittenLayer] = []
        with ociwrite.layer(cache, written) as tar:
            applier = Applier(upper, staging, shift, tar)
            applier.run()
        manifest = cache.read_json(base_manifest)
        config = ociwrite.extended_config(
            cache.read_json(manifest["config"]["digest"]), written[0], f"pymachine commit {machine}"
        )
        layers = [*manifest.get("layers", []), written[0].descriptor]
        return ociwrite.put_image(cache, config, layers), applier
