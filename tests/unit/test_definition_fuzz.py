"""Every line-break, control and unusual character, through every definition
key a user or an image fills: the machine's definition reads back exactly as
written, or ``create`` refuses it with one line, exit 2, and writes nothing.

This is the class of the review's host-root finding: ``-E $'A=1\\x1cPrivateUsers=no'``
(or an OCI image's ``Env``) became a second line for a reader that split with
``str.splitlines()``. Through the real CLI (``main``), in a PYMACHINE_ROOT of
its own: ``create`` only writes files, no systemd is needed.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest

from machined import definition as defs
from machined.cli import main
from machined.images import ImageConfig, ImageStore
from machined.paths import Paths

# Every character that any reader may treat as a line break or a control, plus
# the ones a line-based format gives meaning to, white space of other kinds,
# invisible format characters, a lone surrogate (a non-UTF-8 argument byte) and
# ordinary non-ASCII letters.
CHARACTERS = (
    [chr(c) for c in range(0x00, 0x20)]
    + [chr(0x7F)]
    + [chr(c) for c in range(0x80, 0xA0)]
    + ["\u2028", "\u2029", "\udc85", "\udcff", "\ud800"]
    + ["\xa0", "\u1680", "\u2000", "\u200b", "\u3000", "\ufeff", "\u202e"]
    + [" ", "#", ";", "[", "]", "=", '"', "'", "\\", "%", "$", ":", "é", "日"]
    + ["\u0663", "\xb2", "\uff18"]  # digits of other scripts: int() takes two of them
)
POSITIONS = ("start", "middle", "end")
NAME = "m"


def _place(char: str, position: str, base: str) -> str:
    if position == "start":
        return char + base
    if position == "end":
        return base + char
    middle = len(base) // 2
    return base[:middle] + char + base[middle:]


class Field:
    """One way a value reaches the definition: the create arguments that carry
    it, and where it must read back."""

    def __init__(
        self, name: str, base: str, argv: Callable[[str], list[str]], read: Callable
    ) -> None:
        self.name, self.base, self.argv, self.read = name, base, argv, read


FIELDS = [
    Field("command", "echo", lambda v: ["--", "/bin/sh", "-c", v], lambda d: d.command[2]),
    Field("command word", "ab", lambda v: ["--", v], lambda d: d.command[0]),
    Field("environment value", "v1", lambda v: ["-E", f"A={v}"], lambda d: d.environment["A"]),
    Field("environment name", "AB", lambda v: ["-E", f"{v}=1"], lambda d: list(d.environment)),
    Field("working directory", "/srv/x", lambda v: ["--workdir", v], lambda d: d.working_directory),
    Field("user", "nobody", lambda v: ["--user", v], lambda d: d.user),
    Field("bind source", "/srv/a", lambda v: ["--bind", f"{v}:/b"], lambda d: d.binds[0].source),
    Field("bind target", "/srv/b", lambda v: ["--bind", f"/a:{v}"], lambda d: d.binds[0].target),
    Field(
        "resource", "64M", lambda v: ["-p", f"MemoryMax={v}"], lambda d: d.resources["MemoryMax"]
    ),
    Field("bridge", "br0", lambda v: ["--bridge", v], lambda d: d.network.bridge),
    Field("address", "10.219.0.5", lambda v: ["--address", v], lambda d: d.network.address),
    Field("port", "8080", lambda v: ["--port", f"tcp:{v}:80"], lambda d: str(d.network.ports[0])),
    Field("private users", "pick", lambda v: ["--private-users", v], lambda d: d.private_users),
    Field("capability", "CAP_NET_ADMIN", lambda v: ["--capability", v], lambda d: d.capability),
    Field(
        "system call filter",
        "~@clock",
        lambda v: ["--system-call-filter", v],
        lambda d: d.system_call_filter,
    ),
    Field("image", "tiny", lambda v: ["--image", v], lambda d: d.image),
]

# What a field's read-back must equal when create accepted the value. Most take
# it as given; a few normalize, and that normal form must then be what is read.
EXPECTED: dict[str, Callable[[str], object]] = {
    "environment name": lambda v: [f"{v}=1".partition("=")[0]],
    "port": lambda v: None,  # checked against the accepted definition instead
    "capability": lambda v: None,
    "system call filter": lambda v: None,
    "private users": lambda v: None,
    "resource": lambda v: v.strip(" \t"),  # -p KEY=VALUE trims blanks, as systemd does
}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    (tmp_path / "var/lib/machines/tiny").mkdir(parents=True)
    return tmp_path


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _remove_machine(root: Path) -> None:
    import shutil

    Path(root, "etc/pymachine", f"{NAME}.machine").unlink()
    shutil.rmtree(root / "var/lib/pymachine/machines" / NAME)


def _create(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    head = argv[: argv.index("--")] if "--" in argv else argv
    tail = argv[argv.index("--") :] if "--" in argv else ["--", "sleep", "1"]
    image = [] if "--image" in head else ["--image", "tiny"]
    code = main(["create", NAME, *image, *head, *tail])
    return code, capsys.readouterr().err


def _check_refusal(code: int, err: str, before: dict, root: Path, what: str) -> None:
    assert code == 2, f"{what}: exit {code}, stderr {err!r}"
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("pymachine: "), f"{what}: {err!r}"
    assert _tree(root) == before, f"{what}: a refused create changed files"


def _definition_lines(root: Path) -> list[str]:
    text = Path(root, "etc/pymachine", f"{NAME}.machine").read_text()
    return [line for line in text.split("\n") if line.strip()]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_character_in_every_flag_reads_back_or_is_refused(
    root: Path, capsys: pytest.CaptureFixture, field: Field
) -> None:
    accepted = refused = 0
    baseline_code, err = _create(field.argv(field.base), capsys)
    assert baseline_code == 0, err
    baseline_keys = [line.split("=", 1)[0] for line in _definition_lines(root)]
    _remove_machine(root)
    before = _tree(root)
    for char in CHARACTERS:
        for position in POSITIONS:
            value = _place(char, position, field.base)
            what = f"{field.name} {value!r}"
            code, err = _create(field.argv(value), capsys)
            if code != 0:
                _check_refusal(code, err, before, root, what)
                refused += 1
                continue
            accepted += 1
            # No new line, no other key: the file has the lines the plain value gave.
            keys = [line.split("=", 1)[0] for line in _definition_lines(root)]
            assert keys == baseline_keys, f"{what}: the definition's lines changed: {keys}"
            loaded = defs.load(NAME, Paths(root))
            expected = EXPECTED.get(field.name, lambda v: v)(value)
            if expected is not None:
                assert field.read(loaded) == expected, what
            # Written again from what was read, it reads back the same (a fixed point).
            assert defs.from_text(NAME, defs.to_text(loaded)) == loaded, what
            _remove_machine(root)
    # The set must exercise both outcomes: ordinary letters pass, line breaks don't.
    assert refused > 0, f"{field.name}: nothing refused"
    nothing_else = ("image", "address", "private users", "bridge", "port")  # ASCII-only syntax
    assert accepted > 0 or field.name in nothing_else, field.name


OCI_FIELDS = {
    "Cmd": lambda v: ImageConfig(cmd=("/bin/sh", "-c", v)),
    "Entrypoint": lambda v: ImageConfig(entrypoint=(v,)),
    "Env": lambda v: ImageConfig(cmd=("true",), environment=(f"A={v}",)),
    "Env name": lambda v: ImageConfig(cmd=("true",), environment=(f"A{v}B=1",)),
    "WorkingDir": lambda v: ImageConfig(cmd=("true",), working_directory=f"/srv{v}x"),
    "User": lambda v: ImageConfig(cmd=("true",), user=f"no{v}body"),
}


@pytest.mark.parametrize("field", sorted(OCI_FIELDS))
def test_image_config_fills_only_its_own_values(
    root: Path, capsys: pytest.CaptureFixture, field: str
) -> None:
    """An image's config (what ``import-oci``/``pull`` record) fills the
    command, environment, working directory and user of ``create``, and never
    another key: each value reads back exactly, or ``create`` refuses."""
    store = ImageStore(Paths(root))
    refused = 0
    for char in CHARACTERS:
        config = OCI_FIELDS[field](char)
        store.set_config("tiny", config)
        before = _tree(root)
        code = main(["create", NAME, "--image", "tiny"])
        err = capsys.readouterr().err
        what = f"{field} {char!r}"
        if code != 0:
            _check_refusal(code, err, before, root, what)
            refused += 1
            continue
        loaded = defs.load(NAME, Paths(root))
        assert loaded.command == config.command, what
        assert loaded.environment == config.environment_dict, what
        assert loaded.working_directory == config.working_directory, what
        assert loaded.user == config.user, what
        assert loaded.private_users == "pick" and not loaded.capability, what
        assert not loaded.binds and not loaded.resources, what
        _remove_machine(root)
    assert refused > 0


def test_non_string_image_config_is_one_line_not_a_traceback(
    root: Path, capsys: pytest.CaptureFixture
) -> None:
    """A hostile config.json whose Cmd holds numbers or objects."""
    store = ImageStore(Paths(root))
    store.set_config("tiny", ImageConfig(cmd=("true",)))
    meta = store.meta_file("tiny")
    import json

    data = json.loads(meta.read_text())
    data["config"]["cmd"] = ["/bin/sh", 7, {"x": 1}]
    meta.write_text(json.dumps(data))
    before = _tree(root)
    code = main(["create", NAME, "--image", "tiny"])
    _check_refusal(code, capsys.readouterr().err, before, root, "numbers in Cmd")


SEPARATORS_AND_CONTROLS = [
    c for c in CHARACTERS if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") and c != "\n"
]


@pytest.mark.parametrize("char", SEPARATORS_AND_CONTROLS)
def test_reader_splits_lines_at_newline_only(char: str) -> None:
    """A hand-edited file with a stray separator: the reader never makes a key
    of what follows it (the value then fails validation with file:line)."""
    text = f"[Machine]\nImage=tiny\n[Exec]\nCommand=sleep 1{char}PrivateUsers=no\n"
    if char == "\r":  # systemd's parser also ends a line at \r\n; a lone \r is refused
        text = text.replace("\r", "\rx")
    try:
        loaded = defs.from_text(NAME, text)
    except Exception as exc:  # noqa: BLE001 - the class is asserted below
        assert type(exc).__name__ == "InvalidInput", repr(exc)
        assert ":4:" in str(exc) or "<string>" in str(exc)
        return
    assert loaded.private_users == "pick", repr(char)


def test_readme_definition_example_parses() -> None:
    """The README's definition-file example is a file the parser takes."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = readme.read_text()
    start = text.index("```ini\n[Machine]")
    block = text[start + len("```ini\n") : text.index("```", start + 6)]
    loaded = defs.from_text("web", block)
    assert loaded.private_users == "pick"
    assert loaded.resources["MemoryMax"] == "64M"
    assert loaded.binds and loaded.network.ports


if sys.flags.optimize:  # the checks above are asserts
    raise RuntimeError("run these tests without -O")


@pytest.mark.parametrize(
    "argv",
    [
        [b"--workdir", b"/\x85x", b"--", b"true"],
        [b"--user", b"r\xffoot", b"--", b"true"],
        [b"-E", b"A=\xc3", b"--", b"true"],
        [b"--bind", b"/srv/\xfe:/b", b"--", b"true"],
        [b"--", b"/bin/sh", b"-c", b"echo \xff"],
    ],
    ids=["workdir", "user", "env", "bind", "command"],
)
def test_non_utf8_argument_is_one_line_exit_2(root: Path, argv: list[bytes]) -> None:
    """Bytes that are not UTF-8 on the command line (the review's
    ``--workdir $'/\\x85x'``): one line, exit 2, nothing written."""
    import subprocess

    before = _tree(root)
    proc = subprocess.run(
        [sys.executable, "-m", "machined", "create", NAME, "--image", "tiny", *argv],
        capture_output=True,
        env={"PYMACHINE_ROOT": str(root), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        cwd="/",
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "not UTF-8" in err, err
    assert _tree(root) == before
