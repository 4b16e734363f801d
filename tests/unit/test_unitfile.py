"""Pure-logic tests of machined.unitfile: parse, render, write_atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from machined import unitfile
from machined.errors import InvalidInput
from machined.unitfile import Entry, parse, render, write_atomic


def test_parse_sections_entries_and_lines() -> None:
    text = (
        "[Machine]\n"  # 1
        "Image=tiny\n"  # 2
        "\n"  # 3
        "[Network]\n"  # 4
        "Port=8080\n"  # 5
        "Port=udp:53\n"  # 6
    )
    unit = parse(text, "/x/a.machine")
    assert unit.path == "/x/a.machine"
    assert list(unit.sections) == ["Machine", "Network"]
    assert unit.sections["Machine"] == [Entry("Image", "tiny", 2)]
    assert unit.sections["Network"] == [Entry("Port", "8080", 5), Entry("Port", "udp:53", 6)]


def test_comments_and_blank_lines_are_skipped_but_counted() -> None:
    text = "# hash comment\n; semicolon comment\n\n   \n[S]\n  # indented comment\nK=v\n"
    unit = parse(text)
    assert unit.sections == {"S": [Entry("K", "v", 7)]}


def test_hash_inside_value_is_kept() -> None:
    unit = parse("[S]\nCommand=echo #not-a-comment ;nor this\n")
    assert unit.sections["S"][0].value == "echo #not-a-comment ;nor this"


def test_whitespace_around_key_and_value_is_stripped() -> None:
    unit = parse("[S]\n  Key  =  some value  \n")
    assert unit.sections["S"] == [Entry("Key", "some value", 2)]


def test_value_keeps_later_equals_and_may_be_empty() -> None:
    unit = parse("[S]\nEnvironment=A=b=c\nEmpty=\n")
    assert [(e.key, e.value) for e in unit.sections["S"]] == [
        ("Environment", "A=b=c"),
        ("Empty", ""),
    ]


def test_repeated_section_headers_merge_in_order() -> None:
    unit = parse("[A]\nX=1\n[B]\nY=2\n[A]\nX=3\n")
    assert [(e.key, e.value, e.line) for e in unit.sections["A"]] == [("X", "1", 2), ("X", "3", 6)]
    assert list(unit.sections) == ["A", "B"]


def test_empty_section_is_present() -> None:
    assert parse("[Empty]\n").sections == {"Empty": []}


def test_crlf_line_endings() -> None:
    unit = parse("[S]\r\nK=v\r\n")
    assert unit.sections == {"S": [Entry("K", "v", 2)]}


def test_key_outside_section_names_line() -> None:
    with pytest.raises(InvalidInput) as info:
        parse("# header comment\n\nImage=tiny\n[Machine]\n", "/x/a.machine")
    assert str(info.value) == "/x/a.machine:3: Image= outside of any [Section]"


@pytest.mark.parametrize(
    ("line", "shown"), [("[Machine", "'[Machine'"), ("[]", "'[]'"), ("[Machine]x", "'[Machine]x'")]
)
def test_malformed_header(line: str, shown: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse(f"[Ok]\nA=1\n{line}\n", "/x/a.machine")
    assert str(info.value) == f"/x/a.machine:3: malformed section header {shown}"


@pytest.mark.parametrize("line", ["just words", "=value", "  = value"])
def test_line_without_key_value(line: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse(f"[S]\n{line}\n", "/x/a.machine")
    assert str(info.value) == f"/x/a.machine:2: expected Key=Value, got {line.strip()!r}"


def test_default_path_in_errors() -> None:
    with pytest.raises(InvalidInput, match=r"^<string>:1: "):
        parse("K=v\n")


def test_error_helper_with_and_without_entry() -> None:
    unit = parse("[S]\nK=v\n", "/f")
    assert str(unit.error(unit.sections["S"][0], "boom")) == "/f:2: boom"
    assert str(unit.error(None, "boom")) == "/f: boom"
    assert isinstance(unit.error(None, "x"), InvalidInput)


def test_render_skips_empty_sections_and_separates_with_blank_line() -> None:
    text = render({"A": [("X", "1"), ("X", "2")], "Empty": [], "B": [("Y", "a b")]})
    assert text == "[A]\nX=1\nX=2\n\n[B]\nY=a b\n"


def test_render_nothing() -> None:
    assert render({}) == ""
    assert render({"A": []}) == ""


def test_render_parse_round_trip() -> None:
    sections = {"One": [("K", "v"), ("K", "w=x")], "Two": [("Z", "")]}
    parsed = parse(render(sections))
    assert {s: [(e.key, e.value) for e in es] for s, es in parsed.sections.items()} == sections


# --- write_atomic --------------------------------------------------------------------


def test_write_atomic_creates_parents_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep/er/file.conf"
    write_atomic(path, "hello\n")
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_write_atomic_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"
    write_atomic(path, "x", mode=mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_write_atomic_replaces_with_a_new_inode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old contents that are longer\n")
    os.chmod(path, 0o600)
    reader = open(path)  # noqa: SIM115 - kept open across the replacement on purpose
    try:
        before = path.stat().st_ino
        write_atomic(path, "new\n")
        assert path.read_text() == "new\n"
        assert path.stat().st_ino != before  # renamed over, not truncated in place
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert reader.read() == "old contents that are longer\n"  # old readers see whole old file
    finally:
        reader.close()
    assert os.listdir(tmp_path) == ["f"]


def test_write_atomic_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "bad \udcff surrogate")  # fails while writing the temp file
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["f"]


def test_write_atomic_failure_on_rename_cleans_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"

    def failing_rename(src, dst):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(unitfile.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(path, "x")
    assert os.listdir(tmp_path) == []
