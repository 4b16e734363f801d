"""The stop's clean-up (``ExecStopPost=``): its command line, what it removes,
what it imports; a machine's nft rules found and deleted by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from machined.network import lifecycle, nft, state
from machined.paths import Paths
from machined.runtime import cleanup

NAME = "pymachine-unit-test-cleanup"

# --- nft: a machine's rules -------------------------------------------------------

LISTING = json.dumps(
    {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "pymachine", "handle": 1}},
            {"rule": {"chain": "ports", "handle": 7, "comment": "pymachine:web:tcp:8080:80"}},
            {"rule": {"chain": "ports", "handle": 8, "comment": "pymachine:webby:tcp:81:80"}},
            {"rule": {"chain": "ports", "handle": 9, "comment": "pymachine:web"}},
            {"rule": {"chain": "postrouting", "handle": 3}},
        ]
    }
)


def test_rules_of_a_machine_are_found_by_comment_exactly() -> None:
    listing = json.loads(LISTING)["nftables"]
    assert [(r.chain, r.handle) for r in nft.machine_rules(listing) if r.machine == "web"] == [
        ("ports", 7),
        ("ports", 9),
    ]
    assert [r for r in nft.machine_rules(listing) if r.machine == "db"] == []
    assert nft.parse_comment("pymachine:") is None and nft.parse_comment(7) is None


def test_remove_machine_lists_deletes_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[list[dict]] = []
    answers = [
        (True, LISTING),
        (False, "Error: Could not process rule"),
        (True, LISTING),
        (True, ""),
    ]

    def execute(commands: list[dict], backend: str | None = None) -> tuple[bool, str]:
        batches.append(commands)
        return answers.pop(0)

    monkeypatch.setattr(nft, "_execute", execute)
    assert nft.remove_machine("web") == 2
    listing = [{"list": {"table": {"family": "inet", "name": "pymachine"}}}]
    assert batches[0] == batches[2] == listing
    deletes = [
        {
            "delete": {
                "rule": {"family": "inet", "table": "pymachine", "chain": "ports", "handle": h}
            }
        }
        for h in (7, 9)
    ]
    assert batches[1] == batches[3] == deletes
    monkeypatch.setattr(
        nft, "_execute", lambda commands: (False, "Error: No such file or directory; did you mean")
    )
    assert nft.remove_machine("web") == 0


# --- cleanup: command line, run ---------------------------------------------------


def test_command_gives_the_clean_up_its_paths(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    record, ephemeral, state_file, pid_file = (str(p) for p in cleanup.targets("web", paths))
    assert record == str(state.state_file(paths, "web"))
    assert ephemeral == str(paths.machine_runtime("web") / cleanup.EPHEMERAL)
    assert pid_file == str(paths.pid_file("web"))
    script = cleanup.command("web", paths, ["python3", "-c", "X", "web", "--cleanup"])[2]
    assert f"'web' --cleanup {record} {ephemeral} {state_file} {pid_file}" in script.replace(
        "web --cleanup", "'web' --cleanup"
    )
    assert script.startswith(f"if [ -e {record} ] || [ -e {ephemeral} ]; then exec python3")


def test_run_removes_what_the_machine_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    record, ephemeral, *files = cleanup.targets("web", paths)
    for f in (record, *files):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    (ephemeral / "upper").mkdir(parents=True)
    done: list[str] = []
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    monkeypatch.setattr(
        lifecycle, "teardown", lambda name, p: done.append(f"teardown {name} {p.root}")
    )
    cleanup.run("web", str(record), str(ephemeral), [str(f) for f in files])
    assert done == [f"teardown web {tmp_path}"]
    assert not any(f.exists() for f in files) and not ephemeral.exists()
    done.clear()
    record.unlink()
    cleanup.run("web", str(record), str(ephemeral), [str(f) for f in files])  # idempotent
    assert done == []


def test_run_refuses_a_name_that_leaves_the_directory() -> None:
    with pytest.raises(SystemExit):
        cleanup.run("../etc", "/nonexistent", "/nonexistent", [])


def test_clean_up_without_a_network_record_is_light(tmp_path: Path) -> None:
    """What the clean-up imports where pymachined owns the network (no record
    here): nothing of the network code, no D-Bus client."""
    paths = Paths(tmp_path)
    record, ephemeral, *files = (str(p) for p in cleanup.targets(NAME, paths))
    os.makedirs(os.path.dirname(files[0]))
    for f in files:
        Path(f).write_text("{}")
    heavy = [
        "pathlib", "re", "json", "typing", "dataclasses", "socket", "threading",
        "contextlib", "shutil", "enum", "machined.paths", "machined.network",
        "pyroute2", "machined.dbus", "pystemd",
    ]  # fmt: skip
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from machined.runtime import cleanup; "
        "cleanup.run(*sys.argv[1:4], sys.argv[4:]); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.check_output(
        [sys.executable, "-I", "-S", "-c", code, root, NAME, record, ephemeral, *files],
        text=True,
    )
    assert out.strip() == "[]"
    assert not any(os.path.exists(f) for f in files)


def test_network_teardown_stays_the_function_after_every_submodule() -> None:
    """A submodule named like one of the package's lazy names would shadow it."""
    code = (
        "import importlib, pkgutil, machined.network as n; "
        "[importlib.import_module('machined.network.' + m.name) "
        "for m in pkgutil.iter_modules(n.__path__)]; "
        "print(all(callable(getattr(n, a)) for a in ('setup', 'teardown', 'release', 'gc')))"
    )
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "True"


def test_teardown_deletes_the_veth_even_when_nft_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths(tmp_path)
    state.write(paths, "web", {"host_ifname": "vm-web", "ports": ["tcp:8080:80"]})
    done: list[str] = []

    def refuse(machine: str) -> int:
        done.append("nft")
        raise nft.PymachineError("nft failed: busy")

    monkeypatch.setattr(nft, "remove_machine", refuse)
    monkeypatch.setattr(
        lifecycle, "delete_lingering_veth", lambda machine, ifname: done.append(ifname) or True
    )
    with pytest.raises(nft.PymachineError):
        lifecycle.teardown("web", paths)
    assert done == ["nft", "vm-web"] and state.read(
        paths, "web"
    )  # kept: gc and the next start retry
    monkeypatch.setattr(nft, "remove_machine", lambda machine: done.append("nft again") or 1)
    assert lifecycle.teardown("web", paths) is None
    assert state.read(paths, "web") is None


def test_a_unit_without_paths_on_its_command_line_is_cleaned_as_before(tmp_path: Path) -> None:
    """Units written by an earlier pymachine run ``NAME --cleanup`` alone."""
    paths = Paths(tmp_path)
    runtime = paths.machine_runtime(NAME)
    runtime.mkdir(parents=True)
    (runtime / "state.json").write_text("{}")
    (runtime / cleanup.EPHEMERAL).mkdir()
    root = str(Path(__file__).resolve().parents[2])
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from machined.runtime.__main__ import main; main(sys.argv[1:])"
    )
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, root, NAME, "--cleanup"],
        check=True,
        env={"PYMACHINE_ROOT": str(tmp_path)},
    )
    assert sorted(p.name for p in runtime.iterdir()) == []
