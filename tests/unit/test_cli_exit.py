"""The ``pymachine`` program exits through :func:`machined.cli.run` (no
interpreter finalization): what it printed must still all arrive, with the
verb's exit code, and a reader that goes away early is no error."""

from __future__ import annotations

import os
import subprocess
import sys


def _pymachine(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYMACHINE_ROOT": kwargs.pop("root")}
    return subprocess.run(
        [sys.executable, "-m", "machined", *args], capture_output=True, text=True, env=env, **kwargs
    )


def test_output_and_exit_code_of_a_verb_arrive_whole(tmp_path):
    (tmp_path / "var/lib/machines").mkdir(parents=True)
    for index in range(300):  # more than a pipe buffer's worth of output, buffered until exit
        (tmp_path / f"var/lib/machines/image-{index:03}").mkdir()
    listed = _pymachine("images", root=str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names == [f"image-{index:03}" for index in range(300)]


def test_an_error_keeps_its_exit_code_and_message(tmp_path):
    missing = _pymachine("image", "remove", "no-such-image", root=str(tmp_path))
    assert missing.returncode == 4
    assert missing.stderr.startswith("pymachine: ")


def test_a_reader_that_leaves_early_ends_it_quietly_as_sigpipe_would(tmp_path):
    (tmp_path / "var/lib/machines").mkdir(parents=True)
    for index in range(3000):
        (tmp_path / f"var/lib/machines/image-{index:04}").mkdir()
    env = {**os.environ, "PYMACHINE_ROOT": str(tmp_path)}
    result = subprocess.run(
        f'{sys.executable} -m machined images | head -n 1; echo "${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=env,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("NAME") and lines[-1] == "141", result  # 128 + SIGPIPE
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result


def test_a_missing_dependency_is_one_clear_line_and_exit_1() -> None:
    """Run by an interpreter without pymachine's dependencies (no site-packages)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'pymachine'; "
        "from machined.cli import run; run()"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, root, "list"], capture_output=True, text=True
    )
    assert result.returncode == 1, result
    assert result.stderr.startswith("pymachine: the Python package 'pystemd' is missing"), result
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
