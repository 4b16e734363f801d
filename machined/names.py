"""Validation of machine and image names, shared by every verb.

Rules follow systemd-machined: at most 64 characters of ``[a-zA-Z0-9-_.]``,
usable as a hostname, so never empty, never ``.``/``..``, and never starting
with ``-`` (it would read as an option) or ``.`` (hidden, and ``..`` escapes).
"""

from __future__ import annotations

import re

from machined.errors import InvalidInput

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check(kind: str, name: str) -> str:
    if not name:
        raise InvalidInput(f"invalid {kind} name '': must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"invalid {kind} name '{name[:20]}…': {len(name)} characters, at most {MAX_NAME_LENGTH}"
        )
    if not name.isascii() or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use letters, digits, '-', '_' and '.', "
            "not starting with '-' or '.'"
        )
    return name


def validate_machine_name(name: str) -> str:
    return _check("machine", name)


def validate_image_name(name: str) -> str:
    return _check("image", name)


def validate_snapshot_name(name: str) -> str:
    return _check("snapshot", name)
