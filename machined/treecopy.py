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
        fd = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            os.mkdir(self.dst, 0o700)
            self.dirs.append(("", st, read_xattrs(fd)))
            self._walk("", fd, st.st_dev)
        finally:
            os.close(fd)
        for rel, dir_st, xattrs in reversed(self.dirs):  # deepest last in, first done
            self._metadata(self._dst(rel), dir_st, xattrs, is_link=False)
        return self.result

    def _dst(self, rel: str) -> str:
        return os.path.join(self.dst, rel) if rel else os.fspath(self.dst)

    def _walk(self, rel_dir: str, dir_fd: int, dev: int) -> None:
        """Copy the directory open as DIR_FD. Everything below is reached through
        file descriptors, never by a path: a directory swapped for a symlink
        while it is copied (it cannot be: the machine is frozen or stopped) is
        refused, not followed."""
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            self.result.entries += 1
            if not stat.S_ISDIR(st.st_mode):
                self._entry(rel, dir_fd, entry.name, st)
                continue
            fd = open_same(entry.name, dir_fd, st, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.mkdir(self._dst(rel), 0o700)
                self.dirs.append((rel, st, read_xattrs(fd)))
                if st.st_dev == dev:  # one file system, as the layer is
                    self._walk(rel, fd, dev)
            finally:
                os.close(fd)

    def _entry(self, rel: str, dir_fd: int, name: str, st: os.stat_result) -> None:
        dst = self._dst(rel)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            first = self.inodes.get(key)
            if first is not None:  # a hard link inside the tree: the same inode here too
                os.link(self._dst(first), dst, follow_symlinks=False)
                return
            self.inodes[key] = rel
        mode = st.st_mode
        if stat.S_ISREG(mode):
            self.result.index[rel] = (st.st_ino, st.st_ctime_ns)
            fd = open_same(name, dir_fd, st, os.O_RDONLY | os.O_NONBLOCK)
            try:
                xattrs = read_xattrs(fd)
                if not self._link_unchanged(rel, st, dst):
                    self._copy_file(fd, dst, st)
            finally:
                os.close(fd)
        else:
            # (no fd for these: their xattrs through the directory's, name not followed)
            xattrs = read_xattrs(f"/proc/self/fd/{dir_fd}/{name}")
            if stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=dir_fd), dst)
            elif stat.S_IFMT(mode) in _NODES:
                os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
            else:
                return
        self._metadata(dst, st, xattrs, is_link=stat.S_ISLNK(mode))

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

    def _copy_file(self, fin: int, dst: str, st: os.stat_result) -> None:
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

    def _metadata(
        self, path: str, st: os.stat_result, xattrs: dict[str, bytes], *, is_link: bool
    ) -> None:
        uid, gid = st.st_uid, st.st_gid
        if self.map_id is not None:
            uid, gid = self.map_id(uid), self.map_id(gid)
        os.lchown(path, uid, gid)  # first: a chown clears set-ID bits and capabilities
        for name, value in xattrs.items():
            os.setxattr(path, name, value, follow_symlinks=False)
        if not is_link:
            os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


_NODES = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


def open_same(name: str, dir_fd: int, st: os.stat_result, flags: int) -> int:
    """NAME in DIR_FD opened (never through a link), if it is still the inode ST."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name} changed while it was copied")
    return fd


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


def read_xattrs(target: int | str) -> dict[str, bytes]:
    """Every extended attribute of TARGET (an fd, or a path whose last component
    is not followed)."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    result = {}
    for name in sorted(names):
        try:
            result[name] = os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # (removed between list and get: not there)
                raise
    return result


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
