"""What root inside a machine may do: capabilities, no_new_privs, seccomp.

The defaults copy systemd-nspawn's (v252, ``src/nspawn/nspawn.c`` and
``src/nspawn/nspawn-seccomp.c``):

* the capability bounding set keeps exactly nspawn's ``arg_caps_retain``
  (:data:`NSPAWN_RETAINED`), plus ``CAP_NET_ADMIN`` when the machine has a
  network namespace of its own (nspawn adds it for ``--private-network`` and
  ``--network-veth``); everything else — ``CAP_SYS_MODULE``, ``CAP_SYS_TIME``,
  ``CAP_SYS_RAWIO``, ``CAP_MAC_ADMIN``, ``CAP_SYSLOG``, ``CAP_BPF`` … — is
  dropped from the bounding set, so no exec can get it back;
* a seccomp filter refusing (``EPERM``) the system calls nspawn's allow list
  leaves out on purpose (:data:`DENIED_GROUPS`): module loading, kexec,
  swap, the clock, raw I/O ports, the kernel keyring, bpf, perf, fanotify,
  ``open_by_handle_at`` (the classic shocker escape), … — with the same
  capability coupling (keep ``CAP_SYS_TIME`` and ``@clock`` is allowed again),
  and ``socket(AF_NETLINK, *, NETLINK_AUDIT)`` failing with ``EAFNOSUPPORT``.
  nspawn builds an *allow* list (default ``EPERM``); this is the matching
  *deny* list, so a system call newer than the table is allowed here where
  nspawn refuses it (stated in the README's security model);
* ``no_new_privs`` on in application mode (pymachine's init runs the payload),
  off in boot mode (an OS needs ``su``/``sudo``), as nspawn does by default.

Per machine, in ``[Exec]``: ``Capability=`` / ``DropCapability=`` (names,
space separated, or ``all``), ``SystemCallFilter=`` (nspawn's
``--system-call-filter`` syntax: names or ``@groups`` to allow, ``~…`` to
deny), ``NoNewPrivileges=`` and ``PrivateUsers=`` (see
:mod:`machined.runtime.userns`).

Seccomp goes through libseccomp via ``pyseccomp`` (ctypes, API-compatible
with libseccomp's own bindings, which PyPI does not carry for our Python):
libseccomp knows every architecture's system call numbers and builds the
compat-ABI (i386, x32) filters a hand-written BPF program would get wrong.

Contract with the runtime: :func:`policy_for` and :func:`restrictions` run on
the host (the latter compiles the seccomp programs with libseccomp, or finds
them in its cache); the container's PID 1 applies the result to itself with
:mod:`restrict` (ctypes only) before it execs pymachine-init with the payload
or the image's init, and so does ``exec``'s joined process once inside.
"""

from __future__ import annotations

import contextlib
import errno
import json
import marshal
import os
from collections import namedtuple
from pathlib import Path

from machined.errors import InvalidInput
from machined.runtime import restrict, userns

# --- capabilities -------------------------------------------------------------

CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        )
    )
}

#: systemd-nspawn's default ``arg_caps_retain`` (src/nspawn/nspawn.c, v252).
NSPAWN_RETAINED: frozenset[str] = frozenset(
    {
        "CAP_AUDIT_CONTROL",
        "CAP_AUDIT_WRITE",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_IPC_OWNER",
        "CAP_KILL",
        "CAP_LEASE",
        "CAP_LINUX_IMMUTABLE",
        "CAP_MKNOD",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_RAW",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_CHROOT",
        "CAP_SYS_NICE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TTY_CONFIG",
    }
)

# --- system calls -------------------------------------------------------------

#: What nspawn's seccomp allow list leaves out, as systemd's groups
#: (src/shared/seccomp-util.c). A group keyed by a capability is allowed again
#: when that capability is kept, as in nspawn.
DENIED_GROUPS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "@clock": (
        "CAP_SYS_TIME",
        (
            "adjtimex",
            "clock_adjtime",
            "clock_adjtime64",
            "clock_settime",
            "clock_settime64",
            "settimeofday",
        ),
    ),
    "@module": ("CAP_SYS_MODULE", ("delete_module", "finit_module", "init_module")),
    "@raw-io": (
        "CAP_SYS_RAWIO",
        ("ioperm", "iopl", "pciconfig_iobase", "pciconfig_read", "pciconfig_write"),
    ),
    "@memlock": ("CAP_IPC_LOCK", ("mlock", "mlock2", "mlockall", "munlock", "munlockall")),
    "@cpu-emulation": (None, ("modify_ldt", "subpage_prot", "switch_endian", "vm86", "vm86old")),
    "@keyring": (None, ("add_key", "keyctl", "request_key")),  # the keyring is not namespaced
    "@obsolete": (
        None,
        (
            "_sysctl",
            "afs_syscall",
            "bdflush",
            "break",
            "create_module",
            "ftime",
            "get_kernel_syms",
            "getpmsg",
            "gtty",
            "idle",
            "lock",
            "mpx",
            "prof",
            "profil",
            "putpmsg",
            "query_module",
            "security",
            "sgetmask",
            "ssetmask",
            "stime",
            "stty",
            "sysfs",
            "tuxcall",
            "ulimit",
            "uselib",
            "ustat",
            "vserver",
        ),
    ),
    "@pkey": (None, ("pkey_alloc", "pkey_free", "pkey_mprotect")),
    "@swap": (None, ("swapoff", "swapon")),
    "@debug": (
        None,
        ("lookup_dcookie", "perf_event_open", "pidfd_getfd", "rtas", "sys_debug_setcontext"),
    ),
    # single system calls nspawn excludes knowingly
    "bpf": (None, ("bpf",)),  # bpffs is not namespaced
    "fanotify": (None, ("fanotify_init", "fanotify_mark")),
    "kexec": (None, ("kexec_file_load", "kexec_load")),
    "nfsservctl": (None, ("nfsservctl",)),
    "open_by_handle_at": (None, ("open_by_handle_at",)),
    "quotactl": (None, ("quotactl",)),
    # allowed only with the capability that makes them useful
    "acct": ("CAP_SYS_PACCT", ("acct",)),
    "ptrace": ("CAP_SYS_PTRACE", ("ptrace", "process_vm_readv", "process_vm_writev")),
    "reboot": ("CAP_SYS_BOOT", ("reboot",)),  # in a PID namespace: ends the machine only
    "syslog": ("CAP_SYSLOG", ("syslog",)),
    "vhangup": ("CAP_SYS_TTY_CONFIG", ("vhangup",)),
}

#: Groups a ``SystemCallFilter=`` line may name, with their members.
SYSCALL_GROUPS: dict[str, tuple[str, ...]] = {
    name: calls for name, (_cap, calls) in DENIED_GROUPS.items() if name.startswith("@")
}
SYSCALL_GROUPS["@reboot"] = ("kexec_file_load", "kexec_load", "reboot")
SYSCALL_GROUPS["@privileged-host"] = tuple(  # everything above: handy for "~@privileged-host"
    sorted({c for _cap, calls in DENIED_GROUPS.values() for c in calls})
)

AF_NETLINK = 16
NETLINK_AUDIT = 9

# --- errors -------------------------------------------------------------------


class SecurityError(OSError):
    """A restriction could not be applied (the runtime reports it and fails the start)."""


# --- parsing (definition keys) ------------------------------------------------


def normalize_capability(name: str) -> str:
    """``sys_time``, ``SYS_TIME``, ``cap_sys_time`` → ``CAP_SYS_TIME``."""
    upper = name.strip().upper()
    if not upper.startswith("CAP_"):
        upper = "CAP_" + upper
    if upper not in CAPABILITIES:
        raise InvalidInput(f"unknown capability {name!r} (e.g. CAP_NET_ADMIN, CAP_SYS_TIME)")
    return upper


def parse_capabilities(text: str) -> list[str]:
    """A ``Capability=`` / ``DropCapability=`` value: space- or comma-separated
    names, or ``all``. Returns normalized names (``["all"]`` stays as is)."""
    words = text.replace(",", " ").split()
    if not words:
        raise InvalidInput("expected capability names, e.g. CAP_NET_ADMIN, or all")
    if any(w.lower() == "all" for w in words):
        if len(words) > 1:
            raise InvalidInput("'all' cannot be combined with capability names")
        return ["all"]
    return sorted({normalize_capability(w) for w in words})


def _check_syscall_name(name: str) -> None:
    if name.startswith("@"):
        if name not in SYSCALL_GROUPS:
            raise InvalidInput(
                f"unknown system call group {name!r} (known: {', '.join(sorted(SYSCALL_GROUPS))})"
            )
        return
    if not name or not all(c.isalnum() or c == "_" for c in name) or not name.isascii():
        raise InvalidInput(f"invalid system call name {name!r}")


def parse_syscall_filter(text: str) -> str:
    """A ``SystemCallFilter=`` value, nspawn's ``--system-call-filter`` syntax:
    ``NAME|@GROUP …`` allows what the default filter refuses, ``~NAME|@GROUP …``
    refuses more. Returns the value normalized (one space between words)."""
    value = text.strip()
    deny = value.startswith("~")
    words = value.removeprefix("~").split()
    if not words:
        raise InvalidInput("expected system call names or @groups, optionally after ~")
    for word in words:
        _check_syscall_name(word)
    return ("~" if deny else "") + " ".join(words)


def _expand(words: list[str]) -> set[str]:
    out: set[str] = set()
    for word in words:
        out.update(SYSCALL_GROUPS.get(word, (word,)) if word.startswith("@") else (word,))
    return out


def parse_private_users(text: str) -> str:
    """``PrivateUsers=``: ``pick`` (default), ``no``, or ``UID[:COUNT]``."""
    try:
        return userns.parse_spec(text).text
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


# --- the policy ---------------------------------------------------------------


_POLICY_FIELDS = {  # name: default
    "capabilities": tuple(sorted(NSPAWN_RETAINED)),  # the bounding set kept
    "no_new_privileges": True,
    "seccomp": True,
    "denied_syscalls": (),
    "last_cap": 40,
    "private_users": "no",  # the definition's PrivateUsers= (resolved by userns)
    "uid_base": None,  # set once a range is allocated (userns.allocate)
    "uid_count": 0,
    "notes": (),
}


class SecurityPolicy(
    namedtuple("SecurityPolicy", _POLICY_FIELDS, defaults=_POLICY_FIELDS.values())
):
    """Everything :func:`apply` needs, computed on the host before pivot_root.
    (A namedtuple: the runtime makes one on every start, and a dataclass costs
    ~0.3 ms to create.)"""

    __slots__ = ()

    def capability_mask(self) -> int:
        mask = 0
        for name in self.capabilities:
            number = CAPABILITIES[name]
            if number <= self.last_cap:
                mask |= 1 << number
        return mask

    def to_json(self) -> str:
        return json.dumps(self._asdict())

    @classmethod
    def from_json(cls, text: str) -> SecurityPolicy:
        data = json.loads(text)
        for key in ("capabilities", "denied_syscalls", "notes"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def kept_capabilities(
    add: list[str] | tuple[str, ...] = (),
    drop: list[str] | tuple[str, ...] = (),
    *,
    private_network: bool = True,
) -> frozenset[str]:
    kept = set(NSPAWN_RETAINED)
    if private_network:
        kept.add("CAP_NET_ADMIN")
    if "all" in add:
        kept = set(CAPABILITIES)
    else:
        kept.update(normalize_capability(c) for c in add)
    if "all" in drop:
        kept.clear()
    else:
        kept.difference_update(normalize_capability(c) for c in drop)
    return frozenset(kept)


def denied_syscalls(kept: frozenset[str], filters: list[str] | tuple[str, ...] = ()) -> set[str]:
    """nspawn's default refusals given the kept capabilities, then each
    ``SystemCallFilter=`` line in order (allow lines remove, ``~`` lines add)."""
    denied: set[str] = set()
    for _name, (cap, calls) in DENIED_GROUPS.items():
        if cap is None or cap not in kept:
            denied.update(calls)
    for line in filters:
        value = parse_syscall_filter(line)
        if value.startswith("~"):
            denied |= _expand(value[1:].split())
        else:
            denied -= _expand(value.split())
    return denied


def policy_for(definition, *, uid_base: int | None = None, uid_count: int = 0) -> SecurityPolicy:
    """The policy of a machine definition (duck-typed: keys a definition does
    not have yet take their defaults). Imports what :func:`apply` needs."""
    boot = bool(getattr(definition, "boot", False))
    network = getattr(definition, "network", None)
    mode = str(getattr(network, "mode", "none"))
    kept = kept_capabilities(
        getattr(definition, "capability", None) or (),
        getattr(definition, "drop_capability", None) or (),
        private_network=mode != "host",
    )
    nnp = getattr(definition, "no_new_privileges", None)
    filters = getattr(definition, "system_call_filter", None) or ()
    policy = SecurityPolicy(
        capabilities=tuple(sorted(kept)),
        no_new_privileges=(not boot) if nnp is None else bool(nnp),
        seccomp=True,
        denied_syscalls=tuple(sorted(denied_syscalls(kept, filters))),
        last_cap=last_cap(),
        private_users=str(getattr(definition, "private_users", None) or userns.DEFAULT),
        uid_base=uid_base,
        uid_count=uid_count,
    )
    return policy


# --- persistence (exec applies the policy the machine was started with) --------

POLICY_FILE = "security.json"


def write_state(runtime_dir: str | os.PathLike, policy: SecurityPolicy) -> None:
    directory = Path(runtime_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{POLICY_FILE}.tmp"
    tmp.write_text(policy.to_json())
    os.rename(tmp, directory / POLICY_FILE)


def read_state(runtime_dir: str | os.PathLike) -> SecurityPolicy | None:
    try:
        policy = SecurityPolicy.from_json((Path(runtime_dir) / POLICY_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return policy


# --- applying it (inside the container) ----------------------------------------

_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _seccomp():
    import ctypes.util

    find_library = ctypes.util.find_library
    # pyseccomp looks libc and libseccomp up with find_library, which runs
    # ldconfig (20-100 ms): name the sonames directly, fall back otherwise.
    ctypes.util.find_library = lambda name: _SONAMES.get(name) or find_library(name)
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: libseccomp.so not found
        raise SecurityError(
            f"seccomp needs pyseccomp and libseccomp ({exc}); "
            "pip install pyseccomp, apt-get install libseccomp2"
        ) from None
    finally:
        ctypes.util.find_library = find_library
    return pyseccomp


def _local_arches(sc) -> list[int]:
    """The native architecture and the compat ABIs its kernel may run (as
    systemd's SECCOMP_FOREACH_LOCAL_ARCH): a filter for x86-64 alone would let
    an i386 or x32 binary make the same calls under other numbers."""
    native = sc.system_arch()
    extra = {sc.Arch.X86_64: (sc.Arch.X86, sc.Arch.X32)}.get(native, ())
    return [native, *extra]


def compile_seccomp(
    denied: tuple[str, ...] | list[str], unknown: set[str] | None = None
) -> list[bytes]:
    """One BPF program per local architecture (native first), default allow,
    DENIED → EPERM, plus nspawn's NETLINK_AUDIT rule. Names this libseccomp
    does not know are skipped (as nspawn does) and added to UNKNOWN.

    Compiled on the host, loaded by :func:`restrict.load_bpf` in the container:
    PID 1 never needs libseccomp itself."""
    sc = _seccomp()
    unknown = set() if unknown is None else unknown
    programs = []
    for arch in _local_arches(sc):
        flt = sc.SyscallFilter(sc.ALLOW)
        try:
            if arch != sc.system_arch():
                flt.add_arch(arch)
                flt.remove_arch(sc.system_arch())
        except OSError:
            continue  # this libseccomp cannot build for that ABI
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.ALLOW)  # other arches: their own filter
        for name in denied:
            try:
                flt.add_rule(sc.ERRNO(errno.EPERM), name)
            except (OSError, ValueError):
                unknown.add(name)  # unknown to libseccomp, or absent on this ABI
        # socketcall-only ABIs cannot take the rule: nspawn skips it there too
        with contextlib.suppress(OSError, ValueError):
            flt.add_rule(
                sc.ERRNO(errno.EAFNOSUPPORT),
                "socket",
                sc.Arg(0, sc.EQ, AF_NETLINK),
                sc.Arg(2, sc.EQ, NETLINK_AUDIT),
            )
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        with os.fdopen(fd, "w+b") as buffer:
            flt.export_bpf(buffer)
            buffer.seek(0)
            programs.append(buffer.read())
    return programs


def load_seccomp(denied: tuple[str, ...] | list[str], *, no_new_privs: bool) -> list[str]:
    """Compile and load the filter into this process; returns the skipped names.
    Without no_new_privs the caller needs CAP_SYS_ADMIN (as with libseccomp)."""
    if no_new_privs:
        restrict.prctl(restrict.PR_SET_NO_NEW_PRIVS, 1)
    unknown: set[str] = set()
    for index, program in enumerate(compile_seccomp(denied, unknown)):
        try:
            restrict.load_bpf(program)
        except OSError as exc:
            if index == 0:
                raise SecurityError(str(exc)) from None
    return sorted(unknown)


def restrictions(policy: SecurityPolicy, cache_dir: str | os.PathLike | None = None) -> dict:
    """POLICY as :func:`restrict.apply`'s keyword arguments, seccomp compiled
    (through CACHE_DIR, see :func:`seccomp_programs`): plain data, computed on
    the host, applied inside (it crosses a pipe to the container's PID 1)."""
    programs = seccomp_programs(policy.denied_syscalls, cache_dir) if policy.seccomp else []
    return {
        "keep_mask": policy.capability_mask(),
        "last_cap": policy.last_cap,
        "no_new_privileges": policy.no_new_privileges,
        "seccomp_programs": programs,
    }


def apply(policy: SecurityPolicy) -> None:
    """Restrict the calling process (and so everything it execs) to POLICY."""
    restrict.apply(**restrictions(policy))


# --- compiled programs, cached -------------------------------------------------

CACHE_DIR = ".seccomp"  # under the runtime root (/run/pymachine): gone at boot
_CACHE_FORMAT = 1


def cache_dir(runtime_root: str | os.PathLike) -> Path:
    return Path(runtime_root) / CACHE_DIR


def _libseccomp_version() -> tuple[int, int, int] | None:
    """The version of the libseccomp that would compile (ctypes, no pyseccomp)."""
    import ctypes

    try:
        lib = ctypes.CDLL(_SONAMES["seccomp"])
    except OSError:
        return None
    lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
    version = lib.seccomp_version().contents
    return (version[0], version[1], version[2])


def _cache_key(denied: tuple[str, ...] | list[str]) -> str | None:
    """What the programs depend on: the denied names, the libseccomp that
    compiles them, the kernel and architecture they are compiled for."""
    version = _libseccomp_version()
    if version is None:
        return None
    uname = os.uname()
    return repr((_CACHE_FORMAT, version, uname.machine, uname.release, tuple(denied)))


def seccomp_programs(
    denied: tuple[str, ...] | list[str], cache_dir: str | os.PathLike | None = None
) -> list[bytes]:
    """:func:`compile_seccomp`, through a cache in CACHE_DIR when given.

    Compiling costs every start and every ``exec`` the import of pyseccomp
    (~3 ms warm, ~15 ms in a fresh CLI) and ~1 ms of libseccomp, for programs
    that only change with the policy, libseccomp or the kernel (the key).
    The directory is root's (0700) on the runtime tmpfs."""
    key = _cache_key(denied) if cache_dir is not None else None
    if key is None:
        return compile_seccomp(denied)
    import binascii  # a name for the entry: hashlib would cost ~4 ms (OpenSSL)

    name = f"{binascii.crc32(key.encode()):08x}"
    path = Path(cache_dir) / name
    try:  # the entry holds its whole key: a name shared by two keys is only a miss
        stored_key, programs = marshal.loads(path.read_bytes())
        if stored_key == key and all(isinstance(p, bytes) for p in programs):
            return list(programs)
    except (OSError, EOFError, ValueError, TypeError):
        pass
    programs = compile_seccomp(denied)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        tmp.write_bytes(marshal.dumps((key, programs)))
        os.rename(tmp, path)
    except OSError:
        pass  # a read-only or full /run: compile next time again
    return programs


def describe(policy: SecurityPolicy) -> dict[str, str]:
    """Short lines for ``status``."""
    dropped = sorted(set(CAPABILITIES) - set(policy.capabilities))
    users = (
        f"{policy.private_users} (host UIDs {policy.uid_base}-{policy.uid_base + policy.uid_count - 1})"
        if policy.uid_base is not None
        else "no (root inside is root outside)"
    )
    return {
        "Private users": users,
        "Capabilities dropped": " ".join(c.removeprefix("CAP_").lower() for c in dropped),
        "No new privileges": "yes" if policy.no_new_privileges else "no",
        "Seccomp": f"{len(policy.denied_syscalls)} system calls refused"
        if policy.seccomp
        else "off",
    }
