"""Guest health (boot mode): the guest's own ``systemctl is-system-running``,
or its ``HealthCmd=``, checked as ``HealthCmd=`` is in an app machine, with
the same settings and ``HealthOnFailure=`` (pymachine-init.c runs an app
machine's checks; a booted machine's PID 1 is the image's systemd, so a
child the runtime forks does, entering the machine as ``pymachine exec``).

``running`` passes; ``initializing`` and ``starting`` are still booting (no
failure, the start period's rule); ``degraded``, ``maintenance``, any other
answer and no answer within ``HealthTimeout=`` (a hung guest) fail. A
``HealthCmd=`` (``/bin/sh -c``, as root of the guest) passes when it exits 0,
and fails otherwise or when it has not ended at ``HealthTimeout=``. At
``HealthRetries=`` failures in a row the action goes through systemd: restart
and stop are the unit's own jobs (``RestartUnit``, ``StopUnit``), kill is a
SIGKILL to PID 1 (the unit fails). The record, in ``RUN/health``, is the
one ``status`` shows for app machines too.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

from machined.runtime import notify

BOOTING = ("initializing", "starting")


def monitor(definition, state, runtime_dir: str, unit: str) -> None:
    """Fork the monitor of a booted machine (its PID 1 is STATE.leader); it
    ends with PID 1."""
    if os.fork():
        return
    code = 0
    try:
        _watch(definition.health, state, os.path.join(runtime_dir, notify.HEALTH), unit)
    except BaseException as exc:
        print(f"pymachine-runtime: guest health monitor: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        os._exit(code)


def _record(path: str, status: str, streak: int, output: str) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as handle:  # root's, as the init's record: the guest's answers
        handle.write(f"{status} {streak}\n{output}\n")
    os.rename(tmp, path)


def _watch(health, state, record: str, unit: str) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signal.valid_signals())
    pidfd = os.pidfd_open(state.leader)
    start_period_end = time.monotonic() + health.start_period
    streak, passed = 0, False
    _record(record, "starting", 0, "")
    wait = health.start_period
    while not select.select([pidfd], [], [], wait)[0]:
        wait = health.interval
        if health.command is not None:
            code, answer = _ask(state, ["/bin/sh", "-c", health.command], health.timeout)
            ok, booting = code == 0, False
        else:
            _, answer = _ask(state, ["systemctl", "is-system-running"], health.timeout)
            ok, booting = answer == "running", answer in BOOTING
        if ok:
            streak, passed = 0, True
            _record(record, "healthy", 0, answer)
            continue
        if booting and not passed:
            _record(record, "starting", streak, answer)
            continue
        if not passed and time.monotonic() < start_period_end:
            _record(record, "starting", streak, answer)
            continue
        streak += 1
        if streak < health.retries:
            _record(record, "healthy" if passed else "starting", streak, answer)
            continue
        _record(record, "unhealthy", streak, answer)
        if health.on_failure != "none":
            label = "is-system-running" if health.command is None else "last output"
            _act(health.on_failure, streak, f"{label}: {answer}", state.leader, unit)
            return


OUTPUT = 512  # bytes of a check's output kept, as pymachine-init keeps


def _ask(state, argv: list[str], timeout: float) -> tuple[int | None, str]:
    """ARGV run in the guest: its exit status (None: killed at TIMEOUT) and its
    output, on one line ("no answer" for none). The command runs in a process
    group of its own, killed as a whole at the time-out."""
    from machined.runtime.enter import ExecRequest, run_in_machine
    from machined.runtime.init import DEFAULT_PATH

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.dup2(write, 1)
        os.dup2(write, 2)
        env = {"PATH": DEFAULT_PATH, "container": "pymachine"}
        os._exit(run_in_machine(state, ExecRequest(argv), env))
    os.close(write)
    output, timed_out = b"", False
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0 and select.select([read], [], [], left)[0]:
            chunk = os.read(read, 4096)
            if not chunk:
                break
            output = (output + chunk)[:OUTPUT]
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
            output, timed_out = b"no answer (timed out)", True
    finally:
        os.close(read)
        _, status = os.waitpid(child, 0)
    text = " ".join(output.decode("utf-8", "replace").split()) or "no answer"
    return (None if timed_out else os.waitstatus_to_exitcode(status)), text


def _act(action: str, streak: int, why: str, leader: int, unit: str) -> None:
    verb = {"kill": "killing", "restart": "restarting", "stop": "stopping"}[action]
    print(
        f"pymachine-runtime: guest health check failed {streak} times in a row: "
        f"{verb} the machine ({why})",
        file=sys.stderr,
        flush=True,
    )
    if action == "kill":
        os.kill(leader, signal.SIGKILL)
        return
    from machined.dbus import Bus
    from machined.systemd import Systemd

    with Bus() as bus:
        systemd = Systemd(bus)
        if action == "restart":
            systemd.restart_unit(unit, wait=False)
        else:
            systemd.stop_unit(unit, wait=False)
