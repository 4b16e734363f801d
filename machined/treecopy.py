"""Copy a machine's writable layer with everything overlayfs and the machine rely on.

Kept: numeric owners, modes (set-ID bits too), mtimes, every extended
attribute (``trusted.overlay.*`` opaque/redirect markers, ACLs as
``system.posix_acl_*``, file capabilities), whiteouts (0/0 character
devices), FIFOs, sockets, device nodes, sparse files' holes and hard links
inside the tree. Nothing below the source is followed: every entry is
``lstat``-ed and copied as what it is.

Why not hard links to the live layer: overlayfs writes a file that is already
in ``upper/`` *in place* (only a lower file is copied up, by rename), so a
snapshot sharing an inode with ``upper/`` would change with the machine's
next write. Data is therefore shared only where nothing can write it again:

* a reflink (``FICLONE``: xfs, btrfs) shares blocks copy-on-write;
* with ``link_dest`` (the previous snapshot, immutable), a file unchanged
  since that snapshot copied it is hard-linked to *that snapshot's* copy, as
  ``rsync --link-dest`` does. "Unchanged" is the source's inode number and
  ctime as recorded then (:attr:`Copied.index`); ctime cannot be set from
  user space and every write, chmod, chown or xattr change moves it. A file
  whose ctime lay within :data:`CTIME_MARGIN` of that snapshot's start is
  copied again (coarse timestamps could hide a write right after it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path

FICLONE = 0x40049409
CTIME_MARGIN_NS = 2_000_000_000
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM)

#: rel path -> (inode, ctime_ns) of the source as it was copied
Index = dict[str, tuple[int, int]]


class Copied:
    """What :func:`copy_tree` did."""

    def __init__(self) -> None:
        self.entries = 0
        self.bytes = 0  # data written (copied, not shared)
        self.linked = 0  # files hard-linked to link_dest
        self.reflinked = 0
        self.index: Index = {}


class _Copier:
    def __init__(
        self,
        src: Path,
        dst: Path,
        link_dest: Path | None,
        link_index: Index,
        trusted_before_ns: int,
        map_id: Callable[[int], int] | None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.link_dest = link_dest
        self.link_index = link_index
        self.trusted_before_ns = trusted_before_ns
        self.map_id = map_id
        self.inodes: dict[tuple[int, int], str] = {}
        self.reflink = True
        self.result = Copied()
        self.dirs: list[tuple[str, os.stat_result]] = []

    def run(self) -> Copied:
        st = os.lstat(self.src)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.src))
        os.mkdir(self.dst, 0o700)
        self.dirs.append(("", st))
        self._walk("", st.st_dev)
        for rel, dst_st in reversed(self.dirs):  # deepest last in, first done
            self._metadata(self._dst(rel), rel, dst_st, is_link=False)
        return self.result

    def _src(self, rel: str) -> str:
        return os.path.join(self.src, rel) if rel else os.fspath(self.src)

    def _dst(self, rel: str) -> str:
        return os.path.join(self.dst, rel) if rel else os.fspath(self.dst)

    def _walk(self, rel_dir: str, dev: int) -> None:
        with os.scandir(self._src(rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            self.result.entries += 1
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(self._dst(rel), 0o700)
                self.dirs.append((rel, st))
                if st.st_dev == dev:  # one file system, as the layer is
                    self._walk(rel, dev)
                continue
            self._entry(rel, st)

    def _entry(self, rel: str, st: os.stat_result) -> None:
        src, dst = self._src(rel), self._dst(rel)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            first = self.inodes.get(key)
            if first is not None:  # a hard link inside the tree: the same inode here too
                os.link(self._dst(first), dst, follow_symlinks=False)
                return
            self.inodes[key] = rel
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self.result.index[rel] = (st.st_ino, st.st_ctime_ns)
            if self._link_unchanged(rel, st, dst):
                return
            self._copy_file(src, dst, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return
        self._metadata(dst, rel, st, is_link=stat.S_ISLNK(mode))

    def _link_unchanged(self, rel: str, st: os.stat_result, dst: str) -> bool:
        if self.link_dest is None or st.st_nlink > 1:
            return False
        recorded = self.link_index.get(rel)
        if recorded != (st.st_ino, st.st_ctime_ns) or st.st_ctime_ns >= self.trusted_before_ns:
            return False
        previous = os.path.join(self.link_dest, rel)
        try:
            pst = os.lstat(previous)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(pst.st_mode) or pst.st_size != st.st_size:
            return False
        os.link(previous, dst, follow_symlinks=False)
        self.result.linked += 1
        return True

    def _copy_file(self, src: str, dst: str, st: os.stat_result) -> None:
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                if self.reflink and st.st_size:
                    try:
                        fcntl.ioctl(fout, FICLONE, fin)
                        self.result.reflinked += 1
                        return
                    except OSError as exc:
                        if exc.errno not in _NO_REFLINK:
                            raise
                        self.reflink = False  # the file system cannot: plain copies from now on
                self.result.bytes += copy_data(fin, fout, st.st_size)
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _metadata(self, path: str, rel: str, st: os.stat_result, *, is_link: bool) -> None:
        uid, gid = st.st_uid, st.st_gid
        if self.map_id is not None:
            uid, gid = self.map_id(uid), self.map_id(gid)
        os.lchown(path, uid, gid)
        copy_xattrs(self._src(rel), path)
        if not is_link:
            os.chmod(path, stat.S_IMODE(st.st_mode))  # after chown, which clears set-ID bits
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_data(fin: int, fout: int, size: int) -> int:
    """Copy SIZE bytes, keeping holes (SEEK_DATA/SEEK_HOLE); the bytes written."""
    written = 0
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fin, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(fin, data, os.SEEK_HOLE)
        position = data
        while position < hole:
            n = os.copy_file_range(fin, fout, hole - position, position, position)
            if n == 0:
                break
            position += n
        written += position - data
        offset = hole
    os.ftruncate(fout, size)
    return written


def copy_xattrs(src: str, dst: str) -> None:
    """Every extended attribute of SRC onto DST, links not followed."""
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # gone between list and get: skip
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)


def copy_tree(
    src: Path,
    dst: Path,
    *,
    link_dest: Path | None = None,
    link_index: Index | None = None,
    trusted_before_ns: int = 0,
    map_id: Callable[[int], int] | None = None,
) -> Copied:
    """Copy the tree SRC to the new directory DST (see the module docstring).
    LINK_DEST/LINK_INDEX: a previous, immutable copy and its :attr:`Copied.index`;
    TRUSTED_BEFORE_NS: only sources whose ctime is older are trusted unchanged.
    MAP_ID: owners rewritten on the way (a user-namespace shift)."""
    return _Copier(src, dst, link_dest, link_index or {}, trusted_before_ns, map_id).run()
