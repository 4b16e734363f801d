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

Loaded by the container's PID 1 (:mod:`machined.runtime.leader`), a fresh
interpreter that stays alive for the machine's lifetime: every module imported
here is memory paid per machine, so only ``os``, ``_signal`` (``signal``
without its enum classes, ~1 MB) and ``time``.
"""

from __future__ import annotations

import _signal as signal
import os
import sys
import time

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
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RT = signal.SIGRTMIN
POWEROFF = {RT + 3, RT + 4, RT + 13, RT + 14}
REBOOT = {RT + 5, RT + 6, RT + 15, RT + 16}
WATCHED = set(FORWARDED) | POWEROFF | REBOOT | {signal.SIGCHLD, signal.SIGALRM}


class Payload:
    """What to run as the machine's payload (a plain class: no dataclasses in PID 1)."""

    def __init__(
        self,
        argv: list[str],
        environment: dict[str, str] | None = None,
        working_directory: str = "/",
        uid: int = 0,
        gid: int = 0,
        groups: list[int] | None = None,
        terminal: bool = False,  # attached to the user's terminal (pymachine run)
    ) -> None:
        self.argv = argv
        self.environment = environment or {}
        self.working_directory = working_directory
        self.uid = uid
        self.gid = gid
        self.groups = groups or []
        self.terminal = terminal


def exit_status(wait_status: int) -> int:
    """A wait status as a shell would report it: the code, or 128+N if killed by N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _exec(argv: list[str], environment: dict[str, str]) -> None:
    """execvpe(3) by hand: ``os.execvpe`` imports ``warnings``, which PID 1
    cannot load after pivot_root. Searches the payload's PATH, as a shell does."""
    name = argv[0]
    if "/" in name:
        os.execve(name, argv, environment)
    denied: OSError | None = None
    for directory in environment.get("PATH", DEFAULT_PATH).split(":"):
        try:
            os.execve(f"{directory or '.'}/{name}", argv, environment)
        except PermissionError as exc:
            denied = exc
        except (FileNotFoundError, NotADirectoryError):
            pass
    raise denied or FileNotFoundError(name)


def _spawn(payload: Payload) -> int:
    pid = os.fork()
    if pid:
        return pid
    status = 127
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
        _exec(payload.argv, payload.environment)
    except FileNotFoundError:
        print(f"pymachine-init: {payload.argv[0]}: command not found", file=sys.stderr)
    except PermissionError as exc:
        status = 126
        print(f"pymachine-init: {payload.argv[0]}: {exc.strerror}", file=sys.stderr)
    except BaseException as exc:  # never fall back into PID 1's code in this child
        status = 126
        print(f"pymachine-init: cannot start {payload.argv[0]}: {exc}", file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(status)


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
    try:  # noqa: SIM105 — contextlib would load collections/functools into PID 1
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
