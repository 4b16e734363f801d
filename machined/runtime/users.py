"""Resolve ``User=`` against the *container's* /etc/passwd and /etc/group.

Parsed by hand, not with ``pwd``: after pivot_root the host's NSS modules may
still be loaded, and the container's files are the only truth.
"""

from __future__ import annotations

import os
import stat
from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class User(namedtuple("User", "uid gid home shell name groups", defaults=((),))):
    """A resolved ``User=`` (a namedtuple: the container's set-up imports no dataclasses)."""

    __slots__ = ()


MAX_SIZE = 4 << 20  # an /etc/passwd larger than this is no account database


def _read(path: str) -> str | None:
    """PATH's text (we are inside the machine, pivoted: its own file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(MAX_SIZE)
    except OSError:
        return None


def reader_in_root(root_fd: int) -> Callable[[str], str | None]:
    """A reader of files of the machine's root ROOT_FD from the host (the
    runtime, before PID 1 pivots): each path resolved inside the root
    (runtime/chase.py: an image's symlink never leads to a host file), a
    regular file only (a FIFO would block), opened non-blocking."""
    from machined.runtime import chase

    def read(path: str) -> str | None:
        try:
            found = chase.open_in_root(root_fd, path)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(found).st_mode):  # never open a device or FIFO
                return None
            fd = os.open(chase.fd_path(found), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        finally:
            os.close(found)
        try:
            with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
                return handle.read(MAX_SIZE)
        except OSError:
            return None

    return read


def _entries(path: str, read: Callable[[str], str | None]) -> list[list[str]]:
    text = read(path) or ""
    return [
        line.split(":") for line in text.split("\n") if line.strip() and not line.startswith("#")
    ]


def resolve(spec: str | None, read: Callable[[str], str | None] | None = None) -> User:
    """``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID``; LookupError if unknown.
    READ: a path's text (default: this process's own root, the machine's)."""
    read = read or _read
    if not spec:
        spec = "root"
    user_part, _, group_part = spec.partition(":")
    passwd = _entries("/etc/passwd", read)
    entry = next(
        (e for e in passwd if len(e) >= 7 and (e[0] == user_part or e[2] == user_part)), None
    )
    if entry is None:
        if not user_part.isdigit():
            raise LookupError(f"user {user_part!r} not found in the machine's /etc/passwd")
        user = User(int(user_part), int(user_part), "/", "/bin/sh", user_part)
    else:
        user = User(int(entry[2]), int(entry[3]), entry[5] or "/", entry[6] or "/bin/sh", entry[0])
    groups = _entries("/etc/group", read)
    gid = user.gid
    if group_part:
        match = next(
            (g for g in groups if len(g) >= 3 and (g[0] == group_part or g[2] == group_part)), None
        )
        if match is None and not group_part.isdigit():
            raise LookupError(f"group {group_part!r} not found in the machine's /etc/group")
        gid = int(match[2]) if match else int(group_part)
    supplementary = tuple(
        int(g[2]) for g in groups if len(g) >= 4 and g[2].isdigit() and user.name in g[3].split(",")
    )
    return User(user.uid, gid, user.home, user.shell, user.name, supplementary)


def group_id(name: str, read: Callable[[str], str | None] | None = None) -> int | None:
    """The GID of group NAME in the machine's /etc/group, or None."""
    for entry in _entries("/etc/group", read or _read):
        if len(entry) >= 3 and entry[0] == name and entry[2].isdigit():
            return int(entry[2])
    return None
