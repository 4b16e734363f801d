"""``create --dry-run`` and ``show [--json]``: the machine-readable way to
compare a wanted definition with a machine's (the Ansible collection uses
both), with nothing made by a dry run and pymachine's one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _pm(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYMACHINE_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "machined", *args], capture_output=True, text=True, env=env
    )


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_prints_the_definition_and_makes_nothing(tmp_path):
    (tmp_path / "var/lib/machines/tiny").mkdir(parents=True)
    before = _tree(tmp_path)
    out = _pm(tmp_path, "create", "web", "--image", "tiny", "-p", "MemoryMax=64M",
              "--network", "none", "-E", "MODE=prod", "--dry-run", "--", "/bin/sh", "-c", "echo hi")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Image=tiny\n" in out.stdout and "MemoryMax=64M\n" in out.stdout
    assert "Environment=MODE=prod\n" in out.stdout and "Mode=none\n" in out.stdout
    assert "Command=/bin/sh -c 'echo hi'\n" in out.stdout
    assert _tree(tmp_path) == before


def test_dry_run_refuses_a_bad_limit_in_one_line_with_exit_2(tmp_path):
    out = _pm(tmp_path, "create", "web", "--image", "tiny", "-p", "MemoryMax=lots", "--dry-run")
    assert out.returncode == 2
    assert out.stderr.startswith("pymachine: ") and len(out.stderr.splitlines()) == 1
    assert "MemoryMax" in out.stderr and out.stdout == ""


def test_show_reads_back_what_create_wrote(tmp_path):
    (tmp_path / "var/lib/machines/tiny").mkdir(parents=True)
    wanted = _pm(tmp_path, "create", "web", "--image", "tiny", "-p", "TasksMax=50", "--dry-run",
                 "--", "/bin/true")  # fmt: skip
    (tmp_path / "etc/pymachine").mkdir(parents=True)
    (tmp_path / "etc/pymachine/web.machine").write_text("# by hand\n" + wanted.stdout)
    shown = _pm(tmp_path, "show", "web")
    assert shown.returncode == 0 and shown.stdout == wanted.stdout  # comments dropped
    data = json.loads(_pm(tmp_path, "show", "web", "--json").stdout)
    assert data == {
        "name": "web",
        "path": str(tmp_path / "etc/pymachine/web.machine"),
        "definition": wanted.stdout,
    }


def test_show_of_a_missing_machine_is_exit_4(tmp_path):
    out = _pm(tmp_path, "show", "nosuch", "--json")
    assert out.returncode == 4 and out.stderr.startswith("pymachine: ") and out.stdout == ""


def test_replace_needs_an_existing_machine(tmp_path):
    (tmp_path / "var/lib/machines/tiny").mkdir(parents=True)
    out = _pm(tmp_path, "create", "web", "--image", "tiny", "--replace", "--", "/bin/true")
    assert out.returncode == 4 and not (tmp_path / "etc/pymachine/web.machine").exists()
