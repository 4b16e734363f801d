"""pymachined's pure parts: what needs the privileged action, what may be a
machine's stdio, an exec's checks, object paths, error names both ways."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from machined import daemon
from machined.daemon.service import check_stdio, exec_request, privileged_features
from machined.definition import from_text, to_text
from machined.errors import (
    AccessDenied,
    Conflict,
    ExitCode,
    InvalidInput,
    NotFound,
    NotRunning,
    PymachineError,
)

#: Lines a definition may carry, and whether each reaches beyond the machine's sandbox.
LINES = {
    ("Files", "Bind=/etc:/hostetc"): True,
    ("Exec", "PrivateUsers=no"): True,
    ("Exec", "PrivateUsers=1000000:65536"): True,
    ("Exec", "Capability=CAP_SYS_ADMIN"): True,
    ("Exec", "SystemCallFilter=@keyring"): True,
    ("Exec", "NoNewPrivileges=no"): True,
    ("Network", "Mode=host"): True,
    ("Network", "Bridge=br-other"): True,
    ("Network", "Port=tcp:80:80"): True,
    ("Files", "Device=/dev/kvm"): True,
    ("Files", "Device=/dev/fuse:rw"): True,
    ("Exec", "LoadCredential=token:/etc/shadow"): True,
    ("Exec", "LoadCredentialEncrypted=token:/root/secret.cred"): True,
    ("Exec", "SetCredential=token"): False,  # root's store, per machine: nothing of the host
    ("Exec", "Notify=yes"): False,
    ("Exec", "SystemCallFilter=~@clock"): False,
    ("Exec", "DropCapability=CAP_NET_RAW"): False,
    ("Files", "ReadOnly=yes"): False,
    ("Files", "Ephemeral=yes"): False,
    ("Network", "Port=tcp:8080:80"): False,
    ("Exec", "Environment=A=1"): False,
    ("Resources", "MemoryMax=64M"): False,
}


def definition_text(lines: list[tuple[str, str]]) -> str:
    sections: dict[str, list[str]] = {"Machine": ["Image=tiny"]}
    for section, line in lines:
        sections.setdefault(section, []).append(line)
    return "".join(
        f"[{s}]\n" + "".join(f"{line}\n" for line in body) for s, body in sections.items()
    )


def test_each_line_that_reaches_into_the_host_is_privileged() -> None:
    for (section, line), privileged in LINES.items():
        definition = from_text("m", definition_text([(section, line)]))
        assert bool(privileged_features(definition)) == privileged, line


def test_any_mix_is_privileged_exactly_when_one_of_its_lines_is() -> None:
    """Fuzz-style: random mixes of lines (those that can stand together)."""
    rng = random.Random(18)
    keys = list(LINES)
    for _ in range(400):
        chosen = rng.sample(keys, rng.randint(1, 5))
        sections = [s for s, _ in chosen]
        lines = [line.split("=", 1)[0] for _, line in chosen]
        if "Mode=host" in [line for _, line in chosen] and "Network" in sections:
            chosen = [c for c in chosen if not c[1].startswith(("Port=", "Bridge="))] or chosen
        if len(set(lines)) < len(lines):
            continue  # PrivateUsers= twice: the last one wins, not what this checks
        try:
            definition = from_text("m", definition_text(chosen))
        except InvalidInput:
            continue  # e.g. Port= with Mode=host: refused before any authorization
        expected = any(LINES[c] for c in chosen)
        assert bool(privileged_features(definition)) == expected, chosen


def test_the_definition_text_round_trips_as_the_daemon_receives_it() -> None:
    text = definition_text([("Files", "Bind=/srv:/srv:ro"), ("Resources", "TasksMax=9")])
    definition = from_text("m", text)
    assert from_text("m", to_text(definition)) == definition


@pytest.mark.parametrize(
    "kind",
    ["pipe", "file", "devnull"],
)
def test_stdio_may_be_a_pipe_a_file_or_a_device(kind: str, tmp_path) -> None:
    if kind == "pipe":
        fd, other = os.pipe()
        os.close(other)
    elif kind == "file":
        fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    else:
        fd = os.open(os.devnull, os.O_RDWR)
    try:
        check_stdio(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_DIRECTORY, os.O_PATH])
def test_a_directory_or_an_o_path_descriptor_never_crosses(flags: int, tmp_path) -> None:
    fd = os.open(tmp_path, flags)
    try:
        with pytest.raises(InvalidInput):
            check_stdio(fd)
    finally:
        os.close(fd)
    if flags == os.O_PATH:  # a file opened O_PATH too
        (tmp_path / "f").write_text("")
        fd = os.open(tmp_path / "f", os.O_PATH)
        try:
            with pytest.raises(InvalidInput):
                check_stdio(fd)
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    "args",
    [
        ("../x", ["true"], [], "", "", False),
        ("m", ["true"], ["1BAD=x"], "", "", False),
        ("m", ["true"], ["NOEQUALS"], "", "", False),
        ("m", ["tr\0ue"], [], "", "", False),
        ("m", ["true"], [], "ro\0ot", "", False),
        ("m", ["true"], [], "", "relative/dir", False),
        ("m", [], [], "", "", False),  # exec needs a command (shell does not)
    ],
)
def test_an_exec_is_checked_as_the_cli_checks_it(args: tuple) -> None:
    with pytest.raises(InvalidInput):
        exec_request(*args)


def test_an_exec_request_is_what_the_helper_runs() -> None:
    request = exec_request("m", [], ["TERM=xterm", "A=b=c"], "nobody", "/tmp", True)
    assert request == {
        "name": "m",
        "command": [],
        "environment": {"TERM": "xterm", "A": "b=c"},
        "user": "nobody",
        "working_directory": "/tmp",
        "pty": True,
    }


def test_object_paths_escape_as_sd_bus_does() -> None:
    prefix = daemon.MACHINE_PATH_PREFIX
    assert daemon.object_path(prefix, "web-1.x_y") == prefix + "web_2d1_2ex_5fy"
    assert daemon.object_path(prefix, "") == prefix + "_"
    names = ["".join(p) for p in itertools.product("a-._1", repeat=3)]
    assert len({daemon.object_path(prefix, n) for n in names}) == len(names)  # injective


def test_every_exit_code_has_an_error_name_and_back() -> None:
    for exc in (PymachineError("x"), InvalidInput("x"), NotRunning("x"), NotFound("x"),
                Conflict("x"), AccessDenied("x")):  # fmt: skip
        back = daemon.error_from(daemon.error_name(exc), str(exc))
        assert type(back) is type(exc) and back.exit_code == exc.exit_code
    assert {int(c) for c in daemon.ERROR_NAMES} == {int(c) for c in ExitCode} - {0}
    assert daemon.error_from("org.example.Unknown", "m").exit_code == ExitCode.FAILURE


def test_the_cli_client_loads_neither_dbus_next_nor_asyncio() -> None:
    """The client side stays lean: pystemd's sd-bus, no event loop (a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from machined import cli\n"
        "cli.build_parser('start').parse_args(['start', 'm'])\n"
        "from machined.cli import daemon, machines\n"
        "from machined import dbus\n"
        "loaded = set(sys.modules) - before\n"
        "print(sorted(m for m in ('asyncio', 'dbus_next', 'shutil', 'typing', 'machined.machines')"
        " if m in loaded))\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"


@pytest.mark.parametrize("retrying", [True, False], ids=["ours", "dbus-next-alone"])
def test_the_bus_writer_survives_a_full_socket_buffer(retrying: bool) -> None:
    """Many signals at once (100 machines stopping) fill the bus socket's
    buffer: dbus-next alone ends the connection on EAGAIN (the daemon died);
    through _RetryingSocket the writer waits and sends everything, in order."""
    import asyncio
    import contextlib
    import socket

    from dbus_next import Message
    from dbus_next.aio.message_bus import _MessageWriter

    from machined.daemon.bus import _RetryingSocket

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.new_event_loop()
    ended: list[Exception] = []

    class FakeBus:
        _negotiate_unix_fd = False
        _sock = ours
        _loop = loop
        _fd = ours.fileno()

        def _finalize(self, exc: Exception) -> None:
            ended.append(exc)

    writer = _MessageWriter(FakeBus())
    if retrying:
        writer.sock = _RetryingSocket(writer.sock)
    messages = [
        Message(path="/p", interface="a.b", member="S", signature="s", body=[f"{i:04}" * 500])
        for i in range(100)
    ]
    expected = b"".join(m._marshall() for m in messages)
    for message in messages:
        writer.buffer_message(message)
    received = b""
    try:
        for _ in range(10000):
            writer.write_callback()
            if ended or (writer.buf is None and writer.messages.empty()):
                break
            with contextlib.suppress(BlockingIOError):
                received += peer.recv(1 << 16)
        while True:
            try:
                chunk = peer.recv(1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        loop.close()
        ours.close()
        peer.close()
    if retrying:
        assert not ended and received == expected
    else:
        assert ended and isinstance(ended[0], BlockingIOError)  # the bug worked around


def test_the_clients_activation_file_is_the_one_install_units_writes() -> None:
    """Root's CLI runs in-process when this file is missing: it must be the
    file ``install-units`` installs, or root would never reach the daemon."""
    from machined import daemon
    from machined.daemon import install

    assert ("/" + install.FILES[1][1]) == daemon.ACTIVATION_FILE
