"""What the runtime (the unit's ExecStart, ``python -I -S``) imports on its way
to the hand-over: every module here costs every start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
# as machines.runtime_command() gives it: ours first, then where pystemd is
PATH = [ROOT, *(entry for entry in sys.path if entry)]

# The runtime's modules, the intermediate's and PID 1's, and the machined client.
START_PATH = (
    "machined.runtime.__main__, machined.runtime.supervisor, machined.runtime.leader, "
    "machined.runtime.container, machined.runtime.linux, machined.runtime.restrict, "
    "machined.registry, machined.dbus"
)


def _loaded(code: str, watched: list[str]) -> list[str]:
    out = subprocess.check_output(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path[:0] = {PATH!r}; {code}; "
            f"print([m for m in {watched!r} if m in sys.modules])",
        ],
        text=True,
        cwd="/",
    )
    return eval(out)  # noqa: S307 — our own print of a list of names


def test_the_start_path_imports_no_dataclasses_and_no_resource_parsing() -> None:
    """dataclasses (~1 ms, and ~0.3 ms per class made), inspect (its docstrings),
    signal's enums and machined.properties (the runtime parses no [Resources])."""
    watched = ["dataclasses", "inspect", "typing", "signal", "machined.properties"]
    assert _loaded(f"import {START_PATH}", watched) == []


def test_reading_a_definition_imports_no_dataclasses() -> None:
    code = (
        "from machined.definition import from_text; "
        "from_text('m', '[Machine]\\nImage=i\\n[Exec]\\nCommand=/bin/sh -c x\\n"
        "[Files]\\nBind=/a:/b:ro\\n[Network]\\nPort=8080:80\\n')"
    )
    assert _loaded(code, ["dataclasses", "inspect", "machined.properties"]) == []


def test_a_start_s_unit_settings_import_no_dataclasses() -> None:
    """The CLI builds the unit's properties on every start (machine_settings)."""
    code = (
        "from machined.properties import machine_settings, to_properties; "
        "to_properties(machine_settings('m', {'MemoryMax': '1G'}, 10.0, ['/bin/true'], {}))"
    )
    assert _loaded(code, ["dataclasses", "inspect"]) == []
