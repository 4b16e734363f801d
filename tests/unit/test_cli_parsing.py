"""CLI parsing and error reporting: no systemd needed (create only writes files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from machined import definition as defs
from machined.cli import build_parser, main, split_command
from machined.paths import Paths


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PYMACHINE_ROOT holding one image, 'tiny'."""
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    (tmp_path / "var/lib/machines/tiny").mkdir(parents=True)
    return tmp_path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- split_command -------------------------------------------------------------------


def test_split_without_separator() -> None:
    assert split_command(["start", "web"]) == (["start", "web"], None)


def test_split_at_first_separator_only() -> None:
    argv = ["exec", "web", "-u", "nobody", "--", "ls", "-l", "--", "x"]
    assert split_command(argv) == (["exec", "web", "-u", "nobody"], ["ls", "-l", "--", "x"])


def test_split_with_empty_command() -> None:
    assert split_command(["create", "web", "--"]) == (["create", "web"], [])


def test_split_options_after_separator_are_untouched() -> None:
    head, command = split_command(["run", "web", "--", "--help", "-p", "x"])
    assert head == ["run", "web"]
    assert command == ["--help", "-p", "x"]


def test_split_does_not_modify_input() -> None:
    argv = ["a", "--", "b"]
    split_command(argv)
    assert argv == ["a", "--", "b"]


# --- create: success, to compare with the failures ----------------------------------


def test_create_writes_definition_and_state(root: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["create", "web", "--image", "tiny", "-p", "MemoryMax=64M", "--", "sh", "-c", "echo a b"]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    assert out == "Created machine web from image tiny.\n"
    d = defs.load("web", Paths(root))
    assert d.command == ["sh", "-c", "echo a b"]
    assert d.resources == {"MemoryMax": "64M"}
    assert (root / "etc/pymachine/web.machine").is_file()
    assert (root / "var/lib/pymachine/machines/web/upper").is_dir()
    assert (root / "var/lib/pymachine/machines/web/work").is_dir()


def test_create_all_flags(root: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "create",
            "web",
            "-q",
            "--image",
            "tiny",
            "--bind",
            "/srv:/data:ro",
            "--read-only",
            "--ephemeral",
            "-E",
            "A=1",
            "--env",
            "B=x y",
            "--workdir",
            "/data",
            "-u",
            "nobody",
            "--stop-timeout",
            "3",
            "--network",
            "bridge",
            "--bridge",
            "br0",
            "--address",
            "10.1.2.3",
            "--port",
            "8080:80",
            "--port",
            "udp:53",
            "-p",
            "CPUQuota=150%",
            "-p",
            "TasksMax=infinity",
            "--",
            "/bin/echo",
            "hi",
        ]
    )
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "", "")
    d = defs.load("web", Paths(root))
    assert d.command == ["/bin/echo", "hi"]
    assert [str(b) for b in d.binds] == ["/srv:/data:ro"]
    assert d.read_only and d.ephemeral
    assert d.environment == {"A": "1", "B": "x y"}
    assert (d.working_directory, d.user, d.stop_timeout) == ("/data", "nobody", 3.0)
    assert (d.network.bridge, d.network.address) == ("br0", "10.1.2.3")
    assert [str(p) for p in d.network.ports] == ["tcp:8080:80", "udp:53:53"]
    assert d.resources == {"CPUQuota": "150%", "TasksMax": "infinity"}


def test_create_existing_is_conflict(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["create", "web", "-q", "--image", "tiny", "--", "/bin/true"]) == 0
    before = (root / "etc/pymachine/web.machine").read_text()
    code = main(["create", "web", "--image", "tiny", "--", "/bin/false"])
    _, err = capsys.readouterr()
    assert code == 5
    assert err == "pymachine: machine 'web' already exists\n"
    assert (root / "etc/pymachine/web.machine").read_text() == before


# --- create: bad input changes nothing --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "../x", "--image", "tiny", "--", "/bin/true"], "invalid machine name '../x'"),
        (["create", "-x y", "--image", "tiny"], "invalid machine name '-x y'"),
        (["create", "web", "--image", "tiny", "-p", "MemoryMax=12Q"], "MemoryMax: '12Q'"),
        (["create", "web", "--image", "tiny", "-p", "Foo=1"], "unknown property 'Foo'"),
        (["create", "web", "--image", "tiny", "-p", "MemoryMax"], "expected KEY=VALUE"),
        (["create", "web", "--", "/bin/true"], "--image is required"),
        (["create", "web", "--image", "../img"], "invalid image name '../img'"),
        (["create", "web", "--image", "tiny", "--bind", "rel:/x"], "invalid bind 'rel:/x'"),
        (["create", "web", "--image", "tiny", "--bind", "/a/../b"], "'..' is not allowed"),
        (
            ["create", "web", "--image", "tiny", "-E", "1A=x"],
            "invalid environment variable name '1A'",
        ),
        (
            ["create", "web", "--image", "tiny", "-E", "A-B=x"],
            "invalid environment variable name 'A-B'",
        ),
        (["create", "web", "--image", "tiny", "--workdir", "rel"], "must be absolute"),
        (["create", "web", "--image", "tiny", "--stop-timeout", "0"], "stop timeout"),
        (["create", "web", "--image", "tiny", "--port", "70000"], "not in 1…65535"),
        (["create", "web", "--image", "tiny", "--boot", "--", "/bin/sh"], "takes no command"),
        (
            ["create", "web", "--image", "tiny", "--network", "host", "--port", "80"],
            "Port= needs Mode=bridge",
        ),
        (["create", "web", "--image", "tiny", "--bridge", "vh-evil"], "veth names"),
    ],
)
def test_create_bad_input_exit_2_and_nothing_created(
    root: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    before = tree(root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("pymachine: ")
    assert err.endswith("\n") and err.count("\n") == 1
    assert "Traceback" not in err
    assert message in err
    assert tree(root) == before


def test_create_memory_max_12q_exact_message(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["create", "web", "--image", "tiny", "-p", "MemoryMax=12Q"]) == 2
    assert capsys.readouterr().err == (
        "pymachine: invalid value for MemoryMax: '12Q' "
        "(expected bytes with K/M/G/T/P/E suffix (base 1024), N% of RAM, or infinity)\n"
    )
    assert not (root / "etc/pymachine/web.machine").exists()


def test_create_unknown_image_exit_4_nothing_created(
    root: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree(root)
    code = main(["create", "web", "--image", "nope"])
    out, err = capsys.readouterr()
    assert code == 4
    assert out == ""
    assert err == f"pymachine: image 'nope' not found in {root / 'var/lib/machines'}\n"
    assert tree(root) == before


# --- argparse-level errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["create"], "the following arguments are required: name"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["start", "web", "--", "x"], "'start' takes no command after --"),
        (["create", "web", "--network", "nat"], "invalid choice: 'nat'"),
        (["create", "web", "--stop-timeout", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_usage_errors_exit_2(
    root: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    before = tree(root)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert tree(root) == before


def test_version(capsys: pytest.CaptureFixture, tmp_path, monkeypatch) -> None:
    """--version names pymachined's files that are missing (install-units)."""
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "pymachine 0.1.0"
    assert any("pymachined.service is missing" in line for line in out[1:])


def test_parser_knows_the_machine_verbs() -> None:
    parser = build_parser()
    for verb in ("create", "start", "stop", "restart", "remove", "rm", "kill", "list", "ls"):
        args = parser.parse_args([verb, "web"] if verb not in ("list", "ls") else [verb])
        assert callable(args.func)


def test_logs_missing_machine_is_4(root: Path, capsys: pytest.CaptureFixture) -> None:
    """``logs`` loads the definition before doing anything: a missing machine is exit 4."""
    code = main(["logs", "ghost"])
    assert code == 4
    assert capsys.readouterr().err.startswith("pymachine: machine 'ghost' not found")


def test_create_infinite_stop_timeout_is_rejected(
    root: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["create", "web", "--image", "tiny", "--stop-timeout", "inf", "--", "/bin/true"])
    assert code == 2
    assert "stop timeout" in capsys.readouterr().err
    assert not (root / "etc/pymachine/web.machine").exists()


def test_a_machine_verb_builds_only_its_group() -> None:
    """``pymachine stop …`` registers the machine verbs only; VERBS says which."""
    import argparse

    from machined.cli import machines as group

    sub = argparse.ArgumentParser().add_subparsers()
    group.register(sub)
    assert set(sub.choices) == group.VERBS
    parser = build_parser("stop")
    assert parser.parse_args(["stop", "a", "b"]).names == ["a", "b"]
    assert "images" not in parser._subparsers._group_actions[0].choices
    assert "images" in build_parser("images")._subparsers._group_actions[0].choices
    assert "images" in build_parser()._subparsers._group_actions[0].choices
