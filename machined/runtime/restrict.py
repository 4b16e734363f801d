"""Applying a machine's confinement to the calling process: the capability
bounding set and sets, no_new_privs, and seccomp programs compiled beforehand.

Split from :mod:`machined.runtime.security` (which decides the policy and
compiles the seccomp filter with libseccomp) because the container's PID 1
applies it to itself just before it execs the init, and ``exec``'s joined
process before its command: neither needs pyseccomp.
"""

from __future__ import annotations

import ctypes
import errno

from machined.runtime.linux import check

PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

# Our own handle on libc: prctl needs unsigned long arguments here (a seccomp
# program's address), where linux.prctl passes a name as bytes.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = (
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_libc.prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc.capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_libc.capget.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, 0, 0)
    check(result, f"prctl({option})")
    return result


def drop_bounding_set(keep_mask: int, last: int) -> None:
    for cap in range(last + 1):
        if keep_mask & (1 << cap):
            continue
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a capability this kernel does not know
                raise


def set_capabilities(mask: int, inheritable: int = 0) -> None:
    """capset(2) on ourselves: effective = permitted = MASK."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = part
        data[i].permitted = part
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    check(_libc.capset(ctypes.byref(header), data), "capset")


def get_capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this process."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(_libc.capget(ctypes.byref(header), data), "capget")
    eff = data[0].effective | (data[1].effective << 32)
    perm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, perm, inh


def load_bpf(program: bytes) -> None:
    """Install one classic-BPF seccomp program (as libseccomp exported it)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _SOCK_FILTER_SIZE, ctypes.addressof(buffer))
    result = _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    check(result, "cannot load the seccomp filter")


def apply(
    keep_mask: int, last_cap: int, no_new_privileges: bool, seccomp_programs: list[bytes]
) -> None:
    """Restrict the calling process (and so everything it execs).

    Order: bounding set (needs CAP_SETPCAP), ambient set, no_new_privs, seccomp
    (needs CAP_SYS_ADMIN unless no_new_privs), then the process's own sets.
    The first program is the native architecture's; the others (compat ABIs)
    may be refused by a kernel without them."""
    drop_bounding_set(keep_mask, last_cap)
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    if no_new_privileges:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    for index, program in enumerate(seccomp_programs):
        try:
            load_bpf(program)
        except OSError:
            if index == 0:
                raise
    _eff, perm, _inh = get_capabilities()
    set_capabilities(keep_mask & perm)
