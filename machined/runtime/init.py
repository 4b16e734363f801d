"""pymachine's PID 1 for application containers: the Python side of it.

The init itself is ``pymachine-init`` (``pymachine-init.c`` beside this file,
built with the package): it behaves like tini / catatonit / systemd-nspawn's
stub PID 1, reaps every zombie, forwards every signal, follows systemd's
power signals (poweroff, reboot = restart the payload) and exits with the
payload's status (128+N when killed by signal N). It is C because it is the
one process kept per running machine; Python sets the container up and
confines it, then execs it (:func:`command_line`).

This module is imported by the container's first processes before
``pivot_root``: ``os`` and ``_signal`` only.
"""

from __future__ import annotations

import _signal as signal
import os

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BINARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pymachine-init")

#: Blocked before the init is exec'd, so that none is lost on the way: all of
#: them. The init waits for every signal but the synchronous ones, which it
#: unblocks; which signal means what is its business alone (pymachine-init.c).
WATCHED = signal.valid_signals()


def missing() -> str | None:
    """Why ``pymachine-init`` cannot run (the runtime asks before it starts
    anything), or None."""
    if os.access(BINARY, os.X_OK):
        return None
    return (
        f"{BINARY} is missing: it is built when pymachine is installed "
        "(pip install, which needs a C compiler and a static libc: gcc, libc6-dev)"
    )


def open_binary() -> int:
    """An fd on ``pymachine-init``, opened on the host before the container
    pivots into its root (the init is exec'd through it, never copied in)."""
    return os.open(BINARY, os.O_RDONLY | os.O_CLOEXEC)


def command_line(
    argv: list[str],
    *,
    working_directory: str = "/",
    uid: int = 0,
    gid: int = 0,
    groups: list[int] | None = None,
    terminal: bool = False,
    stop_timeout: float = 10.0,
) -> list[str]:
    """``pymachine-init``'s argv for a payload (the payload's environment is the init's own)."""
    line = ["pymachine-init", "--stop-timeout", repr(float(stop_timeout))]
    line += ["--chdir", working_directory or "/"]
    if uid or gid:
        line += ["--uid", str(uid), "--gid", str(gid)]
        if groups:
            line += ["--groups", ",".join(str(group) for group in groups)]
    if terminal:
        line.append("--terminal")
    return [*line, "--", *argv]


def notify_arguments(fds: list[int]) -> list[str]:
    """The flags for the notify socket, the ready FIFO, the forward socket and
    the health record (or -1) that PID 1 received (runtime/notify.py); they stay open across
    its exec, and the init marks them close-on-exec for the payload."""
    notify_fd, ready_fd, forward_fd, health_fd = fds
    for fd in fds:
        if fd >= 0:
            os.set_inheritable(fd, True)
    flags = ["--notify-fd", str(notify_fd), "--ready-fd", str(ready_fd)]
    flags += ["--forward-fd", str(forward_fd)] if forward_fd >= 0 else []
    return flags + (["--health-fd", str(health_fd)] if health_fd >= 0 else [])


def exit_status(wait_status: int) -> int:
    """A wait status as a shell would report it: the code, or 128+N if killed by N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)
