"""Pure-logic tests of machined.cli.output: tables and human units."""

from __future__ import annotations

import json

import pytest

from machined.cli.output import human_bytes, human_duration, print_json, print_table


def test_table_columns_are_aligned(capsys: pytest.CaptureFixture) -> None:
    print_table(
        ("name", "state", "memory"),
        [("web", "running", "12.0M"), ("database-01", "stopped", None)],
    )
    out = capsys.readouterr().out
    assert out == (
        "NAME         STATE    MEMORY\nweb          running  12.0M\ndatabase-01  stopped  -\n"
    )


def test_table_header_wider_than_values(capsys: pytest.CaptureFixture) -> None:
    print_table(("address", "tasks"), [("", 3), (None, 12)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["ADDRESS  TASKS", "-        3", "-        12"]


def test_table_columns_start_at_same_offset(capsys: pytest.CaptureFixture) -> None:
    rows = [("a", "bbbbbbbb", "c"), ("aaaaaa", "b", "cccc"), ("aa", "", "c")]
    print_table(("x", "y", "z"), rows)
    lines = capsys.readouterr().out.splitlines()
    offsets = {line.index(cell) for line, cell in zip(lines[1:], ("c", "cccc", "c"), strict=True)}
    assert offsets == {lines[0].index("Z")}
    assert all(line == line.rstrip() for line in lines)


def test_table_zero_is_not_a_dash(capsys: pytest.CaptureFixture) -> None:
    print_table(("tasks",), [(0,)])
    assert capsys.readouterr().out == "TASKS\n0\n"


def test_table_without_rows_prints_header(capsys: pytest.CaptureFixture) -> None:
    print_table(("name", "state"), [])
    assert capsys.readouterr().out == "NAME  STATE\n"


def test_table_legend_only_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    print_table(("name",), [("web",)], legend="1 machines listed.")
    assert "listed" not in capsys.readouterr().out


def test_table_row_of_wrong_width_is_an_error() -> None:
    with pytest.raises(ValueError):
        print_table(("a", "b"), [("only-one",)])


def test_print_json(capsys: pytest.CaptureFixture) -> None:
    print_json([{"name": "web", "memory": None, "z": 1, "a": 2}])
    out = capsys.readouterr().out
    assert out.endswith("}\n]\n")
    assert json.loads(out) == [{"name": "web", "memory": None, "z": 1, "a": 2}]
    assert out.index('"z"') < out.index('"a"')  # key order kept


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1.0K"),
        (1536, "1.5K"),
        (64 * 1024**2, "64.0M"),
        (int(2.5 * 1024**3), "2.5G"),
        (1024**3 + 1024**3 // 10 * 3, "1.3G"),
        (3 * 1024**4, "3.0T"),
        (5 * 1024**5, "5.0P"),
        (2048 * 1024**5, "2.0E"),
    ],
)
def test_human_bytes(value: int | None, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(("value", "text"), [(1024**2 - 1, "1.0M"), (1024**3 - 1, "1.0G")])
def test_human_bytes_just_below_boundary(value: int, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (0.9, "0s"),
        (59.9, "59s"),
        (60, "1min 0s"),
        (61, "1min 1s"),
        (3599, "59min 59s"),
        (3600, "1h 0min"),
        (3 * 3600 + 25 * 60 + 59, "3h 25min"),
        (86399, "23h 59min"),
        (86400, "1d 0h"),
        (90061, "1d 1h"),
        (400 * 86400, "400d 0h"),
    ],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text
