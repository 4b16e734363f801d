"""Registration with systemd-machined (``org.freedesktop.machine1``), so that
``machinectl list/status/terminate/poweroff/reboot`` work on pymachine's
machines as on systemd-nspawn's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from machined.dbus import Bus, BusError

MACHINED = "org.freedesktop.machine1"
MACHINED_PATH = "/org/freedesktop/machine1"
MACHINED_MANAGER = "org.freedesktop.machine1.Manager"
SERVICE = "pymachine"


def register(
    bus: Bus, name: str, leader: int, root_directory: str, ifindices: Sequence[int] = ()
) -> None:
    """``RegisterMachine[WithNetwork](name, id, service, class, leader, root[, ifindices])``.

    machined finds the unit from the leader's cgroup, so the machine belongs to
    ``pymachine-NAME.service`` (or the ``run`` scope) and ``machinectl terminate``
    stops that unit.
    """
    args = [name, [], SERVICE, "container", leader, root_directory]
    if ifindices:
        bus.call(
            MACHINED,
            MACHINED_PATH,
            MACHINED_MANAGER,
            "RegisterMachineWithNetwork",
            "sayssusai",
            [*args, list(ifindices)],
        )
    else:
        bus.call(MACHINED, MACHINED_PATH, MACHINED_MANAGER, "RegisterMachine", "sayssus", args)


def unregister(bus: Bus, name: str) -> None:
    """Forget the machine now, so an immediate restart can register again."""
    with contextlib.suppress(BusError):
        bus.call(MACHINED, MACHINED_PATH, MACHINED_MANAGER, "UnregisterMachine", "s", [name])


def is_registered(bus: Bus, name: str) -> bool:
    try:
        bus.call(MACHINED, MACHINED_PATH, MACHINED_MANAGER, "GetMachine", "s", [name])
    except BusError:
        return False
    return True


def registered(bus: Bus) -> list[str]:
    """Names of the machines machined knows that pymachine registered."""
    machines = bus.call(MACHINED, MACHINED_PATH, MACHINED_MANAGER, "ListMachines")
    return [name for name, _class, service, _path in machines if service == SERVICE]
