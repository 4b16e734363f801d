"""The running machine's state file, ``/run/pymachine/NAME/state.json``.

Written by the supervisor once the container is up; read by ``exec``,
``status`` and ``list`` without a D-Bus round trip.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from machined.paths import STATE_FILE, Paths


@dataclass(frozen=True)
class RuntimeState:
    """What the runtime recorded of a started machine."""

    name: str
    leader: int  # host-side PID of the container's PID 1
    supervisor: int  # the runtime; in service mode it exits once PID 1 is the main process
    payload_cgroup: str  # absolute path of the container's cgroup directory
    root: str  # the merged root, inside the runtime's mount namespace
    boot: bool
    started: float  # CLOCK_REALTIME seconds
    network_mode: str = "none"
    address: str | None = None
    host_ifname: str | None = None

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
    tmp.write_text(json.dumps(asdict(state)))
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
