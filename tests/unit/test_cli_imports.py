"""The hot verbs' imports: what ``start``/``stop``/``list`` load is paid on
every call, so modules they do not need must stay out (a fresh interpreter
each, as a real call)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NOT_NEEDED = ("shutil", "bz2", "lzma", "typing", "ast")  # ast: inspect, deferred


@pytest.mark.parametrize("verb", ["start", "stop", "list", "status"])
def test_a_hot_verb_loads_none_of_the_modules_it_does_not_need(verb: str) -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"  # what site loaded (.pth files) is not the verb's
        "from machined import cli\n"
        f"args = cli.build_parser({verb!r}).parse_args({[verb] + (['m'] if verb != 'list' else [])!r})\n"
        "from machined import machines, systemd\n"
        "machines.Machines()\n"
        f"print(sorted(m for m in {NOT_NEEDED!r} if m in set(sys.modules) - before))\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True, cwd=_root())
    assert out.strip() == "[]"


def test_help_is_wrapped_to_the_terminal_width_in_columns() -> None:
    env = {**os.environ, "COLUMNS": "40"}
    out = subprocess.check_output(
        [sys.executable, "-m", "machined", "stop", "--help"], text=True, env=env, cwd=_root()
    )
    assert max(len(line) for line in out.splitlines()) <= 40
    assert "show this help message" in out


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
