"""Names pymachine gives to host-side objects, and the per-machine runtime record.

The record is ``network.json`` in the machine's runtime directory
(``/run/pymachine/NAME/``: gone with a reboot, as are the links and nft rules it
describes). That directory is the unit's ``RuntimeDirectory=``, which systemd
removes when the unit stops. The record is written under the network lock
*before* anything is created, so a setup killed half-way still leaves a record
to clean up from, and a record means a run that owns what is there
(:mod:`machined.daemon.network` leaves such a machine's objects alone).

The CLI reads it on its own clock (``stop`` asks whether a veth lingers,
``start`` which host ports are forwarded): so the module imports nothing at
its top (``hashlib`` for a long name, ``json`` for a record, in the function).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~2.5 ms)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from machined.paths import Paths

IFNAME_MAX = 15
VETH_PREFIX = "vm-"  # vm-NAME when NAME fits
VETH_HASH_PREFIX = "vh-"  # vh-<12 hex of sha256(NAME)> otherwise: never equal to a vm- name
ALIAS_PREFIX = "pymachine:"  # IFLA_IFALIAS of the host-side veth: "pymachine:NAME"
CONTAINER_IFNAME = "host0"  # as systemd-nspawn names it
RECORD = "network.json"


def host_ifname(machine: str) -> str:
    """The host-side veth name: unique per machine, at most 15 characters (IFNAMSIZ)."""
    name = VETH_PREFIX + machine
    if len(name) <= IFNAME_MAX:
        return name
    import hashlib

    return VETH_HASH_PREFIX + hashlib.sha256(machine.encode()).hexdigest()[: IFNAME_MAX - 3]


def mac_address(seed: str) -> str:
    """A stable, locally administered unicast MAC (as nspawn derives one from the machine name).

    Stable addresses keep neighbour caches valid across restarts; a bridge with a
    fixed MAC does not change its address whenever a port comes or goes.
    """
    import hashlib

    digest = bytearray(hashlib.sha256(b"pymachine:" + seed.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in digest)


def host_has_link(ifname: str) -> bool:
    """Whether the host has an interface of that name: one stat in sysfs, which
    shows the network namespace it was mounted in, the host's (``pymachine
    stop`` asks after every stop, without a socket module)."""
    return os.path.exists(f"/sys/class/net/{ifname}")


def state_file(paths: Paths, machine: str) -> Path:
    return paths.machine_runtime(machine) / RECORD


def read(paths: Paths, machine: str) -> dict[str, Any] | None:
    """The machine's record: None if there is none, {} if it is unreadable
    (still a leftover to clean, with the default names)."""
    import json

    try:
        data = json.loads(state_file(paths, machine).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(paths: Paths, machine: str, data: dict[str, Any]) -> None:
    from machined.network.addresses import write_json_atomic

    write_json_atomic(state_file(paths, machine), data, durable=False)


def remove(paths: Paths, machine: str) -> None:
    state_file(paths, machine).unlink(missing_ok=True)


def forwarded_ports(paths: Paths) -> list[tuple[str, Any]]:
    """``(machine, PortForward)`` for each ``Port=`` of the machines with a
    runtime record: forwarded, or about to be (the record comes first).
    Read-only: ``start`` asks before anything starts."""
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
