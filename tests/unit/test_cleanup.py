"""The stop's clean-up (``ExecStopPost=``): its command line, what it removes,
what it imports, the light JSON and nft pieces, the one D-Bus call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from machined.network import jsonlite, nft, nftlib, state
from machined.paths import Paths
from machined.runtime import cleanup

NAME = "pymachine-unit-test-cleanup"

# --- jsonlite -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, "x\\u00e9", null, true, false, {"b": {}}]}',
        " [] \n",
        '"s"',
        "-3",
        '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]}',
    ],
)
def test_jsonlite_decodes_as_json(text: str) -> None:
    assert jsonlite.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", "{}x", "[1,]", '{"a" 1}', "NaN", "[Infinity]"])
def test_jsonlite_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        jsonlite.loads(text)


# --- nftlib ---------------------------------------------------------------------

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
    assert nftlib.rules_of("web", LISTING) == [("ports", 7), ("ports", 9)]
    assert nftlib.rules_of("db", LISTING) == []


def test_delete_batch_is_the_json_nft_writes() -> None:
    rules = [nft.MachineRule("web", "ports", 7, None), nft.MachineRule("web", "ports", 9, None)]
    expected = {"nftables": [nft._delete(r) for r in rules]}
    assert json.loads(nftlib.delete_batch([("ports", 7), ("ports", 9)])) == expected
    assert json.loads(nftlib.LIST_TABLE) == {
        "nftables": [{"list": {"table": {"family": "inet", "name": "pymachine"}}}]
    }
    odd = json.loads(nftlib.delete_batch([('a"b', 1)]))
    assert odd["nftables"][0]["delete"]["rule"]["chain"] == 'a"b'


def test_remove_machine_lists_deletes_and_retries() -> None:
    calls: list[str] = []
    answers = [
        (True, LISTING),
        (False, "Error: Could not process rule"),
        (True, LISTING),
        (True, ""),
    ]

    def execute(text: str) -> tuple[bool, str]:
        calls.append(text)
        return answers.pop(0)

    assert nftlib.remove_machine("web", execute) == 2
    assert calls[0] == calls[2] == nftlib.LIST_TABLE
    assert calls[1] == calls[3] == nftlib.delete_batch([("ports", 7), ("ports", 9)])
    no_table = [(False, "Error: No such file or directory; did you mean table ...")]
    assert nftlib.remove_machine("web", lambda text: no_table[0]) == 0


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
    from machined.network import leftover

    monkeypatch.setattr(leftover, "teardown", lambda name, path: done.append(f"teardown {path}"))
    cleanup.run("web", str(record), str(ephemeral), [str(f) for f in files])
    assert done == [f"teardown {record}"]
    assert not any(f.exists() for f in files) and not ephemeral.exists()
    done.clear()
    record.unlink()
    cleanup.run("web", str(record), str(ephemeral), [str(f) for f in files])  # idempotent
    assert done == []


def test_run_refuses_a_name_that_leaves_the_directory() -> None:
    with pytest.raises(SystemExit):
        cleanup.run("../etc", "/nonexistent", "/nonexistent", [])


def test_clean_up_of_a_bridged_machine_is_light(tmp_path: Path) -> None:
    """What the clean-up of a bridged machine imports (a record with no ports,
    no veth: nothing reaches the kernel; a registration machined drops itself)."""
    paths = Paths(tmp_path)
    record, ephemeral, *files = (str(p) for p in cleanup.targets(NAME, paths))
    os.makedirs(os.path.dirname(record))
    with open(record, "w") as f:
        json.dump({"machine": NAME, "host_ifname": state.host_ifname(NAME), "ports": []}, f)
    heavy = [
        "pathlib", "re", "json", "typing", "dataclasses", "socket", "threading",
        "contextlib", "shutil", "enum", "machined.paths", "machined.network.lifecycle",
        "machined.network.nft", "machined.network.links", "machined.dbus", "pystemd",
    ]  # fmt: skip
    # machined still has the machine (its unit is in stop-post): the clean-up
    # leaves that to machined, no D-Bus client is loaded
    registered = tmp_path / "machines"
    registered.mkdir()
    (registered / NAME).write_text("")
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        f"from machined.runtime import cleanup; cleanup.MACHINED_STATE_DIR = {str(registered)!r}; "
        "cleanup.run(*sys.argv[1:4], sys.argv[4:]); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.check_output(
        [sys.executable, "-I", "-S", "-c", code, root, NAME, record, ephemeral, *files],
        text=True,
    )
    assert out.strip() == "[]"
    assert not os.path.exists(record)


def test_network_teardown_stays_the_function_after_every_submodule() -> None:
    """A submodule named like one of the package's lazy names would shadow it."""
    code = (
        "import importlib, pkgutil, machined.network as n; "
        "[importlib.import_module('machined.network.' + m.name) "
        "for m in pkgutil.iter_modules(n.__path__)]; "
        "print(all(callable(getattr(n, a)) for a in ('setup', 'teardown', 'release', 'gc')))"
    )
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "True"


def test_leftover_teardown_deletes_the_veth_even_when_nft_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from machined.network import leftover, rtnl

    record = tmp_path / "web.json"
    record.write_text(json.dumps({"host_ifname": "vm-web", "ports": ["tcp:8080:80"]}))
    done: list[str] = []

    def refuse(machine: str) -> int:
        done.append("nft")
        raise nftlib.NftError("nft failed: busy")

    class FakeRtnl:
        def __init__(self) -> None:
            pass

        def __enter__(self) -> FakeRtnl:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(nftlib, "remove_machine", refuse)
    monkeypatch.setattr(leftover, "link_exists", lambda ifname: ifname == "vm-web")
    monkeypatch.setattr(rtnl, "Rtnl", FakeRtnl)
    monkeypatch.setattr(leftover, "delete_link", lambda ipr, ifname, m: done.append(ifname))
    with pytest.raises(nftlib.NftError):
        leftover.teardown("web", str(record))
    assert done == ["nft", "vm-web"] and record.exists()  # kept: gc and the next start retry
    monkeypatch.setattr(nftlib, "remove_machine", lambda machine: done.append("nft again"))
    leftover.teardown("web", str(record))
    assert not record.exists()


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
