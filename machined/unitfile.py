"""A reader and writer for systemd-style ``[Section]`` / ``Key=Value`` files.

Hand-written rather than configparser because the format needs repeated keys
(``Port=`` twice), keeps order, and every error must name the file and line.

One rule for what a line is, shared by the writer and every reader: a line
ends at ``\n`` and nowhere else (as systemd's own parser, which also takes
``\r\n``). ``str.splitlines()`` also breaks at ``\v \f \x1c-\x1e \x85
\u2028 \u2029``, so a value holding one of them turned into a second
``Key=`` line for that reader (a hostile image's ``Env`` became
``PrivateUsers=no``). The writer therefore refuses every character that any
reader (this one, an editor, a terminal showing the file) might take for a
break or a control: :func:`forbidden_character`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import namedtuple
from pathlib import Path

from machined.errors import InvalidInput

# A namedtuple and a plain class, not dataclasses: the runtime reads a
# definition on every start, and each dataclass costs ~0.3 ms to create.


class Entry(namedtuple("Entry", "key value line")):
    """One ``Key=value`` line and where it was read."""

    __slots__ = ()


class UnitFile:
    """A parsed file: its sections' entries, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sections: dict[str, list[Entry]] = {}
        self.section_lines: dict[str, int] = {}  # where each [Section] starts

    def error(self, where: Entry | int | None, message: str) -> InvalidInput:
        line = where.line if isinstance(where, Entry) else where
        return InvalidInput(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


# C0 controls but tab, DEL, C1 controls (U+0085 among them), the Unicode line
# and paragraph separators, and lone surrogates (what Python makes of bytes
# that are not UTF-8 in a command-line argument: the file could not hold them).
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# What a reader strips around a line: systemd's WHITESPACE, no more (Python's
# str.strip() would also eat U+001C-U+001F, U+0085, U+00A0, U+3000 …).
_BLANKS = " \t\r"


def forbidden_character(value: str) -> str | None:
    """The first character of ``value`` that a value in these files may not
    hold, or None."""
    match = _FORBIDDEN.search(value)
    return match.group() if match else None


def check_value(what: str, value: str) -> str:
    """Refuse a value no reader could read back as written."""
    bad = forbidden_character(value)
    if bad is None:
        return value
    if "\udc80" <= bad <= "\udcff":  # os.fsdecode's stand-in for a byte
        reason = f"byte {ord(bad) - 0xDC00:#04x} is not UTF-8"
    else:
        reason = f"control or line-break character U+{ord(bad):04X} is not allowed"
    raise InvalidInput(f"invalid {what} {value!r}: {reason}")


def parse(text: str, path: str = "<string>") -> UnitFile:
    unit = UnitFile(path)
    current: list[Entry] | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(_BLANKS)
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise InvalidInput(f"{path}:{number}: malformed section header {line!r}")
            current = unit.sections.setdefault(line[1:-1], [])
            unit.section_lines.setdefault(line[1:-1], number)
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"{path}:{number}: expected Key=Value, got {line!r}")
        if current is None:
            raise InvalidInput(f"{path}:{number}: {key.strip()}= outside of any [Section]")
        current.append(Entry(key.strip(_BLANKS), value.strip(_BLANKS), number))
    return unit


def render(sections: dict[str, list[tuple[str, str]]]) -> str:
    """The file's text; a value that :func:`check_value` refuses is an error
    here too, whoever forgot to check it."""
    parts = []
    for name, entries in sections.items():
        if not entries:
            continue
        for key, value in entries:
            check_value(f"{key}=", value)
        parts.append(f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in entries))
    return "\n".join(parts)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file + fsync + rename: a crash never leaves half a file."""
    import tempfile  # here: every reader of a definition imports this module (~2.4 ms)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
