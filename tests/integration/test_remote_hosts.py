"""The two-host SSH fixture itself, and ``pymachine -H`` against a real sshd
(issue 18): the verbs act on the other host, never on this one."""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time

import pytest

pytestmark = pytest.mark.tier1


def active(host, unit: str) -> str:
    return host.run(["systemctl", "is-active", unit], check=False).stdout.strip()


def test_each_host_reaches_the_other_over_real_ssh(remote_hosts):
    assert remote_hosts.ssh("a", "other", "hostname").stdout.strip() == "b"
    assert remote_hosts.ssh("b", "other", "hostname").stdout.strip() == "a"
    # the real sshd: its unit in the host, listening on the veth address only
    for name, host in remote_hosts.hosts.items():
        assert active(host, "pymtest-sshd.service") == "active"
        listening = host.run(["ss", "-Hltn", "sport = :22"]).stdout
        assert remote_hosts.address(name) + ":22" in listening


def pm(host, *args: str, check: bool = True):
    return host.pymachine(*args, check=check)


def test_dash_h_lists_starts_stops_and_shows_the_other_hosts_machine(remote_hosts):
    a, b = remote_hosts.a, remote_hosts.b
    name = "h-remote1"
    pm(a, "-H", "root@other", "create", name, "--image", "tiny", "--network", "none",
       "-p", "MemoryMax=64M", "--", "/bin/sh", "-c", "while :; do sleep 1; done")  # fmt: skip
    try:
        # made on b, not on a
        assert b.run(["test", "-f", f"/etc/pymachine/{name}.machine"], check=False).returncode == 0
        assert a.run(["test", "-e", f"/etc/pymachine/{name}.machine"], check=False).returncode != 0
        pm(a, "-H", "root@other", "start", name)
        assert active(b, f"pymachine-{name}.service") == "active"
        listed = json.loads(pm(a, "-H", "root@other", "list", "--json").stdout)
        mine = {m["name"]: m for m in listed}
        assert mine[name]["state"] == "running"
        assert name not in pm(a, "list").stdout  # a's own list does not have it
        status = json.loads(pm(a, "-H", "root@other", "status", name, "--json").stdout)
        assert status["state"] == "running" and status["image"] == "tiny"
        out = pm(a, "-H", "root@other", "exec", name, "--", "hostname")
        assert out.stdout.strip() == name
        pm(a, "-H", "root@other", "stop", name)
        assert active(b, f"pymachine-{name}.service") != "active"
        gone = pm(a, "-H", "root@other", "status", name, check=False)
        assert gone.returncode == 3, gone  # not running, from b's pymachined
        missing = pm(a, "-H", "root@other", "status", "h-nosuch", check=False)
        assert missing.returncode == 4 and missing.stderr.startswith("pymachine: ")
        assert len(missing.stderr.strip().splitlines()) == 1
    finally:
        pm(b, "stop", name, check=False)
        pm(b, "remove", name, check=False)


def _read_until(fd: int, marker: bytes, timeout: float = 30.0) -> bytes:
    """What the terminal shows until MARKER (AssertionError with it if never)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"{marker!r} not shown; the terminal showed:\n{seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"terminal closed before {marker!r}:\n{seen!r}")
        seen += chunk
    return seen


def test_dash_h_shell_is_a_terminal_in_the_other_hosts_machine(remote_hosts):
    """``pymachine -H root@other shell NAME`` from a terminal: ssh -t, then the
    machine's shell on a pty of its own; typed lines run there."""
    a, b = remote_hosts.a, remote_hosts.b
    name = "h-shell1"
    pm(b, "create", name, "--image", "tiny", "--network", "none", "--",
       "/bin/sh", "-c", "while :; do sleep 1; done")  # fmt: skip
    pm(b, "start", name)
    master, slave = pty.openpty()
    try:
        proc = a.popen(
            [sys.executable, "-m", "machined", "-H", "root@other", "shell", name],
            env={"TERM": "xterm"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        # as a person would: wait for the prompt; answer the shell's cursor
        # position query as a terminal does (busybox ash's line editor asks)
        prompt = _read_until(master, b"# ")
        if b"\x1b[6n" in prompt:
            os.write(master, b"\x1b[1;1R")
        os.write(master, b"echo ON-$(hostname)-$((6*7)); tty\r")
        shown = _read_until(master, b"ON-" + name.encode() + b"-42")
        shown += _read_until(master, b"/dev/pts/")
        os.write(master, b"exit 7\r")
        assert proc.wait(timeout=30) == 7, shown
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
        pm(b, "stop", name, check=False)
        pm(b, "remove", name, check=False)
