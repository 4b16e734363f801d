"""machined.retention: what a --keep rule keeps, worked out by hand and against
a brute-force reading of the rule over many random histories."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from machined.errors import ExitCode, InvalidInput
from machined.retention import Rule, Term, kept_by_term, parse_rule, select


def at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M")


def items(*texts: str) -> list[tuple[str, datetime]]:
    return [(t, at(t)) for t in texts]


# --- parsing ----------------------------------------------------------------------------


def test_parse_the_issue_rule() -> None:
    assert parse_rule("7d,4w,12m") == Rule((Term(7, "d"), Term(4, "w"), Term(12, "m")))
    assert parse_rule(" 3 , 2H ,1y") == Rule((Term(3, ""), Term(2, "h"), Term(1, "y")))
    assert str(parse_rule("7d,4w,12m")) == "7d,4w,12m"


@pytest.mark.parametrize(
    "text", ["", ",", "7", "0d", "7x", "d", "-1d", "7d,", "7d,7d", "1.5d", "7 d", "7dd", "9999999d"]
)
def test_bad_rules_are_refused_with_exit_code_2(text: str) -> None:
    if text == "7":
        assert parse_rule(text) == Rule((Term(7, ""),))
        return
    with pytest.raises(InvalidInput) as caught:
        parse_rule(text)
    assert caught.value.exit_code == ExitCode.INVALID


# --- by hand ------------------------------------------------------------------------------


def test_daily_keeps_the_newest_of_each_day_that_has_one() -> None:
    history = items(
        "2026-01-01 01:00",
        "2026-01-01 23:00",
        "2026-01-02 12:00",
        "2026-01-05 08:00",  # a gap: 3rd and 4th have none
        "2026-01-05 09:00",
        "2026-01-06 00:00",
    )
    assert kept_by_term(history, Term(3, "d")) == [
        "2026-01-06 00:00",
        "2026-01-05 09:00",
        "2026-01-02 12:00",
    ]
    kept, pruned = select(history, parse_rule("3d"))
    assert pruned == ["2026-01-05 08:00", "2026-01-01 23:00", "2026-01-01 01:00"]


def test_weeks_are_iso_weeks_and_terms_are_independent() -> None:
    history = items(
        "2025-12-28 10:00",  # Sunday: ISO week 2025-52
        "2025-12-29 10:00",  # Monday: ISO week 2026-01 (of the new year's week)
        "2026-01-03 10:00",  # Saturday, same ISO week
        "2026-01-04 10:00",  # Sunday, same ISO week
    )
    assert kept_by_term(history, Term(2, "w")) == ["2026-01-04 10:00", "2025-12-28 10:00"]
    # 1d keeps the newest; 2w keeps it again (counted by both) and the older week's
    kept, pruned = select(history, parse_rule("1d,2w"))
    assert kept == ["2026-01-04 10:00", "2025-12-28 10:00"]
    assert pruned == ["2026-01-03 10:00", "2025-12-29 10:00"]


def test_months_years_hours_and_plain_counts() -> None:
    history = items(
        "2024-06-01 00:00",
        "2025-01-31 23:59",
        "2025-02-01 00:00",
        "2025-02-01 00:30",
        "2025-02-01 01:10",
    )
    assert kept_by_term(history, Term(2, "m")) == ["2025-02-01 01:10", "2025-01-31 23:59"]
    assert kept_by_term(history, Term(5, "y")) == ["2025-02-01 01:10", "2024-06-01 00:00"]
    assert kept_by_term(history, Term(2, "h")) == ["2025-02-01 01:10", "2025-02-01 00:30"]
    assert kept_by_term(history, Term(2, "")) == ["2025-02-01 01:10", "2025-02-01 00:30"]
    assert select([], parse_rule("7d")) == ([], [])


def test_the_issue_rule_over_a_year_of_dailies() -> None:
    start = datetime(2026, 1, 1, 3, 0)
    history = [(f"auto-{i:03d}", start + timedelta(days=i)) for i in range(365)]
    kept, pruned = select(history, parse_rule("7d,4w,12m"))
    last = start + timedelta(days=364)  # 2026-12-31 (a Thursday)
    assert last.date().isoformat() == "2026-12-31"
    expected = {f"auto-{i:03d}" for i in range(358, 365)}  # the last 7 days
    # the last 4 ISO weeks' newest: Thu 31 Dec, Sun 27 Dec, Sun 20 Dec, Sun 13 Dec
    expected |= {"auto-364", "auto-360", "auto-353", "auto-346"}
    # the 12 months' newest: the last day of each month
    month_ends = [30, 58, 89, 119, 150, 180, 211, 242, 272, 303, 333, 364]
    expected |= {f"auto-{i:03d}" for i in month_ends}
    assert set(kept) == expected
    assert len(kept) + len(pruned) == 365
    # 364 is daily, weekly and monthly; 360 daily and weekly: each counted once
    assert len(kept) == 7 + 2 + 11


# --- against a brute-force reading of the rule --------------------------------------------


def _brute(history: list[tuple[str, datetime]], term: Term) -> set[str]:
    """The rule read literally: group by period, take the N newest periods, and
    of each the newest item."""
    keys = {
        "h": lambda t: t.strftime("%Y%m%d%H"),
        "d": lambda t: t.strftime("%Y%m%d"),
        "w": lambda t: "{:04d}-{:02d}".format(*t.isocalendar()[:2]),
        "m": lambda t: t.strftime("%Y%m"),
        "y": lambda t: t.strftime("%Y"),
    }
    if not term.unit:
        return {n for n, _ in sorted(history, key=lambda i: (i[1], i[0]))[-term.count :]}
    groups: dict[str, list[tuple[datetime, str]]] = {}
    for name, when in history:
        groups.setdefault(keys[term.unit](when), []).append((when, name))
    newest_periods = sorted(groups, key=lambda k: max(groups[k]))[-term.count :]
    return {max(groups[k])[1] for k in newest_periods}


@pytest.mark.parametrize("seed", range(200))
def test_random_histories_match_the_literal_reading(seed: int) -> None:
    rng = random.Random(seed)
    start = datetime(2020, 1, 1) + timedelta(minutes=rng.randrange(10**6))
    history = []
    for i in range(rng.randrange(0, 60)):
        when = start + timedelta(minutes=rng.randrange(0, rng.choice([300, 10**4, 10**6])))
        history.append((f"s{i}", when))
    terms = rng.sample([Term(rng.randrange(1, 9), u) for u in ("h", "d", "w", "m", "y", "")], 3)
    kept, pruned = select(history, Rule(tuple(terms)))
    expected = set().union(*(_brute(history, t) for t in terms))
    assert set(kept) == expected
    assert set(pruned) == {n for n, _ in history} - expected
    assert not set(kept) & set(pruned)
