"""Output shared by all verbs: machinectl-like tables, JSON, human units."""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import
if TYPE_CHECKING:
    from typing import Any


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, legend: str = "") -> None:
    """Print rows under upper-case headers, columns padded like machinectl's."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    line = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    print(line.rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if legend and sys.stdout.isatty():
        print(f"\n{legend}")


def print_json(value: Any) -> None:
    import json  # here: list and status print tables far more often (~1 ms)

    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    units = ("B", "K", "M", "G", "T", "P", "E")
    number = float(value)
    for index, unit in enumerate(units):
        # Move up a unit when the rounded figure would read 1024.0 of this one.
        if round(number, 1) < 1024 or index == len(units) - 1:
            return f"{number:.0f}{unit}" if unit == "B" else f"{number:.1f}{unit}"
        number /= 1024
    return f"{value}B"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}min {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"
