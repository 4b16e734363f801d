"""The Linux system calls Python 3.11 lacks (unshare, setns, mount, pivot_root…),
through ctypes on libc, in the spirit of mkosi's sandbox.py: ctypes and os
only: the container's PID 1 loads it, and stays small.
"""

from __future__ import annotations

import ctypes
import errno
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def check(result: int, what: str) -> None:
    """Raise OSError (with errno) if a libc call returned < 0."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


def unshare(flags: int) -> None:
    check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    check(_libc.setns(fd, nstype), "setns")


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
        f"mount {source or fstype} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    check(_libc.umount2(_b(target), flags), f"umount {target}")


def try_umount(target: str, flags: int = MNT_DETACH) -> bool:
    try:
        umount(target, flags)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise


def pivot_root(new_root: str, put_old: str) -> None:
    machine = os.uname().machine
    number = _SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {machine}")
    check(_libc.syscall(number, _b(new_root), _b(put_old)), "pivot_root")


def prctl(option: int, arg: int | bytes = 0) -> None:
    check(_libc.prctl(option, arg, 0, 0, 0), "prctl")


def set_process_name(name: str) -> None:
    """Name shown by ps/top (comm, 15 bytes)."""
    try:  # noqa: SIM105 — no contextlib: PID 1 loads this module
        prctl(PR_SET_NAME, name.encode()[:15])
    except OSError:
        pass


def sethostname(name: str) -> None:
    """sethostname(2) (``socket.sethostname`` would load socket and enum)."""
    encoded = name.encode()
    check(_libc.sethostname(encoded, len(encoded)), "sethostname")


# --- the new mount API (Linux >= 5.2; one syscall number on every architecture) ---

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def open_tree_clone(path: str | os.PathLike) -> int:
    """A detached copy of the mount tree at PATH (recursive), as an fd."""
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE),
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
    )
    check(fd, f"open_tree {os.fspath(path)}")
    return fd


def mount_setattr(tree: int, attr_set: int, userns_fd: int = 0) -> None:
    """Set attributes (read-only, an ID mapping…) on a detached tree, recursively."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(tree),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )


def move_mount(tree: int, target: str | os.PathLike) -> None:
    """Attach a detached tree at TARGET."""
    check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT),
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount to {os.fspath(target)}",
    )


# --- signals ---------------------------------------------------------------
_SYS_PIDFD_SEND_SIGNAL = 424  # the same on every architecture
SI_QUEUE = -1
SI_KERNEL = 0x80


def queue_signal(pidfd: int, sig: int) -> None:
    """Send SIG to the process of PIDFD as sigqueue(3) does (``si_code`` SI_QUEUE),
    which pymachine-init tells from kill(2): a queued SIGINT is a user's
    interrupt, a killed one machinectl's reboot. (Python's
    ``signal.pidfd_send_signal`` takes no siginfo.)"""
    # siginfo_t: si_signo, si_errno, si_code, then (aligned as a pointer) si_pid, si_uid, si_value
    info = (ctypes.c_int * 32)()
    info[0], info[2] = sig, SI_QUEUE
    at = 4 if ctypes.sizeof(ctypes.c_void_p) == 8 else 3
    info[at], info[at + 1] = os.getpid(), os.getuid()
    check(
        _libc.syscall(
            ctypes.c_long(_SYS_PIDFD_SEND_SIGNAL),
            ctypes.c_int(pidfd),
            ctypes.c_int(sig),
            info,
            ctypes.c_uint(0),
        ),
        f"signal {sig}",
    )


# --- openat2 (Linux >= 5.6): the kernel's in-root resolution, chase.py's reference ---

_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    check(fd, f"openat2 {path}")
    return fd


# --- file system contexts (Linux >= 5.2): mounts made from fds, never from paths ---

_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_STRICTATIME = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40


def fs_context(fstype: str, options: dict[str, str] | None = None) -> int:
    """A created (superblock made, not yet mounted) context of FSTYPE, as an fd.
    The namespaces it belongs to (proc's PID namespace, sysfs' network
    namespace, cgroup2's cgroup namespace) are the caller's."""
    fd = _libc.syscall(ctypes.c_long(_SYS_FSOPEN), fstype.encode(), ctypes.c_uint(1))  # CLOEXEC
    check(fd, f"fsopen {fstype}")
    try:
        for key, value in (options or {}).items():
            check(
                _libc.syscall(
                    ctypes.c_long(_SYS_FSCONFIG),
                    ctypes.c_int(fd),
                    ctypes.c_uint(FSCONFIG_SET_STRING),
                    key.encode(),
                    value.encode(),
                    ctypes.c_int(0),
                ),
                f"{fstype} option {key}={value}",
            )
        check(
            _libc.syscall(
                ctypes.c_long(_SYS_FSCONFIG),
                ctypes.c_int(fd),
                ctypes.c_uint(FSCONFIG_CMD_CREATE),
                None,
                None,
                ctypes.c_int(0),
            ),
            f"creating a {fstype} superblock",
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def fsmount(context: int, attrs: int) -> int:
    """A detached mount of a created CONTEXT with mount attributes ATTRS."""
    fd = _libc.syscall(
        ctypes.c_long(_SYS_FSMOUNT), ctypes.c_int(context), ctypes.c_uint(1), ctypes.c_uint(attrs)
    )
    check(fd, "fsmount")
    return fd


def open_tree(dir_fd: int, path: str, *, recursive: bool = True) -> int:
    """A detached copy of the mount at PATH (relative to DIR_FD; "" for DIR_FD itself)."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if not path:
        flags |= AT_EMPTY_PATH
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dir_fd), os.fsencode(path), ctypes.c_uint(flags)
    )
    check(fd, f"open_tree {path}")
    return fd


def attach(tree: int, target_fd: int) -> None:
    """Attach a detached TREE on the very inode TARGET_FD refers to (an O_PATH fd)."""
    check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT),
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(target_fd),
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        ),
        "move_mount",
    )


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE): a crash leaves
    one or the other in each place, never neither."""
    check(
        _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE),
        f"exchange {a} and {b}",
    )
