"""Confinement (issue 8): root inside a machine created with defaults cannot
reach the host. Each attempt runs as root inside (``pymachine exec``) and must
fail; each has a control run on the host side that succeeds, so a test cannot
pass because the attempt was broken rather than blocked.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.harness import require_tier1, skip_or_fail
from tests.harness.systemd_host import private_network_host

SLEEPER = ("/bin/sh", "-c", "while :; do sleep 1; done")
MARKER = f"/pymtest-host-marker-{uuid.uuid4().hex[:8]}"
HOST_SLEEP = "31337.25"  # a host process the machine must not see

ESCAPE_C = r"""
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
/* The classic chroot escape: chroot into a subdirectory without entering it,
   walk up from the old working directory, chroot there. */
int main(int argc, char **argv) {
    if (argc < 2) return 3;
    mkdir("pymtest-jail-x", 0700);
    if (chroot("pymtest-jail-x") != 0) { perror("chroot"); return 2; }
    for (int i = 0; i < 256; i++) chdir("..");
    if (chroot(".") != 0) { perror("chroot ."); return 2; }
    if (access(argv[1], F_OK) == 0) { puts("escaped"); return 0; }
    puts("contained");
    return 1;
}
"""


def inside(host, name: str, script: str, *, input: str | None = None):
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script, check=False, input=input)


def _escape_helper() -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        skip_or_fail("gcc is needed to build the static chroot-escape helper (apt-get install gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "escape.c"), Path(tmp, "escape")
        src.write_text(ESCAPE_C)
        cp = subprocess.run(
            [gcc, "-static", "-O2", "-o", str(out), str(src)], capture_output=True, text=True
        )
        if cp.returncode:
            skip_or_fail(f"cannot build a static helper (libc6-dev?): {cp.stderr.strip()}")
        return out.read_bytes()


@pytest.fixture(scope="module")
def systemd_host(tmp_path_factory):
    """This module's own host (it shadows the session's), with a network namespace
    of its own: ``confined`` is a machine with every default, a bridged one, and its
    bridge, veth, nft table and ip_forward must not land on the CI machine itself."""
    require_tier1()
    with private_network_host(tmp_path_factory.mktemp("confinement-host"), "pymconf") as host:
        yield host


@pytest.fixture(scope="module")
def tiny_image(systemd_host) -> str:
    systemd_host.pymachine("bootstrap", "--distro", "busybox", "tiny")
    return "tiny"


@pytest.fixture(scope="module")
def confined(systemd_host, tiny_image):
    """One machine created with every default (bridge network, PrivateUsers=pick…)."""
    host = systemd_host
    name = f"confined-{os.getpid() % 1000}"
    host.pymachine("create", name, "--image", tiny_image, "--", *SLEEPER)
    try:
        host.pymachine("start", name)
        helper = base64.b64encode(_escape_helper()).decode()
        cp = inside(
            host, name, "base64 -d > /pymtest-escape && chmod 755 /pymtest-escape", input=helper
        )
        assert cp.returncode == 0, cp.stderr
        host.run(["sh", "-c", f"echo host > {MARKER}"])
        sleeper = host.run(
            f"setsid sleep {HOST_SLEEP} </dev/null >/dev/null 2>&1 & echo $!"
        ).stdout.strip()
        yield {"name": name, "sleeper": sleeper, "helper": helper}
    finally:
        host.run(["sh", "-c", f"pkill -f 'sleep {HOST_SLEEP}'; rm -f {MARKER}"], check=False)
        host.pymachine("stop", name, check=False)
        host.pymachine("remove", name, check=False)


def _openable_host_device(host) -> tuple[str, str]:
    """A block device of the host that root there can open: (MAJOR, MINOR)."""
    out = host.run(
        "cd /root && for d in /sys/block/*; do set -- $(tr : ' ' < $d/dev); "
        "mknod pymtest-probe b $1 $2 2>/dev/null && (: < pymtest-probe) 2>/dev/null "
        "&& { echo $1 $2; rm -f pymtest-probe; break; }; rm -f pymtest-probe; done",
        check=False,
    ).stdout.split()
    if len(out) != 2:
        skip_or_fail("the host has no block device that root can open (a sandboxed machine?)")
    return out[0], out[1]


# --- each attempt: (script inside, blocked?) and (control on the host, worked?) ---


def _mknod(host, machine):
    major, minor = _openable_host_device(host)  # the control: it opens on the host
    attempt = inside(
        host, machine["name"], f"mknod /pymtest-disk b {major} {minor} && : < /pymtest-disk"
    )
    return attempt.returncode != 0, True, attempt


def _host_has(host, path: str) -> bool:
    """Some kernels lack a file (CONFIG_MAGIC_SYSRQ, CONFIG_PROC_KCORE off): the
    attempt inside must fail all the same; only the host-side control is moot."""
    return host.run(["test", "-e", path], check=False).returncode == 0


def _sysrq(host, machine):
    attempt = inside(host, machine["name"], "echo h > /proc/sysrq-trigger")
    if not _host_has(host, "/proc/sysrq-trigger"):
        return attempt.returncode != 0, True, attempt
    control = host.run("test -w /proc/sysrq-trigger", check=False)
    return attempt.returncode != 0, control.returncode == 0, attempt


def _core_pattern(host, machine):
    # the classic escape: a piped core_pattern runs a program as root on the host
    attempt = inside(
        host, machine["name"], "echo '|/pymtest-escape' > /proc/sys/kernel/core_pattern"
    )
    control = host.run("test -w /proc/sys/kernel/core_pattern", check=False)
    return attempt.returncode != 0, control.returncode == 0, attempt


def _kcore(host, machine):
    script = "head -c 16 /proc/kcore | wc -c"
    attempt = inside(host, machine["name"], script)
    if not _host_has(host, "/proc/kcore"):
        return attempt.stdout.strip() in ("", "0"), True, attempt
    control = host.run(script, check=False)
    return attempt.stdout.strip() in ("", "0"), control.stdout.strip() == "16", attempt


def _kallsyms(host, machine):
    script = "head -c 64 /proc/kallsyms | wc -c"
    attempt = inside(host, machine["name"], script)
    control = host.run(script, check=False)
    return attempt.stdout.strip() in ("", "0"), control.stdout.strip() == "64", attempt


def _remount_sys(host, machine):
    attempt = inside(host, machine["name"], "mount -o remount,rw /sys")
    control = host.run(
        "mkdir -p /run/pymtest-sys && unshare -m -n sh -c "
        "'mount -t sysfs -o ro sysfs /run/pymtest-sys && mount -o remount,rw /run/pymtest-sys'",
        check=False,
    )
    return attempt.returncode != 0, control.returncode == 0, attempt


def _clock(host, machine):
    attempt = inside(host, machine["name"], "date -s 2001-01-01 >/dev/null 2>&1; date +%Y")
    status = host.run("cat /proc/self/status").stdout
    caps = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
    unfiltered = re.search(r"Seccomp:\s*0\b", status) is not None
    # the control is that the host *could* set it (CAP_SYS_TIME, no filter), not doing it
    return attempt.stdout.strip() != "2001", bool(caps & (1 << 25)) and unfiltered, attempt


def _host_process(host, machine):
    pid = machine["sleeper"]
    attempt = inside(
        host,
        machine["name"],
        f"kill -9 {pid} 2>/dev/null; grep -l {HOST_SLEEP.replace('.', '[.]')} /proc/[0-9]*/cmdline 2>/dev/null",
    )
    control = host.run(f"kill -0 {pid} && grep -l {HOST_SLEEP} /proc/{pid}/cmdline", check=False)
    return (
        HOST_SLEEP not in attempt.stdout and "/proc" not in attempt.stdout,
        (control.returncode == 0),
        attempt,
    )


def _host_links(host, machine):
    attempt = inside(host, machine["name"], "ls /sys/class/net; ip -o link | cut -d: -f2")
    host_links = set(host.run("ls /sys/class/net").stdout.split()) - {"lo"}
    seen = {word.strip().split("@")[0] for word in attempt.stdout.split()}
    return not (seen & host_links) and seen <= {"lo", "host0"}, bool(host_links), attempt


def _host_cgroups(host, machine):
    attempt = inside(host, machine["name"], "grep ^0:: /proc/self/cgroup; ls /sys/fs/cgroup")
    control = host.run("grep ^0:: /proc/self/cgroup; ls /sys/fs/cgroup").stdout
    lines = attempt.stdout.split()
    blocked = (
        attempt.returncode == 0
        and lines[:1] == ["0::/"]
        and not {"system.slice", "machine.slice", "init.scope"} & set(lines)
    )
    return blocked, "system.slice" in control and "machine.slice" in control, attempt


def _kernel_module(host, machine):
    script = "insmod /etc/passwd"
    attempt = inside(host, machine["name"], script)
    control = host.run(f"busybox {script}", check=False)
    # the host's attempt reaches the module loader (which rejects a non-ELF file);
    # inside, it must be refused before that
    refused = attempt.returncode != 0 and "not permitted" in attempt.stderr.lower()
    return (
        refused,
        control.returncode != 0 and "not permitted" not in control.stderr.lower(),
        attempt,
    )


def _chroot_escape(host, machine):
    attempt = inside(host, machine["name"], f"cd / && /pymtest-escape {MARKER}")
    jail = "/var/tmp/pymtest-jail"
    host.run(f"mkdir -p {jail}")
    host.run(f"base64 -d > {jail}/escape && chmod 755 {jail}/escape", input=machine["helper"])
    control = host.run(f"cd {jail} && chroot {jail} /escape {MARKER}", check=False)
    return (
        attempt.returncode != 0 and "escaped" not in attempt.stdout,
        control.returncode == 0 and "escaped" in control.stdout,
        attempt,
    )


ATTEMPTS = {
    "mknod-host-disk": _mknod,
    "write-sysrq-trigger": _sysrq,
    "write-core-pattern": _core_pattern,
    "read-kcore": _kcore,
    "read-kallsyms": _kallsyms,
    "remount-sys-rw": _remount_sys,
    "set-clock": _clock,
    "see-signal-host-process": _host_process,
    "see-host-links": _host_links,
    "see-host-cgroups": _host_cgroups,
    "load-kernel-module": _kernel_module,
    "chroot-escape": _chroot_escape,
}


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
def test_attempt_fails_inside(systemd_host, confined, attempt):
    blocked, control_ok, cp = ATTEMPTS[attempt](systemd_host, confined)
    assert control_ok, f"{attempt}: the host-side control did not work, so the test proves nothing"
    assert blocked, (
        f"{attempt} succeeded inside the machine\n--- stdout ---\n{cp.stdout}\n"
        f"--- stderr ---\n{cp.stderr}"
    )


# --- the confinement itself ---------------------------------------------------


def _status(host, name: str) -> dict[str, str]:
    out = inside(host, name, "cat /proc/self/status /proc/self/uid_map").stdout
    fields = dict(
        line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" ")
    )
    fields = {k: v.strip() for k, v in fields.items()}
    fields["uid_map"] = out.strip().splitlines()[-1].split()
    return fields


def test_capabilities_seccomp_and_nnp(systemd_host, confined):
    status = _status(systemd_host, confined["name"])
    bounding = int(status["CapBnd"], 16)
    for cap in (16, 17, 25, 33, 34, 39):  # SYS_MODULE, SYS_RAWIO, SYS_TIME, MAC_ADMIN, SYSLOG, BPF
        assert not bounding & (1 << cap), f"capability {cap} is in the bounding set"
    assert bounding & (1 << 21)  # SYS_ADMIN stays, as in nspawn (over the machine's namespaces)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_root_inside_is_an_unprivileged_range_outside(systemd_host, confined):
    host = systemd_host
    name = confined["name"]
    base, count = _status(host, name)["uid_map"][1:3]
    assert int(base) >= 0x80000 and int(count) == 65536
    assert inside(host, name, "echo x > /pymtest-owned").returncode == 0
    upper = f"/var/lib/pymachine/machines/{name}/upper/pymtest-owned"
    assert host.run(["stat", "-c", "%u:%g", upper]).stdout.strip() == f"{base}:{base}"
    # the image itself is shared and unchanged: still owned by host root
    assert host.run(["stat", "-c", "%u", "/var/lib/machines/tiny/bin"]).stdout.strip() == "0"
    # and looks like root's own files inside
    assert inside(host, name, "stat -c %u /bin").stdout.strip() == "0"


def test_two_machines_never_share_a_range(systemd_host, confined, tiny_image):
    host = systemd_host
    other = f"confined-b-{os.getpid() % 1000}"
    host.pymachine("create", other, "--image", tiny_image, "--network", "none", "--", *SLEEPER)
    try:
        host.pymachine("start", other)
        a = _status(host, confined["name"])["uid_map"]
        b = _status(host, other)["uid_map"]
        a_base, b_base, count = int(a[1]), int(b[1]), int(a[2])
        assert a_base + count <= b_base or b_base + count <= a_base
    finally:
        host.pymachine("stop", other, check=False)
        host.pymachine("remove", other, check=False)
