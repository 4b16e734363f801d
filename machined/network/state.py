"""Names pymachine gives to host-side objects, and the per-machine runtime record.

Light on purpose (standard library only): :func:`machined.network.teardown`
must work from this record alone after the runtime was killed with SIGKILL,
and a bridged machine's clean-up reads it at every stop (no ``json``,
``typing`` or ``contextlib`` there: :mod:`.jsonlite`).

The record is ``network.json`` in the machine's runtime directory
(``/run/pymachine/NAME/``: gone with a reboot, as are the links and nft rules it
describes). That directory is the unit's ``RuntimeDirectory=``, which systemd
removes when the unit stops: a bridged machine without ports leaves nothing
that needs a clean-up process (its veth dies with its network namespace;
``pymachine stop`` and the next start delete one the kernel has not removed
yet), so its unit has no ``ExecStopPost=``. It is written *before* anything is created, so a setup killed
half-way still leaves a record to clean up from (the clean-up of a machine
with ports runs before systemd removes the directory).
"""

from __future__ import annotations

from machined.network.jsonlite import loads

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from machined.paths import Paths

IFNAME_MAX = 15
VETH_PREFIX = "vm-"  # vm-NAME when NAME fits
VETH_HASH_PREFIX = "vh-"  # vh-<12 hex of sha256(NAME)> otherwise: never equal to a vm- name
ALIAS_PREFIX = "pymachine:"  # IFLA_IFALIAS of the host-side veth: "pymachine:NAME"
CONTAINER_IFNAME = "host0"  # as systemd-nspawn names it


def _sha256(data: bytes):
    """SHA-256 from CPython's own implementation when it has one: hashlib's
    is OpenSSL's, and loading libcrypto costs every bridged start ~2.5 ms
    for a few bytes hashed (same digest either way)."""
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython 3.12+
        except ImportError:
            from hashlib import sha256
    return sha256(data)


def host_ifname(machine: str) -> str:
    """The host-side veth name: unique per machine, at most 15 characters (IFNAMSIZ)."""
    name = VETH_PREFIX + machine
    if len(name) <= IFNAME_MAX:
        return name
    return VETH_HASH_PREFIX + _sha256(machine.encode()).hexdigest()[: IFNAME_MAX - 3]


def mac_address(seed: str) -> str:
    """A stable, locally administered unicast MAC (as nspawn derives one from the machine name).

    Stable addresses keep neighbour caches valid across restarts; a bridge with a
    fixed MAC does not change its address whenever a port comes or goes.
    """
    digest = bytearray(_sha256(b"pymachine:" + seed.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in digest)


RECORD = "network.json"


def state_file(paths: Paths, machine: str) -> Path:
    return paths.machine_runtime(machine) / RECORD


def read(paths: Paths, machine: str) -> dict[str, Any] | None:
    return read_file(str(state_file(paths, machine)))


def read_file(path: str) -> dict[str, Any] | None:
    """A record by its path: None if there is none, {} if it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: still a leftover to clean, with the default names
    return data if isinstance(data, dict) else {}


def write(paths: Paths, machine: str, data: dict[str, Any]) -> None:
    from machined.network.addresses import write_json_atomic  # (ipaddress: only when writing)

    write_json_atomic(state_file(paths, machine), data, durable=False)


def update(paths: Paths, machine: str, **changes: Any) -> None:
    data = read(paths, machine) or {}
    data.update(changes)
    write(paths, machine, data)


def forwarded_ports(paths: Paths) -> list[tuple[str, Any]]:
    """``(machine, PortForward)`` for each ``Port=`` of the machines with a
    runtime record: forwarded, or about to be (the record comes first). Read-only
    and light (no nft): ``start`` asks before anything starts."""
    from machined.errors import InvalidInput
    from machined.network.config import PortForward

    found = []
    for machine in machines(paths):
        for text in (read(paths, machine) or {}).get("ports") or ():
            try:
                found.append((machine, PortForward.parse(str(text))))
            except InvalidInput:  # a record someone edited
                continue
    return found


def machines(paths: Paths) -> list[str]:
    """Machines that have a runtime record (set up and not torn down)."""
    try:
        entries = list(paths.runtime.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p.name for p in entries if not p.name.startswith(".") and (p / RECORD).is_file())
