"""``pymachine -H [USER@]HOST``: how another host is reached.

D-Bus calls travel over systemd's D-Bus-over-SSH transport, the address
``sd_bus_open_system_remote`` builds for ``systemctl -H``: sd-bus runs ``ssh
-xT -- HOST systemd-stdio-bridge`` and speaks D-Bus over its stdio, so the
other host's pymachined sees (and polkit authorizes) the ssh user. Verbs that
need a terminal run the other host's ``pymachine`` under ``ssh -t``.
"""

from __future__ import annotations

import os
import re
import shlex

from machined.errors import InvalidInput

# [USER@]HOST[:PORT]: what ssh takes as a destination, nothing it could read as an option
_HOST = re.compile(r"(?:[A-Za-z0-9._-]+@)?(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])")
_ADDRESS_SAFE = frozenset(
    "-_/.\\*" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def validate_host(host: str) -> str:
    if not _HOST.fullmatch(host) or host.startswith("-"):
        raise InvalidInput(f"invalid host {host!r}: use [USER@]HOST")
    return host


def _escape(value: str) -> str:
    """A D-Bus address value: bytes outside the safe set as %XX (the spec's escaping)."""
    return "".join(
        c if c in _ADDRESS_SAFE else "".join(f"%{b:02x}" for b in c.encode()) for c in value
    )


def bus_address(host: str) -> str:
    """The ``unixexec:`` address of HOST's system bus, as sd-bus builds it for -H."""
    argv = ["ssh", "-xT", "--", validate_host(host), "systemd-stdio-bridge"]
    return "unixexec:path=ssh," + ",".join(f"argv{i}={_escape(a)}" for i, a in enumerate(argv) if i)


def ssh_argv(host: str, remote: list[str]) -> list[str]:
    """ssh running REMOTE on HOST (each word quoted for the remote shell), with a
    pty when we have a terminal, as ``machinectl -H … shell`` would need."""
    tty = "-t" if os.isatty(0) else "-T"
    return ["ssh", "-x", tty, "--", validate_host(host), shlex.join(remote)]
