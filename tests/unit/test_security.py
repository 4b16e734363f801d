"""Unit tests of machined.runtime.security: parsing, the policy, and applying
it in a forked process (root only for the parts that need privileges)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from types import SimpleNamespace

import pytest

from machined.errors import InvalidInput
from machined.runtime import security
from machined.runtime.security import (
    CAPABILITIES,
    DENIED_GROUPS,
    NSPAWN_RETAINED,
    SecurityPolicy,
    denied_syscalls,
    kept_capabilities,
    parse_capabilities,
    parse_private_users,
    parse_syscall_filter,
    policy_for,
)


def _definition(**kw):
    base = {"boot": False, "network": SimpleNamespace(mode="none")}
    base.update(kw)
    return SimpleNamespace(**base)


# --- the tables ---------------------------------------------------------------


def test_capability_numbers_match_linux():
    assert CAPABILITIES["CAP_CHOWN"] == 0
    assert CAPABILITIES["CAP_SYS_ADMIN"] == 21
    assert CAPABILITIES["CAP_SYS_TIME"] == 25
    assert CAPABILITIES["CAP_SETFCAP"] == 31
    assert CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert sorted(CAPABILITIES.values()) == list(range(41))


def test_nspawn_default_set():
    assert len(NSPAWN_RETAINED) == 26
    for dropped in (
        "CAP_SYS_MODULE",
        "CAP_SYS_TIME",
        "CAP_SYS_RAWIO",
        "CAP_MAC_ADMIN",
        "CAP_MAC_OVERRIDE",
        "CAP_SYSLOG",
        "CAP_NET_ADMIN",
        "CAP_IPC_LOCK",
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_PACCT",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
    ):
        assert dropped not in NSPAWN_RETAINED
    assert set(CAPABILITIES) >= NSPAWN_RETAINED


def test_default_deny_list_covers_nspawns_exclusions():
    denied = denied_syscalls(frozenset(NSPAWN_RETAINED))
    for call in (
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "kexec_file_load",
        "swapon",
        "swapoff",
        "clock_settime",
        "settimeofday",
        "adjtimex",
        "iopl",
        "ioperm",
        "add_key",
        "keyctl",
        "request_key",
        "bpf",
        "perf_event_open",
        "open_by_handle_at",
        "fanotify_init",
        "quotactl",
        "acct",
        "syslog",
        "mlock",
    ):
        assert call in denied, call
    # kept capabilities keep their system calls (as in nspawn)
    for allowed in ("reboot", "ptrace", "vhangup", "mount", "chroot", "unshare", "setns"):
        assert allowed not in denied, allowed


def test_capability_couples_groups():
    kept = kept_capabilities(["CAP_SYS_TIME", "CAP_SYS_MODULE"])
    denied = denied_syscalls(kept)
    assert "clock_settime" not in denied and "init_module" not in denied
    assert "kexec_load" in denied  # not tied to a capability
    dropped = kept_capabilities(drop=["CAP_SYS_BOOT", "CAP_SYS_PTRACE"])
    assert {"reboot", "ptrace", "process_vm_readv"} <= denied_syscalls(dropped)


def test_groups_are_disjoint_from_what_every_payload_needs():
    every = {c for _cap, calls in DENIED_GROUPS.values() for c in calls}
    for needed in ("read", "write", "execve", "clone", "clone3", "openat", "mmap", "exit_group"):
        assert needed not in every


# --- parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CAP_NET_ADMIN", ["CAP_NET_ADMIN"]),
        ("net_admin sys_time", ["CAP_NET_ADMIN", "CAP_SYS_TIME"]),
        ("cap_sys_time,CAP_SYS_TIME", ["CAP_SYS_TIME"]),
        ("all", ["all"]),
    ],
)
def test_parse_capabilities(text, expected):
    assert parse_capabilities(text) == expected


@pytest.mark.parametrize("text", ["", "CAP_FLY", "all CAP_CHOWN", "sys-admin"])
def test_parse_capabilities_rejects(text):
    with pytest.raises(InvalidInput):
        parse_capabilities(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@clock", "@clock"),
        ("  ~ @keyring   mkdir ", "~@keyring mkdir"),
        ("swapon swapoff", "swapon swapoff"),
    ],
)
def test_parse_syscall_filter(text, expected):
    assert parse_syscall_filter(text) == expected


@pytest.mark.parametrize("text", ["", "~", "@nope", "open(", "rm -rf"])
def test_parse_syscall_filter_rejects(text):
    with pytest.raises(InvalidInput):
        parse_syscall_filter(text)


def test_syscall_filter_lines_apply_in_order():
    kept = frozenset(NSPAWN_RETAINED)
    denied = denied_syscalls(kept, ["@clock", "~mkdir @keyring", "keyctl"])
    assert "clock_settime" not in denied
    assert "mkdir" in denied and "add_key" in denied
    assert "keyctl" not in denied


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pick", "pick"),
        ("yes", "pick"),
        ("no", "no"),
        ("524288", "524288"),
        ("65536:1000", "65536:1000"),
    ],
)
def test_parse_private_users(text, expected):
    assert parse_private_users(text) == expected


@pytest.mark.parametrize("text", ["maybe", "-5", "1:0", "4294967295:2", "1:x"])
def test_parse_private_users_rejects(text):
    with pytest.raises(InvalidInput):
        parse_private_users(text)


# --- the policy ------------------------------------------------------------------


def test_policy_defaults_app_mode():
    policy = policy_for(_definition())
    assert policy.no_new_privileges is True
    assert "CAP_NET_ADMIN" in policy.capabilities  # own network namespace, as nspawn
    assert "CAP_SYS_MODULE" not in policy.capabilities
    assert "init_module" in policy.denied_syscalls
    assert policy.private_users == "pick"


def test_policy_boot_mode_and_host_network():
    policy = policy_for(_definition(boot=True, network=SimpleNamespace(mode="host")))
    assert policy.no_new_privileges is False  # an OS needs su/sudo
    assert "CAP_NET_ADMIN" not in policy.capabilities  # the host's network is not its own


def test_policy_keys():
    policy = policy_for(
        _definition(
            capability=["CAP_SYS_TIME"],
            drop_capability=["CAP_SYS_ADMIN"],
            system_call_filter=["~mkdir"],
            no_new_privileges=False,
            private_users="no",
        )
    )
    assert "CAP_SYS_TIME" in policy.capabilities and "CAP_SYS_ADMIN" not in policy.capabilities
    assert "clock_settime" not in policy.denied_syscalls and "mkdir" in policy.denied_syscalls
    assert policy.no_new_privileges is False and policy.private_users == "no"


def test_policy_mask_and_json_round_trip(tmp_path):
    policy = policy_for(_definition(), uid_base=524288, uid_count=65536)
    mask = policy.capability_mask()
    assert mask & (1 << CAPABILITIES["CAP_CHOWN"])
    assert not mask & (1 << CAPABILITIES["CAP_SYS_MODULE"])
    security.write_state(tmp_path, policy)
    assert security.read_state(tmp_path) == policy
    assert security.read_state(tmp_path / "missing") is None
    lines = security.describe(policy)
    assert "524288-589823" in lines["Private users"]
    assert "sys_module" in lines["Capabilities dropped"]


# --- applying it (forked, so the test process keeps its privileges) ----------------


def _in_child(func) -> int:
    """Run FUNC in a fork; its return value (an int) is the exit status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = func()
        except BaseException as exc:  # pragma: no cover - reported via the status
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _status_field(name: str) -> str:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (capabilities to drop)")


@needs_root
def test_apply_drops_bounding_set_and_sets_nnp():
    policy = policy_for(_definition())

    def child() -> int:
        security.apply(policy)
        bound = int(_status_field("CapBnd"), 16)
        eff = int(_status_field("CapEff"), 16)
        if bound & (1 << CAPABILITIES["CAP_SYS_MODULE"]) or eff & (1 << 25):
            return 1
        if not bound & (1 << CAPABILITIES["CAP_SYS_ADMIN"]):
            return 2
        if _status_field("NoNewPrivs") != "1" or _status_field("Seccomp") != "2":
            return 3
        return 0

    assert _in_child(child) == 0


@needs_root
def test_apply_blocks_denied_syscalls_with_eperm():
    policy = policy_for(_definition())
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"init_module": 175, "clock_settime": 227, "swapon": 167, "add_key": 248}

    def child() -> int:
        security.apply(policy)
        for name, number in nr.items():
            ctypes.set_errno(0)
            if libc.syscall(number, 0, 0, 0) != -1 or ctypes.get_errno() != errno.EPERM:
                os.write(2, f"{name} not refused\n".encode())
                return 1
        try:
            socket.socket(security.AF_NETLINK, socket.SOCK_RAW, security.NETLINK_AUDIT)
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                return 2
        else:
            return 3
        os.getpid()  # and ordinary calls still work
        return 0

    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers above are x86-64's")
    assert _in_child(child) == 0


@needs_root
def test_apply_seccomp_without_nnp_leaves_nnp_off():
    policy = policy_for(_definition(boot=True))

    def child() -> int:
        security.apply(policy)
        return 0 if _status_field("NoNewPrivs") == "0" and _status_field("Seccomp") == "2" else 1

    assert _in_child(child) == 0


def test_unknown_syscalls_are_skipped():
    policy = SecurityPolicy(denied_syscalls=("no_such_call_anywhere",), no_new_privileges=True)

    def child() -> int:
        return 0 if security.load_seccomp(policy.denied_syscalls, no_new_privs=True) else 1

    assert _in_child(child) == 0
