"""Guest health (boot mode): the guest's own ``systemctl is-system-running``,
checked as ``HealthCmd=`` is in an app machine, with the same settings and
``HealthOnFailure=`` (pymachine-init.c runs an app machine's checks; a booted
machine's PID 1 is the image's systemd, so a child the runtime forks does).

``running`` passes; ``initializing`` and ``starting`` are still booting (no
failure, the start period's rule); ``degraded``, ``maintenance``, any other
answer and no answer within ``HealthTimeout=`` (a hung guest) fail. At
``HealthRetries=`` failures in a row the action goes through systemd: restart
and stop are the unit's own jobs (``RestartUnit``, ``StopUnit``), kill is a
SIGKILL to PID 1 (the unit fails). The record, in ``RUN/health``, is the
one ``status`` shows for app machines too.
"""

from __future__ import annotations

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
        answer = _ask(state, health.timeout)
        if answer == "running":
            streak, passed = 0, True
            _record(record, "healthy", 0, answer)
            continue
        if answer in BOOTING and not passed:
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
            _act(health.on_failure, streak, answer, state.leader, unit)
            return


def _ask(state, timeout: float) -> str:
    """The guest's is-system-running answer ("no answer" on a time-out)."""
    from machined.runtime.enter import ExecRequest, run_in_machine
    from machined.runtime.init import DEFAULT_PATH

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.dup2(write, 1)
        os.dup2(write, 2)
        request = ExecRequest(["systemctl", "is-system-running"])
        os._exit(run_in_machine(state, request, {"PATH": DEFAULT_PATH, "container": "pymachine"}))
    os.close(write)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0 and select.select([read], [], [], left)[0]:
            chunk = os.read(read, 4096)
            if not chunk:
                break
            output += chunk
        else:
            os.kill(child, signal.SIGKILL)
            output = b"no answer (timed out)"
    finally:
        os.close(read)
        os.waitpid(child, 0)
    return output.decode("utf-8", "replace").strip() or "no answer"


def _act(action: str, streak: int, answer: str, leader: int, unit: str) -> None:
    verb = {"kill": "killing", "restart": "restarting", "stop": "stopping"}[action]
    print(
        f"pymachine-runtime: guest health check failed {streak} times in a row: "
        f"{verb} the machine (is-system-running: {answer})",
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
