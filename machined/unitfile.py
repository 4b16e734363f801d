"""A reader and writer for systemd-style ``[Section]`` / ``Key=Value`` files.

Hand-written rather than configparser because the format needs repeated keys
(``Port=`` twice), keeps order, and every error must name the file and line.
"""

from __future__ import annotations

import contextlib
import os
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


def parse(text: str, path: str = "<string>") -> UnitFile:
    unit = UnitFile(path)
    current: list[Entry] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
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
        current.append(Entry(key.strip(), value.strip(), number))
    return unit


def render(sections: dict[str, list[tuple[str, str]]]) -> str:
    parts = []
    for name, entries in sections.items():
        if not entries:
            continue
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
