"""Only stdio, and the descriptors a user hands over on purpose, cross into a machine.

A process that enters a machine (``exec``'s command, ``run``'s container)
would otherwise inherit every descriptor its caller left open without
close-on-exec: after ``exec 7</etc; pymachine exec web -- …`` the command
could read ``/proc/self/fd/7/passwd``, and ``openat(7, "../..")`` climbs to the
host's root, whatever the machine's root is (the class of runc's
CVE-2024-21626). So the entering process closes everything above stdio first,
except the ``--preserve-fds N`` ones (3 … 3+N-1), as podman does.
Descriptors pymachine opens itself (D-Bus, pidfds, pipes, the init's binary)
are close-on-exec (Python's default), so no exec carries them in.

``os`` only: ``run`` calls this before it forks the container's first process.
"""

from __future__ import annotations

import os

FIRST = 3  # after stdin, stdout, stderr
_END = 2**31 - 1  # os.closerange's bound: close_range(2) up to the largest fd


def first_unopened(preserved: int) -> int | None:
    """The first of the PRESERVED descriptors (3 … 3+N-1) that is not open, if
    any: ``--preserve-fds`` hands over what its caller opened, never one of ours."""
    for fd in range(FIRST, FIRST + preserved):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    return None


def close_inherited(preserved: int = 0) -> None:
    """Close every descriptor above stdio but the PRESERVED ones that follow it
    (one close_range(2)), and let those reach what this process execs."""
    os.closerange(FIRST + preserved, _END)
    for fd in range(FIRST, FIRST + preserved):
        try:  # noqa: SIM105 — os only (see above)
            os.set_inheritable(fd, True)
        except OSError:  # not open (the CLI refuses that before: first_unopened)
            pass
