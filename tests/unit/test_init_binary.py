"""pymachine-init, the C PID 1, run for real as PID 1 of a fresh PID namespace.

The tier-1 tests drive it inside machines (signals, orphans, reboot, drain);
these check its contract with :func:`machined.runtime.init.command_line`
directly, without a systemd host: milliseconds each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from machined.runtime import init
from tests.harness import skip_or_fail


@pytest.fixture(autouse=True)
def _root_and_unshare() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("needs root and unshare(1) for a PID namespace")


def as_pid1(argv: list[str], env: dict[str, str] | None = None, timeout: float = 20):
    """Run ``pymachine-init ARGV`` as PID 1 of a new PID namespace."""
    assert os.access(init.BINARY, os.X_OK), f"{init.BINARY} is not built (./dev/setup)"
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", init.BINARY, *argv[1:]],
        env=env if env is not None else {"PATH": init.DEFAULT_PATH},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_exit_status_of_the_payload_is_passed_on() -> None:
    result = as_pid1(init.command_line(["sh", "-c", "echo hello; exit 42"]))
    assert (result.returncode, result.stdout) == (42, "hello\n")


def test_a_payload_killed_by_a_signal_gives_128_plus_n() -> None:
    assert as_pid1(init.command_line(["sh", "-c", "kill -KILL $$"])).returncode == 128 + 9


def test_missing_command_is_127_and_says_so() -> None:
    result = as_pid1(init.command_line(["no-such-command"]))
    assert result.returncode == 127
    assert "no-such-command: command not found" in result.stderr


def test_a_directory_that_does_not_exist_is_126() -> None:
    result = as_pid1(init.command_line(["true"], working_directory="/no/such/dir"))
    assert result.returncode == 126
    assert "/no/such/dir" in result.stderr


def test_payload_runs_as_the_user_and_groups_and_in_the_directory_given() -> None:
    argv = init.command_line(
        ["sh", "-c", "id -u; id -g; id -G; pwd"],
        working_directory="/tmp",
        uid=65534,
        gid=65534,
        groups=[5, 6],
    )
    result = as_pid1(argv)
    assert result.returncode == 0, result.stderr
    uid, gid, groups, cwd = result.stdout.split("\n")[:4]
    assert (uid, gid, sorted(groups.split()), cwd) == (
        "65534",
        "65534",
        ["5", "6", "65534"],
        "/tmp",
    )


def test_payload_gets_the_environment_and_a_clean_signal_state() -> None:
    """Nothing blocked or ignored leaks from the Python that set the container up
    (Python ignores SIGPIPE: a payload must not, or `yes | head` never ends)."""
    argv = init.command_line(
        ["sh", "-c", "echo $GREETING; grep -E '^Sig(Blk|Ign)' /proc/self/status"]
    )
    result = as_pid1(argv, env={"PATH": init.DEFAULT_PATH, "GREETING": "hi"})
    lines = result.stdout.split("\n")
    assert lines[0] == "hi"
    assert "SigBlk:\t0000000000000000" in lines
    assert "SigIgn:\t0000000000000000" in lines


def test_leftover_processes_are_drained_when_the_payload_exits() -> None:
    """A background child that ignores SIGTERM is SIGKILLed after the stop timeout;
    one that does not ignore it goes at once (no fixed sleep before the exit)."""
    ignoring = "sh -c 'trap \"\" TERM; sleep 30' & sleep 0.3; exit 3"
    start = time.monotonic()
    result = as_pid1(init.command_line(["sh", "-c", ignoring], stop_timeout=1.0))
    held = time.monotonic() - start
    assert result.returncode == 3
    assert 1.0 <= held < 10, held  # waited for the stop timeout, then SIGKILL (not the 30 s sleep)

    result = as_pid1(init.command_line(["sh", "-c", "sleep 30 & exit 4"], stop_timeout=20))
    assert result.returncode == 4  # SIGTERM ended the sleep: well within the 20 s timeout


def test_it_refuses_to_run_outside_a_pid_namespace() -> None:
    """kill(-1, …) as anything but PID 1 would reach every process of the host."""
    result = subprocess.run([init.BINARY, "--", "true"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert "must run as PID 1" in result.stderr


def test_bad_usage_is_refused() -> None:
    for argv in (["pymachine-init"], ["pymachine-init", "--stop-timeout", "x", "--", "true"]):
        result = as_pid1(argv)
        assert result.returncode == 1 and "usage:" in result.stderr


def _pipe_for_init() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    return read_end, write_end


def test_service_init_starts_the_payload_after_the_handover_and_outlives_it() -> None:
    """Service mode: the payload starts once the runtime has exited (its pipe at
    EOF), and the init lives on for a moment, so that systemd reading the PID
    file finds it alive even when the payload is done at once."""
    read_end, write_end = _pipe_for_init()
    argv = init.command_line(["sh", "-c", "echo payload ran; exit 5"])
    argv[1:1] = ["--handover-fd", str(read_end)]
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", init.BINARY, *argv[1:]],
        pass_fds=(read_end,),
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": init.DEFAULT_PATH},
    )
    os.close(read_end)
    time.sleep(0.3)
    assert proc.poll() is None  # still waiting for the runtime
    handed_over = time.monotonic()
    os.close(write_end)
    out, _ = proc.communicate(timeout=20)
    lived = time.monotonic() - handed_over
    assert (proc.returncode, out) == (5, "payload ran\n")
    assert lived >= 0.1, lived


def test_the_init_relays_readiness_and_status_and_nothing_else(tmp_path) -> None:
    """Notify=yes: what the payload sends to $NOTIFY_SOCKET reaches systemd
    (the forward socket) as READY=1 / STATUS= / WATCHDOG=1 only — a payload
    may not move the unit's main PID or hand it descriptors — and the first
    READY=1 writes the byte the unit's ExecStartPost= waits for."""
    import socket
    import sys

    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind(str(tmp_path / "notify"))
    systemd, forward = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready_read, ready_write = os.pipe()
    fds = [listening.fileno(), ready_write, forward.fileno()]
    sender = (
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.sendto(b'MAINPID=1\\nREADY=1\\nSTATUS=up\\nFDSTORE=1\\nWATCHDOG=1\\nREADY=10', "
        "os.environ['NOTIFY_SOCKET'])\n"
        "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "print(sorted(os.listdir('/proc/self/fd')), flush=True)\n"
        "while not os.path.exists(os.environ['DONE']): time.sleep(0.01)\n"
    )
    argv = init.command_line([sys.executable, "-c", sender])
    argv[1:1] = ["--notify-fd", str(fds[0]), "--ready-fd", str(fds[1]), "--forward-fd", str(fds[2])]
    env = {"PATH": init.DEFAULT_PATH, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    env["DONE"] = str(tmp_path / "done")
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", init.BINARY, *argv[1:]],
        env=env,
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        systemd.settimeout(20)
        assert systemd.recv(4096) == b"READY=1\nSTATUS=up\nWATCHDOG=1\n"
        assert systemd.recv(4096) == b"READY=1\n"
        assert os.read(ready_read, 16) == b"R"  # once, for the first READY=1 only
    finally:
        (tmp_path / "done").touch()
        out, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    # stdio, listdir's and its socket: none of the init's three
    assert out.strip() == "['0', '1', '2', '3', '4']"
    os.set_blocking(ready_read, False)
    with pytest.raises(BlockingIOError):
        os.read(ready_read, 16)


@pytest.mark.parametrize("action, status", [("restart", 133), ("stop", 0), ("kill", 137)])
def test_health_check_failures_take_the_action(tmp_path, action: str, status: int) -> None:
    """HealthCmd=: failures in a row up to HealthRetries= make the machine
    unhealthy (recorded in --health-fd) and take HealthOnFailure='s action:
    133 (the unit's RestartForceExitStatus=) for restart, a clean stop, or
    everything killed."""
    record = tmp_path / "health"
    fd = os.open(record, os.O_RDWR | os.O_CREAT, 0o600)
    argv = init.command_line(["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done"])
    argv[1:1] = ["--health-fd", str(fd), "--health-cmd", "echo sick; exit 1"]
    argv[1:1] = [
        "--health-interval",
        "0.05",
        "--health-retries",
        "2",
        "--health-on-failure",
        action,
    ]
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", init.BINARY, *argv[1:]],
        env={"PATH": init.DEFAULT_PATH},
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=30,
    )
    os.close(fd)
    assert result.returncode == status, result.stderr
    assert record.read_text() == "unhealthy 2\nsick\n"
    verb = {"restart": "restarting", "stop": "stopping", "kill": "killing"}[action]
    assert f"health check failed 2 times in a row: {verb} the machine (last output: sick)" in (
        result.stderr
    )
