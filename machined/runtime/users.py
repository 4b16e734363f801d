"""Resolve ``User=`` against the *container's* /etc/passwd and /etc/group.

Parsed by hand, not with ``pwd``: after pivot_root the host's NSS modules may
still be loaded, and the container's files are the only truth.
"""

from __future__ import annotations

from collections import namedtuple


class User(namedtuple("User", "uid gid home shell name groups", defaults=((),))):
    """A resolved ``User=`` (a namedtuple: the container's set-up imports no dataclasses)."""

    __slots__ = ()


def _entries(path: str) -> list[list[str]]:
    try:
        with open(path) as handle:
            return [
                line.rstrip("\n").split(":")
                for line in handle
                if line.strip() and not line.startswith("#")
            ]
    except OSError:
        return []


def resolve(spec: str | None) -> User:
    """``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID``; LookupError if unknown."""
    if not spec:
        spec = "root"
    user_part, _, group_part = spec.partition(":")
    passwd = _entries("/etc/passwd")
    entry = next(
        (e for e in passwd if len(e) >= 7 and (e[0] == user_part or e[2] == user_part)), None
    )
    if entry is None:
        if not user_part.isdigit():
            raise LookupError(f"user {user_part!r} not found in the machine's /etc/passwd")
        user = User(int(user_part), int(user_part), "/", "/bin/sh", user_part)
    else:
        user = User(int(entry[2]), int(entry[3]), entry[5] or "/", entry[6] or "/bin/sh", entry[0])
    groups = _entries("/etc/group")
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
