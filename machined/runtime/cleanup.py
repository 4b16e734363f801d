"""The unit's ``ExecStopPost=``: what a stopped machine leaves to tear down.

In service mode the runtime hands the unit over to the container's PID 1 once
it is up and exits, so this is the one place that tears down after every stop
(and after a runtime SIGKILLed at any step of start): the veth's lease and nft
rules, the machined registration (as systemd-nspawn unregisters on its way
out, so the machine is gone from ``machinectl list`` when stop returns), the
state file, an ephemeral layer. Mounts need nothing: they live in namespaces
that died with the container.

Kept light: it runs at every stop of a bridged machine, and its imports are
most of its cost. :func:`run` takes every path it touches from its command
line (:func:`command` writes them there), so the clean-up imports neither
``machined.paths`` (``pathlib``, ``re``: ~4 ms) nor ``machined.names``, and
of the network code only :mod:`machined.network.leftover`. ``Path`` and
``Paths`` are for the CLI's side (:func:`command`), imported there.
"""

from __future__ import annotations

import os
import struct
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pathlib import Path

    from machined.paths import Paths

MACHINED_STATE_DIR = "/run/systemd/machines"  # machined's own record, one file a machine
EPHEMERAL = "ephemeral"  # an ephemeral machine's writable layer, in its runtime directory
_UNREGISTER = (
    "busctl call --quiet org.freedesktop.machine1 /org/freedesktop/machine1 "
    "org.freedesktop.machine1.Manager UnregisterMachine s"
)


def __getattr__(name: str) -> object:
    """``MACHINED_STATE`` as a ``Path`` for the CLI, without ``pathlib`` here (PEP 562)."""
    if name == "MACHINED_STATE":
        from pathlib import Path

        return Path(MACHINED_STATE_DIR)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def runtime_directory(name: str, paths: Paths) -> str | None:
    """The unit's ``RuntimeDirectory=`` (``pymachine/NAME``): systemd removes it
    when the unit stops, the state file with it (and the PID file, which it
    unlinks itself), with no process of ours. None when the machine's runtime
    directory is not ``/run/pymachine/NAME`` (another ``PYMACHINE_ROOT``)."""
    from pathlib import Path

    directory = paths.machine_runtime(name)
    if directory.parent != Path("/run/pymachine"):
        return None
    return f"pymachine/{name}"


def needs_command(name: str, paths: Paths, *, bridged: bool, ephemeral: bool) -> bool:
    """Whether the unit needs an ``ExecStopPost=`` at all. A control process costs
    each stop 15–25 ms (fork, cgroup migration, exec: measured with systemd-run in
    a tier-1 host), so a machine with neither a bridge nor an ephemeral layer
    has none when its runtime directory is systemd's to remove: the PID and
    state files go with it, and machined drops the registration when the unit
    stops (``pymachine stop`` unregisters at once; a crashed runtime's stale
    registration is dropped by the next start)."""
    return bridged or ephemeral or runtime_directory(name, paths) is None


def targets(name: str, paths: Paths) -> list[Path]:
    """What :func:`run` looks at, in its command-line order: the network record,
    the ephemeral layer, then the files to remove (state and PID files)."""
    from machined.network import state as network_state
    from machined.paths import PID_FILE, STATE_FILE

    runtime_dir = paths.machine_runtime(name)
    return [
        network_state.state_file(paths, name),
        runtime_dir / EPHEMERAL,
        runtime_dir / STATE_FILE,
        runtime_dir / PID_FILE,
    ]


def command(name: str, paths: Paths, python_cleanup: list[str]) -> list[str]:
    """The unit's ``ExecStopPost=``: :func:`run` in Python (with :func:`targets`
    as its arguments) only when there is a network record or an ephemeral
    layer to tear down; otherwise (the common case) remove the state and PID
    files and unregister from machined with ``busctl``, a few milliseconds
    instead of a Python start."""
    import shlex

    record, ephemeral, *files = (str(p) for p in targets(name, paths))
    test = " || ".join(f"[ -e {shlex.quote(p)} ]" for p in (record, ephemeral))
    python = [*python_cleanup, record, ephemeral, *files]
    script = (
        f"if {test}; then exec {shlex.join(python)}; fi; "
        f"rm -f {' '.join(shlex.quote(f) for f in files)}; "
        f"exec {_UNREGISTER} {shlex.quote(name)} 2>/dev/null"
    )
    return ["/bin/sh", "-c", script]


def cleanup(name: str, paths: Paths) -> None:
    """:func:`run` with the paths computed here (a unit written by an older
    pymachine, whose command line has none)."""
    from machined.names import validate_machine_name

    validate_machine_name(name)
    record, ephemeral, *files = (str(p) for p in targets(name, paths))
    run(name, record, ephemeral, files)


def run(name: str, record: str, ephemeral: str, files: list[str]) -> None:
    """Tear down what the stopped machine left: its network (when it has a
    record), its registration (when machined still has it), ``files``, the
    ephemeral layer. Each step's failure is reported and the rest still run."""
    if not name or "/" in name or name.startswith("."):  # names were checked at create
        raise SystemExit(f"pymachine-runtime: refusing to clean up {name!r}")
    if os.path.exists(record):
        try:
            from machined.network.leftover import teardown

            teardown(name, record)
        except Exception as exc:
            print(f"pymachine-runtime: network clean-up of {name} failed: {exc}", file=sys.stderr)
    if os.path.exists(os.path.join(MACHINED_STATE_DIR, name)):  # still registered: D-Bus only then
        try:
            unregister(name)
        except Exception as exc:  # machined drops it with the unit anyway
            print(f"pymachine-runtime: could not unregister {name}: {exc}", file=sys.stderr)
    for leftover in files:
        try:  # noqa: SIM105 - contextlib costs ~2 ms of imports here
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    if os.path.isdir(ephemeral):
        import shutil  # (~2 ms of imports: ephemeral machines only)

        shutil.rmtree(ephemeral, ignore_errors=True)


# --- UnregisterMachine, the one D-Bus call of a stop ---------------------------------
#
# machined still has the machine while its unit is in stop-post, so the clean-up
# asks it to forget it (as systemd-nspawn does on its way out). Through
# machined.dbus (pystemd, contextlib, enum) that costs ~8 ms of imports for a
# ~1 ms call; the call's few messages are written here instead (the D-Bus
# specification's wire format), over ``_socket``, with ``machined.dbus`` as the
# fallback for a bus this does not speak to (another address, a refusal).

SYSTEM_BUS = "/run/dbus/system_bus_socket"
_HEADER = struct.Struct("<4sIII")  # endianness, type, flags, version; body length, serial; fields
_METHOD_RETURN, _ERROR = 2, 3
_REPLY_SERIAL = 5


def unregister(name: str) -> None:
    """``UnregisterMachine(name)``, its answer waited for; an error answer (no
    such machine) is fine, as ``registry.unregister`` takes it."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=" + SYSTEM_BUS)
    if address.startswith("unix:path=") and "," not in address:
        try:
            _call_unregister(address[len("unix:path=") :], name)
            return
        except (OSError, ValueError):
            pass  # the full client below says what is wrong, if anything is
    from machined import registry
    from machined.dbus import Bus

    with Bus() as bus:
        registry.unregister(bus, name)


def _call_unregister(path: str, name: str) -> None:
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        if not _read_line(sock).startswith(b"OK "):
            raise ValueError("D-Bus authentication refused")
        hello = _method_call(
            1,
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "Hello",
            "org.freedesktop.DBus",
            None,
        )
        call = _method_call(
            2,
            "/org/freedesktop/machine1",
            "org.freedesktop.machine1.Manager",
            "UnregisterMachine",
            "org.freedesktop.machine1",
            name,
        )
        sock.sendall(b"BEGIN\r\n" + hello + call)
        buffer = b""
        while True:  # Hello's reply, NameAcquired, then ours
            message, buffer = _next_message(sock, buffer)
            kind, reply_serial = message
            if kind in (_METHOD_RETURN, _ERROR) and reply_serial == 2:
                return
    finally:
        sock.close()


def _read_line(sock: object) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)  # type: ignore[attr-defined]
        if not chunk:
            raise ValueError("D-Bus connection closed during authentication")
        line += chunk
    return line


def _pad(data: bytearray, alignment: int) -> None:
    data.extend(b"\0" * (-len(data) % alignment))


def _string(data: bytearray, value: str) -> None:
    raw = value.encode()
    _pad(data, 4)
    data.extend(struct.pack("<I", len(raw)) + raw + b"\0")


def _method_call(
    serial: int, path: str, interface: str, member: str, destination: str, argument: str | None
) -> bytes:
    """A little-endian METHOD_CALL with at most one string argument."""
    body = bytearray()
    if argument is not None:
        _string(body, argument)
    fields = bytearray(16)  # the fixed header (written last) and the fields' length
    for code, signature, value in (
        (1, "o", path),
        (2, "s", interface),
        (3, "s", member),
        (6, "s", destination),
        *([(8, "g", "s")] if argument is not None else []),
    ):
        _pad(fields, 8)
        fields.extend(bytes((code, 1)) + signature.encode() + b"\0")
        if signature == "g":
            fields.extend(bytes((len(value),)) + value.encode() + b"\0")
        else:
            _string(fields, value)
    fields[:16] = _HEADER.pack(b"l\x01\x00\x01", len(body), serial, len(fields) - 16)
    _pad(fields, 8)
    return bytes(fields + body)


def _next_message(sock: object, buffer: bytes) -> tuple[tuple[int, int | None], bytes]:
    """The next message's (type, REPLY_SERIAL or None), and what follows it."""
    while True:
        if len(buffer) >= 16:
            order = "<" if buffer[:1] == b"l" else ">"
            body_length, _serial, fields_length = struct.unpack_from(order + "III", buffer, 4)
            total = 16 + fields_length + (-fields_length % 8) + body_length
            if len(buffer) >= total:
                return (buffer[1], _reply_serial(buffer, order, 16 + fields_length)), buffer[total:]
        chunk = sock.recv(65536)  # type: ignore[attr-defined]
        if not chunk:
            raise ValueError("D-Bus connection closed before the answer")
        buffer += chunk


def _reply_serial(message: bytes, order: str, end: int) -> int | None:
    """REPLY_SERIAL from the header fields ``message[16:end]`` (types s, o, g, u only)."""
    offset = 16
    while offset < end:
        offset += -offset % 8
        code, signature_length = message[offset], message[offset + 1]
        signature = message[offset + 2 : offset + 2 + signature_length]
        offset += 3 + signature_length
        if signature == b"u":
            offset += -offset % 4
            value = struct.unpack_from(order + "I", message, offset)[0]
            if code == _REPLY_SERIAL:
                return value
            offset += 4
        elif signature in (b"s", b"o"):
            offset += -offset % 4
            offset += 4 + struct.unpack_from(order + "I", message, offset)[0] + 1
        elif signature == b"g":
            offset += 1 + message[offset] + 1
        else:
            raise ValueError(f"D-Bus header field of type {signature!r}")
    return None
