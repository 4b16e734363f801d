"""The unit's ``ExecStopPost=``: what a stopped machine leaves to tear down.

In service mode the runtime hands the unit over to the container's PID 1 once
it is up and exits, so what systemd and the kernel do not tear down after a
stop is someone else's: a bridged machine's network (nft rules, a lingering
veth) is pymachined's, which follows the unit's stop
(:mod:`machined.daemon.network`), so no unit has a clean-up process for its
network where pymachined is installed. This clean-up runs for an ephemeral
layer, and on a host without pymachined for a machine with port forwards
(:func:`needs_command` says which machines need it). Mounts need nothing:
they live in namespaces that died with the container. The machined
registration needs nothing either: machined drops a machine whose unit has
stopped, and ``pymachine stop`` unregisters it at once.

:func:`run` takes every path it touches from its command line (:func:`command`
writes them there); units written by an older pymachine pass the same.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pathlib import Path

    from machined.paths import Paths

MACHINED_STATE_DIR = "/run/systemd/machines"  # machined's own record, one file a machine
EPHEMERAL = "ephemeral"  # an ephemeral machine's writable layer, in its runtime directory


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


DAEMON_UNIT = "pymachined.service"


def daemon_cleans(paths: Paths) -> bool:
    """Whether pymachined is installed here: it then sets up a bridged
    machine's network for its runtime and removes it when the machine's unit
    goes inactive (``machined.daemon.network``), reconciling at its start."""
    return (paths.unit_files / DAEMON_UNIT).exists()


def needs_command(
    name: str,
    paths: Paths,
    *,
    bridged: bool,
    ephemeral: bool,
    ports: bool = True,
    daemon: bool = False,
) -> bool:
    """Whether the unit needs an ``ExecStopPost=`` at all. A control process costs
    each stop 15–25 ms (fork, cgroup migration, exec: measured with systemd-run in
    a tier-1 host), so a machine with no port forwards (nft rules) and no
    ephemeral layer has none when its runtime directory is systemd's to remove:
    the PID, state and network record files go with it, a veth dies with the
    machine's network namespace (``pymachine stop`` and the next start delete
    one that lingers), and machined drops the registration when the unit stops
    (``pymachine stop`` unregisters at once; a crashed runtime's stale
    registration is dropped by the next start). A machine's port forwards
    (nft rules) need none either where pymachined (DAEMON) removes them."""
    return (bridged and ports and not daemon) or ephemeral or runtime_directory(name, paths) is None


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
    layer to tear down; otherwise remove the state and PID files, a few
    milliseconds instead of a Python start."""
    import shlex

    record, ephemeral, *files = (str(p) for p in targets(name, paths))
    test = " || ".join(f"[ -e {shlex.quote(p)} ]" for p in (record, ephemeral))
    python = [*python_cleanup, record, ephemeral, *files]
    script = (
        f"if {test}; then exec {shlex.join(python)}; fi; "
        f"exec rm -f {' '.join(shlex.quote(f) for f in files)}"
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
    record), ``files``, the ephemeral layer. Each step's failure is reported
    and the rest still run."""
    if not name or "/" in name or name.startswith("."):  # names were checked at create
        raise SystemExit(f"pymachine-runtime: refusing to clean up {name!r}")
    if os.path.exists(record):
        try:
            from machined import network
            from machined.paths import Paths

            network.teardown(name, Paths.from_env())
        except Exception as exc:
            print(f"pymachine-runtime: network clean-up of {name} failed: {exc}", file=sys.stderr)
    for leftover in files:
        try:  # noqa: SIM105 - contextlib costs ~2 ms of imports here
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    if os.path.isdir(ephemeral):
        import shutil  # (~2 ms of imports: ephemeral machines only)

        shutil.rmtree(ephemeral, ignore_errors=True)
