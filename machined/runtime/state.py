"""The running machine's state file, ``/run/pymachine/NAME/state.json``.

Written by the supervisor once the container is up; read by ``exec``,
``status`` and ``list`` without a D-Bus round trip.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from pathlib import Path

from machined.paths import STATE_FILE, Paths

_FIELDS = (
    "name",
    "leader",  # host-side PID of the container's PID 1
    "supervisor",  # the runtime; in service mode it exits once PID 1 is the main process
    "payload_cgroup",  # absolute path of the container's cgroup directory
    "root",  # the merged root, inside the runtime's mount namespace
    "boot",
    "started",  # CLOCK_REALTIME seconds
    "network_mode",
    "address",  # the machine's IPv4 address (bridge mode), without prefix
    "host_ifname",  # the host side of its veth (bridge mode)
)


class RuntimeState(namedtuple("RuntimeState", _FIELDS, defaults=("none", None, None))):
    """What the runtime recorded of a started machine. (A namedtuple: the
    runtime writes one on every start, and a dataclass costs ~0.3 ms to create.)"""

    __slots__ = ()

    def alive(self) -> bool:
        """The leader still exists and is the one we started (not a recycled PID)."""
        try:
            stat = Path(f"/proc/{self.leader}/stat").read_text()
        except OSError:
            return False
        return stat.split(") ", 1)[-1].split()[0] not in ("Z", "X")


def write(paths: Paths, state: RuntimeState) -> None:
    directory = paths.machine_runtime(state.name)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state._asdict()))
    os.rename(tmp, directory / STATE_FILE)


def read(paths: Paths, name: str) -> RuntimeState | None:
    try:
        data = json.loads((paths.machine_runtime(name) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        return RuntimeState(**data)
    except TypeError:
        return None
