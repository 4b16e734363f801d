"""The unit's ``ExecStopPost=``: what a stopped machine leaves to tear down.

In service mode the runtime hands the unit over to the container's PID 1 once
it is up and exits, so this is the one place that tears down after every stop
(and after a runtime SIGKILLed at any step of start): the veth's lease and nft
rules, the machined registration (as systemd-nspawn unregisters on its way
out, so the machine is gone from ``machinectl list`` when stop returns), the
state file, an ephemeral layer. Mounts need nothing: they live in namespaces
that died with the container.

Kept light (``paths`` and ``network.state``; the network teardown only when a
bridged machine left something): it runs at every stop.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

from machined.paths import PID_FILE, STATE_FILE, Paths

MACHINED_STATE = Path("/run/systemd/machines")  # machined's own record, one file a machine
EPHEMERAL = "ephemeral"  # an ephemeral machine's writable layer, in its runtime directory
_UNREGISTER = (
    "busctl call --quiet org.freedesktop.machine1 /org/freedesktop/machine1 "
    "org.freedesktop.machine1.Manager UnregisterMachine s"
)


def runtime_directory(name: str, paths: Paths) -> str | None:
    """The unit's ``RuntimeDirectory=`` (``pymachine/NAME``): systemd removes it
    when the unit stops, the state file with it (and the PID file, which it
    unlinks itself), with no process of ours. None when the machine's runtime
    directory is not ``/run/pymachine/NAME`` (another ``PYMACHINE_ROOT``)."""
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


def command(name: str, paths: Paths, python_cleanup: list[str]) -> list[str]:
    """The unit's ``ExecStopPost=``: :func:`cleanup` in Python only when there
    is a network record or an ephemeral layer to tear down; otherwise (the
    common case) remove the state and PID files and unregister from machined
    with ``busctl``, a few milliseconds instead of a Python start (~50 ms)."""
    from machined.network import state as network_state

    runtime_dir = paths.machine_runtime(name)
    heavy = (network_state.state_file(paths, name), runtime_dir / EPHEMERAL)
    test = " || ".join(f"[ -e {shlex.quote(str(p))} ]" for p in heavy)
    files = " ".join(shlex.quote(str(runtime_dir / f)) for f in (STATE_FILE, PID_FILE))
    script = (
        f"if {test}; then exec {shlex.join(python_cleanup)}; fi; "
        f"rm -f {files}; exec {_UNREGISTER} {shlex.quote(name)} 2>/dev/null"
    )
    return ["/bin/sh", "-c", script]


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
    import shutil  # here: ~2 ms of imports for ephemeral machines only

    shutil.rmtree(runtime_dir / EPHEMERAL, ignore_errors=True)
