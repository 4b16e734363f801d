"""pymachine's PID 1 for application containers.

Behaves like tini / catatonit / systemd-nspawn's stub PID 1: reaps every
zombie, forwards signals to the payload, and exits with the payload's status
(128+N when it was killed by signal N). When the payload exits, whatever is
left gets SIGTERM, then SIGKILL after a grace period.

Power signals follow systemd's conventions (what machinectl sends):
SIGRTMIN+3/+4/+13/+14 halt/power off; SIGRTMIN+5/+6/+15/+16 reboot, and so
does SIGINT when no terminal is attached (machinectl reboot sends SIGINT; with
a terminal, SIGINT is the user's Ctrl-C and is forwarded). Reboot restarts the
payload inside the same container.

Runs as the forked runtime, so it imports nothing beyond ``os``/``signal``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
    signal.SIGTSTP,
)
RT = signal.SIGRTMIN
POWEROFF = {RT + 3, RT + 4, RT + 13, RT + 14}
REBOOT = {RT + 5, RT + 6, RT + 15, RT + 16}
WATCHED = set(FORWARDED) | POWEROFF | REBOOT | {signal.SIGCHLD, signal.SIGALRM}


@dataclass
class Payload:
    argv: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    working_directory: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    terminal: bool = False  # attached to the user's terminal (pymachine run)


def exit_status(wait_status: int) -> int:
    """A wait status as a shell would report it: the code, or 128+N if killed by N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _spawn(payload: Payload) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in WATCHED:
            signal.signal(sig, signal.SIG_DFL)
        if not payload.terminal:
            os.setsid()
        os.chdir(payload.working_directory)
        if payload.uid or payload.gid:
            os.setgroups(payload.groups)
            os.setgid(payload.gid)
            os.setuid(payload.uid)
        os.execvpe(payload.argv[0], payload.argv, payload.environment)
    except FileNotFoundError:
        print(f"pymachine-init: {payload.argv[0]}: command not found", file=sys.stderr)
        os._exit(127)
    except PermissionError as exc:
        print(f"pymachine-init: {payload.argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(126)
    except OSError as exc:
        print(f"pymachine-init: cannot start {payload.argv[0]}: {exc}", file=sys.stderr)
        os._exit(126)
    os._exit(127)  # unreachable


def _reap(main: int) -> int | None:
    """Reap every exited child; return the main payload's wait status if it exited."""
    status = None
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == main:
            status = wait_status


def _kill_all(sig: int) -> None:
    _signal(-1, sig)  # as PID 1, -1 is every process in the container but us


def _drain(grace: float) -> None:
    """SIGTERM everything left, SIGKILL after ``grace`` seconds, reap it all."""
    _kill_all(signal.SIGTERM)
    _kill_all(signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(-2)
        try:
            os.kill(-1, 0)
        except ProcessLookupError:
            return
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
    _kill_all(signal.SIGKILL)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def run(payload: Payload, *, stop_timeout: float = 10.0) -> int:
    """Be PID 1 until the payload ends; return the status to exit with."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    main = _spawn(payload)
    stopping_since: float | None = None
    rebooting = False
    while True:
        timeout = 1.0
        if stopping_since is not None:
            timeout = max(0.01, stopping_since + stop_timeout - time.monotonic())
        info = signal.sigtimedwait(WATCHED, timeout)
        if stopping_since is not None and time.monotonic() >= stopping_since + stop_timeout:
            _kill_all(signal.SIGKILL)  # the payload ignored the request: escalate
        if info is None:
            continue
        sig = info.si_signo
        if sig == signal.SIGCHLD:
            status = _reap(main)
            if status is None:
                continue
            if rebooting:
                _drain(stop_timeout)
                main = _spawn(payload)
                rebooting, stopping_since = False, None
                continue
            _drain(stop_timeout)
            return exit_status(status)
        if sig in POWEROFF or (sig in REBOOT) or (sig == signal.SIGINT and not payload.terminal):
            rebooting = sig not in POWEROFF
            stopping_since = time.monotonic()
            _signal(main, signal.SIGTERM)
            _signal(main, signal.SIGCONT)
            continue
        if sig == signal.SIGTERM and stopping_since is None:
            stopping_since = time.monotonic()
        _signal(main, sig)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
