"""Nothing of a machine runs while its writable layer is copied (a snapshot,
a backup, a commit): its cgroup is frozen for the copy through systemd's
``FreezeUnit`` (the cgroup v2 freezer), or, with ``stop``, the machine is
stopped and started again after. A machine someone else froze
(``systemctl freeze``) is copied as it is and left frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from machined.errors import Conflict
from machined.machines import Machines


@contextlib.contextmanager
def quiesced(machines: Machines, name: str, *, stop: bool = False, what: str) -> Iterator[None]:
    """The block runs while machine NAME does not (WHAT names the work in
    the refusal where the freezer is missing: "snapshot", "commit")."""
    from machined.systemd import RUNNING_STATES

    unit, state = machines._active_unit(name)
    if state not in RUNNING_STATES:
        yield
        return
    if stop:
        machines.stop(name)
        try:
            yield
        finally:
            machines.start(name)
        return
    from machined.dbus import BusError

    status = machines.systemd.status(unit)
    if status is not None and status.properties.get("FreezerState") == "frozen":
        yield  # frozen by someone else: copied so, and left so
        return
    try:
        machines.systemd.freeze_unit(unit)
    except BusError as exc:
        raise Conflict(
            f"machine '{name}' is running and its cgroup cannot be frozen here "
            f"({exc}); stop it first or pass --stop to stop it for the {what}"
        ) from None
    try:
        yield
    finally:
        machines.systemd.thaw_unit(unit)
