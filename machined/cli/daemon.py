"""The CLI's side of pymachined: one call on the system bus per verb.

Every verb that changes or reads a machine asks pymachined
(``org.pymachine.machine1``), as machinectl asks systemd-machined, so root and
a polkit-authorized user take the same path and get the same checks. Lean on
purpose (it is on every ``start``/``stop``/``list``): pystemd's sd-bus through
:mod:`machined.dbus`, no dbus-next, no asyncio.

Where pymachined is not installed (no ``pymachine install-units`` yet), or
``PYMACHINE_ROOT`` points the CLI at another tree than the daemon's, root runs
the library in-process as before (:func:`in_process`); anyone else gets one
line saying what to install.
"""

from __future__ import annotations

import os

from machined import daemon
from machined.errors import PymachineError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from machined.dbus import Bus

#: The bus cannot start pymachined: its activation file is not installed.
NOT_INSTALLED = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "DBusServiceUnknownError",  # pystemd's classes for the standard errors (machined.dbus)
    "DBusNameHasNoOwnerError",
)


class NotInstalled(PymachineError):
    """pymachined cannot be reached (root falls back to the library)."""


def in_process() -> bool:
    """Whether this call runs the library itself rather than asking pymachined:
    only root with another ``PYMACHINE_ROOT`` than the daemon's (tests, a
    second tree), ``PYMACHINE_NO_DAEMON=1`` (benchmarks of the old path), or
    root on a host where pymachined is not installed."""
    if os.environ.get("PYMACHINE_REMOTE"):  # -H: the other host's pymachined, always
        return False
    if os.geteuid() != 0:
        return False
    return bool(
        os.environ.get("PYMACHINE_ROOT")
        or os.environ.get("PYMACHINE_NO_DAEMON")
        # not installed: a call could only fail (a bus round trip, ~5 ms a verb)
        or not os.path.exists(daemon.ACTIVATION_FILE)
    )


_bus: Bus | None = None


#: sd-bus gives up on a call after 25 s; pymachined answers a stop when the
#: machine has stopped (StopTimeoutSec= may be longer) and the library bounds
#: its own waits (120 s a start, 300 s a stop).
CALL_TIMEOUT = "330s"


def bus() -> Bus:
    global _bus
    if _bus is None:
        from machined.dbus import Bus

        os.environ.setdefault("SYSTEMD_BUS_TIMEOUT", CALL_TIMEOUT)  # read by sd-bus
        interactive = _interactive()
        if interactive:
            _start_agent()
        _bus = Bus(interactive=interactive)
    return _bus


def _interactive() -> bool:
    """Let polkit ask for a password when a person is there to answer."""
    try:
        return os.isatty(0) and os.geteuid() != 0  # (root is always allowed)
    except OSError:
        return False


def _start_agent() -> None:
    """polkit's text agent for this process, as machinectl starts it: it asks
    on our terminal when an action needs a password. Waits until the agent is
    registered (it closes the notify descriptor), so the first call finds it."""
    import shutil
    import subprocess

    agent = shutil.which("pkttyagent")
    if agent is None:
        return
    # it goes when we go (we leave with os._exit: no clean-up runs)
    setpriv = shutil.which("setpriv")
    reaper = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
    reader, writer = os.pipe()
    argv = [agent, "--process", str(os.getpid()), "--notify-fd", str(writer), "--fallback"]
    try:
        subprocess.Popen([*reaper, *argv], pass_fds=(writer,), stdout=subprocess.DEVNULL)
    except OSError:
        os.close(reader)
        return
    finally:
        os.close(writer)
    os.read(reader, 1)  # EOF: registered (or it gave up)
    os.close(reader)


def _connected() -> Bus:
    """:func:`bus`; without a system bus at all (no systemd), root's calls run
    in-process (:class:`NotInstalled`)."""
    from machined.dbus import BusError

    try:
        return bus()
    except BusError as exc:
        if os.geteuid() == 0 and not os.environ.get("PYMACHINE_REMOTE"):
            raise NotInstalled(str(exc)) from None
        raise


def call(method: str, signature: str = "", args: list[Any] | tuple = (), **kw: Any) -> Any:
    """MANAGER.METHOD(ARGS): its reply body; a pymachine error for a D-Bus error."""
    from machined.dbus import BusError

    connection = _connected()
    try:
        return connection.call(
            daemon.BUS_NAME,
            daemon.MANAGER_PATH,
            daemon.MANAGER_INTERFACE,
            method,
            signature,
            list(args),
            **kw,
        )
    except BusError as exc:
        if exc.name in NOT_INSTALLED:
            if os.environ.get("PYMACHINE_REMOTE"):
                raise PymachineError(
                    f"pymachined is not installed on {os.environ['PYMACHINE_REMOTE']}: "
                    "run 'pymachine install-units' there as root"
                ) from None
            if os.geteuid() == 0:
                raise NotInstalled(str(exc)) from None
            raise PymachineError(
                "pymachined is not installed on this host: run 'pymachine install-units' as root"
            ) from None
        raise daemon.error_from(exc.name, str(exc)) from None


def errors(pairs: list[tuple[str, str]]) -> list[PymachineError | None]:
    """A batch's ``a(ss)`` answer as the library's list of errors."""
    return [daemon.error_from(name, message) if name else None for name, message in pairs]


def run_job(method: str, signature: str, args: list[Any], quiet: bool = False) -> int:
    """Start a job (``BootstrapImage``, ``ImportTar``), show its progress on
    stderr and wait for its ``JobRemoved``: its exit code, its error printed.
    Ctrl-C cancels it (the work is atomic: nothing is left behind)."""
    import sys

    ended: dict[int, tuple[str, int, str]] = {}
    b = _connected()
    b.match_signal(
        daemon.BUS_NAME,
        None,
        daemon.MANAGER_INTERFACE,
        "JobRemoved",
        lambda body: ended.__setitem__(body[0], (body[2], body[3], body[4])),
    )
    import signal

    def interrupt(_number: int, _frame: object) -> None:
        raise KeyboardInterrupt

    for number in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: the job is ours to cancel
        signal.signal(number, interrupt)
    # held until we know the job's id (and can cancel it); then delivered in the loop
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    lost: list[bool] = []  # pymachined went away (the job's work may still finish)
    b.match_signal(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "NameOwnerChanged",
        lambda body: lost.append(True) if body[0] == daemon.BUS_NAME and not body[2] else None,
    )
    try:
        job_id, path = call(method, signature, args)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise

    def progress(body: Any) -> None:
        changed = dict(body[1])
        if "Status" in changed and not quiet:
            print(changed["Status"], file=sys.stderr)

    b.match_signal(
        daemon.BUS_NAME, path, "org.freedesktop.DBus.Properties", "PropertiesChanged", progress
    )
    cancelled = unblocked = False
    while job_id not in ended:
        try:
            if not unblocked:
                unblocked = True
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            b.process_until(lambda: job_id in ended or bool(lost), 3600)
            if lost and job_id not in ended:
                raise PymachineError(
                    f"pymachined went away during the job ({path}): it may still finish; "
                    "see 'pymachine images'"
                )
        except KeyboardInterrupt:
            if not cancelled:
                cancelled = True
                b.call(daemon.BUS_NAME, path, "org.pymachine.machine1.Job", "Cancel")
    _result, code, message = ended[job_id]
    if code:
        print(f"pymachine: {message or 'the job failed'}", file=sys.stderr)
    return code
