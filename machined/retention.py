"""Retention rules for scheduled snapshots and backups: which to keep, which to prune.

A rule is a comma-separated list such as ``7d,4w,12m`` (``--keep``), read as
restic's ``--keep-daily 7 --keep-weekly 4 --keep-monthly 12``:

* ``Nh``, ``Nd``, ``Nw``, ``Nm``, ``Ny``: the newest item of each of the N most
  recent hours, days, ISO weeks, months or years *that have an item* (a
  machine that was off for a week does not lose its older dailies);
* ``N`` alone: the N newest items.

An item is kept when any term keeps it; the others are pruned. Terms are
independent (one item may count for the daily and the weekly term), so what
a rule keeps can be worked out by hand, term by term. Periods are calendar
periods of the times given (the caller passes local times).

Pure logic, no I/O: the scheduler applies it to the items it made itself
(never to snapshots a user named).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from machined.errors import InvalidInput

#: term unit -> the calendar period of a time, as a comparable key
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "h": lambda t: (t.year, t.month, t.day, t.hour),
    "d": lambda t: (t.year, t.month, t.day),
    "w": lambda t: tuple(t.isocalendar()[:2]),
    "m": lambda t: (t.year, t.month),
    "y": lambda t: (t.year,),
}
UNIT_WORDS = {"h": "hour", "d": "day", "w": "week", "m": "month", "y": "year", "": "newest"}
_TERM_RE = re.compile(r"([0-9]{1,6})([hdwmy]?)")


class Term(NamedTuple):
    count: int
    unit: str  # "" = the newest COUNT items

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


class Rule(NamedTuple):
    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)


def parse_rule(text: str) -> Rule:
    """``7d,4w,12m`` -> Rule; a clear InvalidInput for anything else."""
    terms = []
    seen = set()
    for raw in text.split(","):
        part = raw.strip().lower()
        match = _TERM_RE.fullmatch(part)
        if not match:
            raise InvalidInput(
                f"invalid retention term {raw.strip()!r} in {text!r}: "
                "use N followed by h, d, w, m or y (e.g. 7d,4w,12m), or N for the N newest"
            )
        term = Term(int(match.group(1)), match.group(2))
        if term.count < 1:
            raise InvalidInput(f"invalid retention term {raw.strip()!r}: the count must be >= 1")
        if term.unit in seen:
            raise InvalidInput(f"invalid retention rule {text!r}: '{term.unit or 'N'}' twice")
        seen.add(term.unit)
        terms.append(term)
    return Rule(tuple(terms))


def kept_by_term(items: Sequence[tuple[str, datetime]], term: Term) -> list[str]:
    """The names TERM keeps among ITEMS ((name, time) pairs, any order)."""
    newest_first = sorted(items, key=lambda item: (item[1], item[0]), reverse=True)
    if not term.unit:
        return [name for name, _ in newest_first[: term.count]]
    period = PERIODS[term.unit]
    kept: list[str] = []
    last = None
    for name, when in newest_first:
        key = period(when)
        if key != last:
            if len(kept) == term.count:
                break
            kept.append(name)
            last = key
    return kept


def select(items: Iterable[tuple[str, datetime]], rule: Rule) -> tuple[list[str], list[str]]:
    """(kept, pruned) names of ITEMS under RULE, each newest first."""
    items = list(items)
    keep: set[str] = set()
    for term in rule.terms:
        keep.update(kept_by_term(items, term))
    ordered = [n for n, _ in sorted(items, key=lambda i: (i[1], i[0]), reverse=True)]
    return [n for n in ordered if n in keep], [n for n in ordered if n not in keep]
