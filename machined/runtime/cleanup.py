"""The unit's ``ExecStopPost=``: what a stopped machine leaves to tear down.

In service mode the runtime hands the unit over to the container's PID 1 once
it is up and exits, so this is the one place that tears down after every stop
(and after a runtime SIGKILLed at any step of start): the veth's lease and nft
rules, the machined registration (as systemd-nspawn unregisters on its way
out, so the machine is gone from ``machinectl list`` when stop returns), the
state file, an ephemeral layer. Mounts need nothing: they live in namespaces
that died with the container.

Kept light (``paths`` and ``network.state``; pyroute2 only when a bridged
machine left something): it runs at every stop.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

from machined.paths import PID_FILE, STATE_FILE, Paths

MACHINED_STATE = Path("/run/systemd/machines")  # machined's own record, one file a machine


def cleanup(name: str, paths: Paths) -> None:
    from machined.names import validate_machine_name
    from machined.network import state as network_state

    validate_machine_name(name)
    if network_state.read(paths, name) is not None:
        try:
            from machined import network

            network.teardown(name, paths)
        except Exception as exc:
            print(f"pymachine-runtime: network clean-up of {name} failed: {exc}", file=sys.stderr)
    if (MACHINED_STATE / name).exists():  # still registered: say so, D-Bus only then
        try:
            from machined import registry
            from machined.dbus import Bus

            with Bus() as bus:
                registry.unregister(bus, name)
        except Exception as exc:  # machined drops it with the unit anyway
            print(f"pymachine-runtime: could not unregister {name}: {exc}", file=sys.stderr)
    runtime_dir = paths.machine_runtime(name)
    for leftover in (STATE_FILE, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (runtime_dir / leftover).unlink()
    shutil.rmtree(runtime_dir / "ephemeral", ignore_errors=True)
