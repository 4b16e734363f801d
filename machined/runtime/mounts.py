"""The container's file system view, after systemd-nspawn's ``nspawn-mount.c``:
/proc with the dangerous parts read-only or masked, read-only /sys, a private
/dev with only safe nodes and a new devpts instance, tmpfs /tmp and /run, the
machine's bind mounts.

Two sides, so that root inside can change none of it (docs/security.md,
"Mounts"):

* :func:`build_rootfs`, in the **runtime** (host root, in its private mount
  namespace, owned by the host's user namespace), mounts everything under the
  machine's root. Every target is resolved *inside* the root
  (:mod:`machined.runtime.chase`) and mounted onto through its fd, so a
  symlink in the image or left by root inside never reaches a host path.
* :func:`enter_rootfs`, in the container's **PID 1**, then joins a copy of
  that mount namespace which the intermediate made as root of the machine's
  user namespace (``leader.py``): a copy made for a less privileged user
  namespace, in which the kernel *locks* every mount it copied
  (``MNT_LOCK_READONLY``, ``MNT_LOCKED``): read-only stays read-only, a mask
  cannot be unmounted. It pivots into the root.

The file systems that belong to the container's own namespaces (proc: its
PID namespace, sysfs: its network namespace, cgroup2: its cgroup namespace,
devpts) are opened by PID 1 as file system contexts
(:func:`open_filesystems`), passed to the runtime (``SCM_RIGHTS``) and
mounted by it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple

from machined.runtime import chase
from machined.runtime.linux import (
    AT_FDCWD,
    CLONE_NEWNS,
    MNT_DETACH,
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    MOUNT_ATTR_STRICTATIME,
    MS_BIND,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SLAVE,
    attach,
    fs_context,
    fsmount,
    mount,
    mount_setattr,
    open_tree,
    pivot_root,
    sethostname,
    setns,
    umount,
    unshare,
)

# Device nodes a container gets, bind-mounted from the host's (never block devices).
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")
# /proc entries made read-only (directories/files that configure the host kernel).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
# /proc entries hidden behind /dev/null (kernel memory, keys, timers).
PROC_MASKED = (
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "kallsyms",
    "latency_stats",
    "acpi",
    "scsi",
)
#: The file systems PID 1 opens in the container's namespaces, in this order.
FILESYSTEMS = (
    ("proc", None),
    ("sysfs", None),
    ("cgroup2", None),
    ("devpts", {"ptmxmode": "0666", "mode": "620", "gid": "5"}),
)
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_API = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC


# namedtuples, not dataclasses: this runs in every container start, and
# dataclasses (with inspect) cost ~15 ms of imports there, namedtuple ~3.


class Bind(namedtuple("Bind", "source target read_only", defaults=(False,))):
    __slots__ = ()


class RootfsSpec(
    namedtuple(
        "RootfsSpec",
        "root read_only writable_cgroup binds console cgroup_dir owner nested devices",
        defaults=(False, False, (), None, None, (0, 0), False, ()),
    )
):
    """root: the merged overlay (a host path the runtime made);
    writable_cgroup: boot mode (the container's systemd owns its subtree);
    binds: :class:`Bind` s; console: a pty/tty to show as /dev/console;
    cgroup_dir: the machine's cgroup, as a host path; owner: host uid/gid of
    root inside, which owns what the runtime creates in the root; nested:
    PID 1 protects /proc itself (:func:`enter_rootfs`); devices: (path, mode,
    rdev, group) of the host nodes of Device=, made anew in the machine's
    /dev, owned by root inside and GROUP (a host gid: the machine's group of
    the host node's group's name), or root's group if None (the unit's
    DeviceAllow= lets the machine use them)."""

    __slots__ = ()


# --- PID 1's side ----------------------------------------------------------------


def open_filesystems() -> list[int]:
    """PID 1, in its new namespaces: created contexts of :data:`FILESYSTEMS`
    (-1 where the kernel refuses one, e.g. sysfs without a network namespace
    of our own). fsopen wants CAP_SYS_ADMIN over the caller's mount namespace,
    and PID 1 is still in the runtime's (the host's user namespace owns it):
    PID 1 takes a throwaway one of its own first (it joins its real one in
    :func:`enter_rootfs`)."""
    unshare(CLONE_NEWNS)
    fds = []
    for fstype, options in FILESYSTEMS:
        try:
            fds.append(fs_context(fstype, options))
        except OSError:
            fds.append(-1)
    return fds


def enter_rootfs(root: str, hostname: str, namespace: int, *, nested: bool = False) -> None:
    """PID 1: join NAMESPACE (a copy of the runtime's mount namespace made for
    the machine's user namespace: the runtime's mounts are locked in it) and
    pivot into ROOT. The recursive bind makes an unlocked top, which
    pivot_root wants; the mounts under it, and its read-only flag, stay locked.

    NESTED (boot mode: an OS that may run machines of its own): the read-only
    and masked parts of /proc are mounted here, inside the user namespace,
    as systemd-nspawn does, so they are not locked: the kernel lets a nested
    machine mount a proc of its own only where an existing one is fully
    visible, i.e. has no locked mount over any of its files."""
    setns(namespace, CLONE_NEWNS)
    os.close(namespace)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    if nested:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            proc = chase.open_in_root(root_fd, "/proc")
        finally:
            os.close(root_fd)
        try:
            _protect_proc(proc)
        finally:
            os.close(proc)
    mount(root, root, None, MS_BIND | MS_REC)
    os.chdir(root)
    pivot_root(".", ".")  # stack the old root under the new one, then drop it
    umount(".", MNT_DETACH)
    os.chdir("/")
    sethostname(hostname)


# --- the runtime's side ------------------------------------------------------------


class _Builder:
    """Mounts under one machine's root, every target an fd resolved inside it."""

    def __init__(self, root_fd: int, owner: tuple[int, int]) -> None:
        self.root_fd = root_fd
        self.owner = owner
        self.tmpfs_ids = f",uid={owner[0]},gid={owner[1]}" if owner != (0, 0) else ""

    def target(self, path: str, kind: str) -> int:
        """PATH resolved (and created) inside the root; never the root itself
        (an image's ``proc -> /`` would cover the whole machine)."""
        fd = chase.open_in_root(self.root_fd, path, create=kind, owner=self.owner)
        st, root = os.fstat(fd), os.fstat(self.root_fd)
        if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
            os.close(fd)
            raise OSError(errno.EINVAL, f"mount target {path} resolves to the machine's root")
        return fd

    def child(self, dir_fd: int, name: str, kind: str) -> int:
        """NAME in a directory of a file system we just made (nothing to chase)."""
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o644, dir_fd=dir_fd))
        self.chown(dir_fd, name)
        return os.open(name, _O_PATH, dir_fd=dir_fd)

    def chown(self, dir_fd: int, name: str) -> None:
        if self.owner != (0, 0):
            os.chown(name, *self.owner, dir_fd=dir_fd, follow_symlinks=False)

    def symlink(self, target: str, dir_fd: int, name: str) -> None:
        os.symlink(target, name, dir_fd=dir_fd)
        self.chown(dir_fd, name)


def _mounted(context: int, target_fd: int, attrs: int) -> int:
    """Mount a created CONTEXT on TARGET_FD (closed); returns the mount's fd."""
    try:
        tree = fsmount(context, attrs)
        try:
            attach(tree, target_fd)
        except OSError:
            os.close(tree)
            raise
    finally:
        os.close(target_fd)
    return tree


def _bind(
    source: str,
    target_fd: int,
    *,
    read_only: bool = False,
    recursive: bool = True,
    dir_fd: int = AT_FDCWD,
) -> None:
    """Bind SOURCE (a path, relative to DIR_FD) on TARGET_FD (closed); READ_ONLY
    for the whole tree, set before it is attached."""
    try:
        tree = open_tree(dir_fd, source, recursive=recursive)
        try:
            if read_only:
                mount_setattr(tree, MOUNT_ATTR_RDONLY)
            attach(tree, target_fd)
        finally:
            os.close(tree)
    finally:
        os.close(target_fd)


def _tmpfs(target_fd: int, options: str, attrs: int) -> int:
    """A tmpfs on TARGET_FD (closed); returns its mount fd."""
    try:
        context = fs_context("tmpfs", dict(item.split("=", 1) for item in options.split(",")))
    except OSError:
        os.close(target_fd)
        raise
    try:
        return _mounted(context, target_fd, attrs)
    finally:
        os.close(context)


def _protect_proc(proc: int) -> None:
    """Make PROC_READ_ONLY read-only and hide PROC_MASKED in the proc mount PROC."""
    for entry in PROC_READ_ONLY:
        try:
            target = os.open(entry, _O_PATH, dir_fd=proc)
        except FileNotFoundError:
            continue
        _bind(entry, target, read_only=True, dir_fd=proc)
    for entry in PROC_MASKED:
        try:
            target = os.open(entry, _O_PATH, dir_fd=proc)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(os.fstat(target).st_mode):
            os.close(_tmpfs(target, "mode=555", _API | MOUNT_ATTR_RDONLY))
        else:
            _bind("/dev/null", target, recursive=False)


def _mount_proc(builder: _Builder, context: int, protect: bool) -> None:
    if context < 0:
        raise OSError("the container's PID 1 could not open a proc file system")
    proc = _mounted(context, builder.target("/proc", "dir"), _API)
    try:
        if protect:
            _protect_proc(proc)
    finally:
        os.close(proc)


def _mount_sys(builder: _Builder, sysfs: int, cgroup: int, spec: RootfsSpec) -> None:
    target = builder.target("/sys", "dir")
    if sysfs >= 0:
        sys_fd = _mounted(sysfs, target, _API | MOUNT_ATTR_RDONLY)
    else:
        # Without a network namespace of its own (Mode=host) a user namespace
        # gets no sysfs of its own: the host's, read-only, as nspawn does.
        sys_fd = open_tree(AT_FDCWD, "/sys", recursive=False)
        try:
            mount_setattr(sys_fd, MOUNT_ATTR_RDONLY)
            attach(sys_fd, target)
        except OSError:
            os.close(sys_fd)
            raise
        finally:
            os.close(target)
    try:
        try:
            target = os.open("fs/cgroup", _O_PATH | os.O_DIRECTORY, dir_fd=sys_fd)
        except FileNotFoundError:
            return
    finally:
        os.close(sys_fd)
    attrs = _API if spec.writable_cgroup else _API | MOUNT_ATTR_RDONLY
    if cgroup >= 0:
        # cgroup2 of the container's cgroup namespace: only its own subtree. The
        # superblock is the host's: read-only as a mount, not as a superblock.
        os.close(_mounted(cgroup, target, attrs))
    elif spec.cgroup_dir:
        _bind(spec.cgroup_dir, target, read_only=not spec.writable_cgroup, recursive=False)
    else:
        os.close(target)
        raise OSError("the container's PID 1 could not open a cgroup2 file system")


def _make_device(
    builder: _Builder, dev: int, path: str, mode: int, rdev: int, group: int | None = None
) -> None:
    """PATH (``/dev/…``) in the machine's /dev tmpfs (DEV): a node of the
    host's kind and number, its permission bits, owned by root inside — a
    user-namespaced machine's root could use no host-owned node — and by
    GROUP (host gid), so that /dev/kvm's group kvm is the machine's kvm."""
    *parents, name = path.removeprefix("/dev/").split("/")
    directory = os.dup(dev)
    try:
        for part in parents:
            try:
                sub = builder.child(directory, part, "dir")
            except FileExistsError:
                sub = os.open(part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = sub
        os.mknod(name, stat.S_IFMT(mode) | (mode & 0o666), rdev, dir_fd=directory)
        os.chmod(name, mode & 0o666, dir_fd=directory)  # the host's bits, not less the umask's
        builder.chown(directory, name)
        if group is not None:
            os.chown(name, -1, group, dir_fd=directory, follow_symlinks=False)
    except FileExistsError:
        raise OSError(errno.EEXIST, f"device {path}: the machine has one already") from None
    finally:
        os.close(directory)


def _mount_dev(builder: _Builder, devpts: int, console: str | None, devices: tuple = ()) -> None:
    dev = _tmpfs(
        builder.target("/dev", "dir"),
        "mode=755,size=4m" + builder.tmpfs_ids,
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_STRICTATIME,
    )
    try:
        for node in DEVICE_NODES:
            _bind(f"/dev/{node}", builder.child(dev, node, "file"), recursive=False)
        if devpts < 0:
            raise OSError("the container's PID 1 could not open a devpts file system")
        os.close(
            _mounted(
                devpts, builder.child(dev, "pts", "dir"), MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC
            )
        )
        builder.symlink("pts/ptmx", dev, "ptmx")
        shm = _tmpfs(
            builder.child(dev, "shm", "dir"),
            "mode=1777" + builder.tmpfs_ids,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_STRICTATIME,
        )
        os.close(shm)
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            builder.symlink(target, dev, name)
        for device in devices:
            _make_device(builder, dev, *device)
        if console:
            _bind(console, builder.child(dev, "console", "file"), recursive=False)
    finally:
        os.close(dev)


def _mount_run(builder: _Builder) -> None:
    attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_STRICTATIME
    os.close(_tmpfs(builder.target("/tmp", "dir"), "mode=1777" + builder.tmpfs_ids, attrs))
    run = _tmpfs(builder.target("/run", "dir"), "mode=755" + builder.tmpfs_ids, attrs)
    try:
        os.close(builder.child(run, "host", "dir"))  # systemd's "I am in a container" marker
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        marker = os.open("host/container-manager", flags, 0o644, dir_fd=run)
        try:
            os.write(marker, b"pymachine\n")
        finally:
            os.close(marker)
        builder.chown(run, "host/container-manager")
    finally:
        os.close(run)


def _mount_binds(builder: _Builder, binds: tuple[Bind, ...]) -> None:
    for bind in binds:
        kind = "dir" if os.path.isdir(bind.source) else "file"
        try:
            _bind(bind.source, builder.target(bind.target, kind), read_only=bind.read_only)
        except OSError as exc:
            raise OSError(exc.errno, f"bind {bind.target}: {exc.strerror or exc}") from None


def _remount_read_only(target: str) -> None:
    """Read-only as a mount, keeping the flags it has."""
    flags = os.statvfs(target).f_flag
    kept = flags & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME)
    kept |= MS_RELATIME if flags & os.ST_RELATIME else 0
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)


def build_rootfs(spec: RootfsSpec, filesystems: list[int]) -> None:
    """The runtime, in its own mount namespace before PID 1 copies it: every
    mount of the machine under ``spec.root``. FILESYSTEMS: PID 1's contexts
    (:func:`open_filesystems`, fds taken over by the runtime). A failure
    leaves nothing on the host: the mounts die with the namespace."""
    proc, sysfs, cgroup, devpts = filesystems
    root_fd = os.open(spec.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        builder = _Builder(root_fd, spec.owner)
        _mount_proc(builder, proc, not spec.nested)
        _mount_sys(builder, sysfs, cgroup, spec)
        _mount_dev(builder, devpts, spec.console, spec.devices)
        _mount_run(builder)
        _mount_binds(builder, spec.binds)  # last: a bind under /run or /dev stays visible
    finally:
        os.close(root_fd)
    if spec.read_only:
        _remount_read_only(spec.root)
