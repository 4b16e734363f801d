"""The container's file system view, set up by its PID 1 before pivot_root,
after systemd-nspawn's ``nspawn-mount.c``: /proc with the dangerous parts
read-only or masked, read-only /sys, a private /dev with only safe nodes and a
new devpts instance, tmpfs /tmp and /run, the machine's bind mounts.
"""

from __future__ import annotations

import os
from collections import namedtuple

from machined.runtime.linux import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SLAVE,
    MS_STRICTATIME,
    mount,
    pivot_root,
    sethostname,
    umount,
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


# namedtuples, not dataclasses: this runs in every container start, and
# dataclasses (with inspect) cost ~15 ms of imports there, namedtuple ~3.


class Bind(namedtuple("Bind", "source target read_only", defaults=(False,))):
    __slots__ = ()


class RootfsSpec(
    namedtuple(
        "RootfsSpec",
        "root hostname read_only writable_cgroup binds console cgroup_dir",
        defaults=(False, False, (), None, None),
    )
):
    """root: the merged overlay, seen from the container's mount namespace;
    writable_cgroup: boot mode (the container's systemd owns its subtree);
    binds: :class:`Bind` s; console: a pty/tty to show as /dev/console;
    cgroup_dir: the machine's cgroup, as a host path."""

    __slots__ = ()


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _kept_flags(path: str) -> int:
    """The flags a read-only remount must keep: in a user namespace the kernel
    refuses to clear nosuid/nodev/noexec/atime flags of a mount it inherited."""
    flags = os.statvfs(path).f_flag
    kept = flags & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC | os.ST_NOATIME | os.ST_NODIRATIME)
    return kept | (MS_RELATIME if flags & os.ST_RELATIME else 0)


def _remount_read_only(target: str) -> None:
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _kept_flags(target))


def _bind(source: str, target: str, *, read_only: bool = False, recursive: bool = True) -> None:
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    if read_only:
        _remount_read_only(target)


def _mkfile(path: str) -> None:
    if not os.path.lexists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _mount_proc(root: str) -> None:
    proc = _join(root, "/proc")
    os.makedirs(proc, exist_ok=True)
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for entry in PROC_READ_ONLY:
        path = os.path.join(proc, entry)
        if os.path.exists(path):
            _bind(path, path, read_only=True)
    for entry in PROC_MASKED:
        path = os.path.join(proc, entry)
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=555")
        elif os.path.exists(path):
            mount("/dev/null", path, None, MS_BIND)


def _mount_sys(root: str, writable_cgroup: bool, cgroup_dir: str | None) -> None:
    sys_dir = _join(root, "/sys")
    os.makedirs(sys_dir, exist_ok=True)
    try:
        mount("sysfs", sys_dir, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except PermissionError:
        # In a user namespace that does not own the network namespace (Mode=host),
        # the kernel refuses a new sysfs: show the host's, read-only, as nspawn does.
        _bind("/sys", sys_dir, read_only=True)
    cgroup = os.path.join(sys_dir, "fs/cgroup")
    if os.path.isdir(cgroup):
        # A fresh cgroup2 mount inside our cgroup namespace shows only our subtree.
        # Mounted read-write (the superblock is shared with the host's: asking for
        # read-only here would conflict), then made read-only as a mount.
        try:
            mount("cgroup2", cgroup, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            if not cgroup_dir:
                raise
            # Beside the host's /sys (Mode=host in a user namespace) the kernel
            # refuses a new cgroup2 mount: bind the machine's own cgroup instead.
            _bind(cgroup_dir, cgroup, recursive=False)
        if not writable_cgroup:
            _remount_read_only(cgroup)


def _mount_dev(root: str, console: str | None) -> None:
    dev = _join(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=4m")
    for node in DEVICE_NODES:
        target = os.path.join(dev, node)
        _mkfile(target)
        mount(f"/dev/{node}", target, None, MS_BIND)
    pts = os.path.join(dev, "pts")
    os.makedirs(pts)
    mount(
        "devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620,gid=5"
    )
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    shm = os.path.join(dev, "shm")
    os.makedirs(shm)
    mount("tmpfs", shm, "tmpfs", MS_NOSUID | MS_NODEV | MS_STRICTATIME, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))
    if console:
        target = os.path.join(dev, "console")
        _mkfile(target)
        mount(console, target, None, MS_BIND)


def _mount_tmpfs(root: str, path: str, mode: str) -> None:
    target = _join(root, path)
    os.makedirs(target, exist_ok=True)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_STRICTATIME, f"mode={mode}")


def _mount_binds(root: str, binds: tuple[Bind, ...]) -> None:
    for bind in binds:
        target = _join(root, bind.target)
        if os.path.isdir(bind.source):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            _mkfile(target)
        _bind(bind.source, target, read_only=bind.read_only)


def setup_rootfs(spec: RootfsSpec) -> None:
    """Build the container's mounts under ``spec.root`` and pivot into it.

    Runs in the container's fresh mount namespace; everything mounted here
    disappears with the namespace, so a crash leaves nothing on the host.
    """
    root = spec.root
    mount(None, "/", None, MS_REC | MS_SLAVE)
    mount(root, root, None, MS_BIND | MS_REC)  # pivot_root wants a mount point
    _mount_binds(root, spec.binds)
    _mount_proc(root)
    _mount_sys(root, spec.writable_cgroup, spec.cgroup_dir)
    _mount_dev(root, spec.console)
    _mount_tmpfs(root, "/tmp", "1777")
    _mount_tmpfs(root, "/run", "755")
    os.makedirs(_join(root, "/run/host"), exist_ok=True)  # systemd's "I am in a container" marker
    with open(_join(root, "/run/host/container-manager"), "w") as marker:
        marker.write("pymachine\n")
    if spec.read_only:
        _remount_read_only(root)
    os.chdir(root)
    pivot_root(".", ".")  # stack the old root under the new one, then drop it
    umount(".", MNT_DETACH)
    os.chdir("/")
    sethostname(spec.hostname)
