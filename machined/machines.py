"""The library API for machines: create, start, stop, remove, inspect.

The CLI is a thin layer over this module; a Python user gets the same checks
and errors. Every verb validates everything it can *before* changing anything,
so bad input changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from enum import StrEnum

from machined.daemon import NO_VALUE  # a property's "no value" (status_properties)
from machined.errors import Conflict, InvalidInput, NotFound, NotRunning, PymachineError
from machined.names import validate_machine_name
from machined.paths import ROOT_ENV, Paths, private_dirs, unit_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~1.5 ms a call)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from machined.definition import MachineDefinition
    from machined.runtime.state import RuntimeState

    T = TypeVar("T")


def _definitions():
    """``machined.definition``, imported on first use: ``stop`` only asks whether
    a definition file exists and skips its ~20 ms of imports."""
    from machined import definition

    return definition


def _definition_exists(name: str, paths: Paths) -> bool:
    return paths.definition_file(name).is_file()  # = definition.exists, without its imports


class MachineState(StrEnum):
    RUNNING = "running"
    STARTING = "starting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_ACTIVE_TO_STATE = {
    "active": MachineState.RUNNING,
    "reloading": MachineState.RUNNING,
    "activating": MachineState.STARTING,
    "deactivating": MachineState.STOPPING,
    "failed": MachineState.FAILED,
}


class MachineInfo:
    """One machine as ``list``/``status`` show it. (A plain class: ``dataclasses``
    costs every CLI call ~4 ms of imports, and ``stop`` needs nothing else of it.)"""

    def __init__(
        self,
        name: str,
        state: MachineState,
        image: str | None,
        unit: str,
        *,
        definition: MachineDefinition | None = None,
        problem: str | None = None,  # why the definition could not be read (list goes on)
    ) -> None:
        self.name = name
        self.state = state
        self.image = image
        self.unit = unit
        self.address: str | None = None
        self.leader: int | None = None
        self.memory: int | None = None
        self.tasks: int | None = None
        self.since: float | None = None  # realtime seconds the machine became active
        self.result: str | None = None
        self.exit_status: int | None = None
        self.definition = definition
        self.unit_properties: dict[str, Any] = {}
        self.problem = problem

    def __repr__(self) -> str:
        return f"MachineInfo({self.name!r}, {self.state!r}, {self.unit!r})"

    @property
    def uptime(self) -> float | None:
        return (
            time.time() - self.since if self.since and self.state == MachineState.RUNNING else None
        )


# systemd's answers to a start that raced another start or a stop of the same unit
_RACING_START = (
    "org.freedesktop.systemd1.UnitExists",
    "org.freedesktop.systemd1.TransactionIsDestructive",
)


def scope_name(machine: str) -> str:
    return f"pymachine-{machine}.scope"


RUNTIME_BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split(':'); "
    "from machined import lazy; lazy.defer('inspect'); "  # see machined.lazy
    "from machined.runtime.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def runtime_command(name: str, *extra: str) -> list[str]:
    """The runtime's argv (``python -m machined.runtime NAME …``, spelled out):
    ``-I -S`` with this process's module path given, so the unit neither runs
    site.py and its .pth files (30–60 ms on every start and every stop here)
    nor depends on the environment of whoever started it."""
    from machined import package_parent

    path = [package_parent()]
    stdlib = os.path.dirname(os.__file__)  # the interpreter finds its own library
    skip = {os.getcwd(), stdlib, os.path.join(stdlib, "lib-dynload")}
    for entry in sys.path:
        if (
            entry
            and entry not in skip
            and ":" not in entry
            and entry not in path
            and os.path.isdir(entry)
        ):
            path.append(entry)
    return [sys.executable, "-I", "-S", "-c", RUNTIME_BOOTSTRAP, ":".join(path), name, *extra]


def runtime_environment(paths: Paths) -> dict[str, str]:
    env = {}
    if paths.root != Paths().root:
        env[ROOT_ENV] = str(paths.root)
    crash_at = os.environ.get("PYMACHINE_TEST_CRASH_AT")  # fault injection, tests only
    if crash_at:
        env["PYMACHINE_TEST_CRASH_AT"] = crash_at
    return env


class Machines:
    """Machines on this host. Opens the system bus lazily, once."""

    def __init__(self, paths: Paths | None = None, *, owns_network: bool | None = None) -> None:
        self.paths = paths or Paths.from_env()
        self._systemd = None
        #: whether this process tears down a stopped machine's network:
        #: pymachined, or anyone on a host without it
        self.owns_network = owns_network

    @property
    def systemd(self):
        if self._systemd is None:
            from machined.systemd import Systemd

            self._systemd = Systemd()
        return self._systemd

    def close(self) -> None:
        if self._systemd is not None:
            self._systemd.close()
            self._systemd = None

    def __enter__(self) -> Machines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- definitions -------------------------------------------------------
    def create(self, definition: MachineDefinition) -> None:
        """Write the definition and make the writable layer. A definition
        without a command (and not booting) takes its image's default command
        (an imported OCI image's Entrypoint/Cmd/Env/WorkingDir/User)."""
        if not definition.command and not definition.boot:
            apply_image_defaults(definition, self.paths)
        definition.validate()  # the image's values too, before anything is written
        if _definition_exists(definition.name, self.paths):
            raise Conflict(f"machine '{definition.name}' already exists")
        if definition.requires or definition.wants or definition.after:
            from machined import dependencies

            dependencies.check(definition, self.load)
        if not self.paths.image(definition.image).is_dir():
            raise NotFound(f"image '{definition.image}' not found in {self.paths.images}")
        from machined import credentials

        state_dir = self.paths.machine_state(definition.name)
        created_state = not state_dir.exists()
        try:
            private_dirs(self.paths.state, self.paths.images, state_dir.parent, state_dir)
            (state_dir / "upper").mkdir(parents=True, exist_ok=True)
            (state_dir / "work").mkdir(parents=True, exist_ok=True)
            if definition.secrets:
                credentials.save(self.paths, definition.name, definition.secrets)
            _definitions().save(definition, self.paths)
        except BaseException:
            if definition.secrets:
                credentials.remove(self.paths, definition.name)
            if created_state:
                import shutil

                shutil.rmtree(state_dir, ignore_errors=True)
            raise

    def load(self, name: str) -> MachineDefinition:
        return _definitions().load(name, self.paths)

    def port_sharers(self, definition: MachineDefinition) -> list[tuple[Any, str]]:
        """(port, machine) for each host port another machine's definition
        forwards too: only one of them can run at a time. ``create`` warns and
        goes on, as podman does (``start`` refuses the second one)."""
        mine = {(p.protocol, p.host_port) for p in definition.network.ports}
        if not mine or not _bridged(definition):
            return []
        shared = []
        for name in sorted(_definitions().list_names(self.paths)):
            if name == definition.name:
                continue
            try:
                other = self.load(name)
            except PymachineError:  # a broken definition: list and status say so
                continue
            if _bridged(other):
                shared += [
                    (p, name) for p in other.network.ports if (p.protocol, p.host_port) in mine
                ]
        return shared

    # --- state -------------------------------------------------------------
    def _unit_status(self, name: str, loaded: set[str] | None = None):
        """The machine's service, or its foreground scope when that is the one
        running (or failed). LOADED, when the caller has it (``list``): the units
        systemd has loaded; the others are not asked about (no round trip)."""
        service = None
        for unit in (unit_name(name), scope_name(name)):
            if loaded is not None and unit not in loaded:
                continue
            status = self.systemd.status(unit)
            if status is not None and (status.running or status.active_state == "failed"):
                return status
            if unit == unit_name(name):
                service = status
        return service

    def info(
        self, name: str, *, require_definition: bool = True, loaded: set[str] | None = None
    ) -> MachineInfo:
        validate_machine_name(name)
        definition = None
        problem = None
        try:
            definition = self.load(name)
        except (NotFound, InvalidInput) as exc:
            if require_definition:
                raise
            problem = str(exc) if isinstance(exc, InvalidInput) else None
        status = self._unit_status(name, loaded)
        state = MachineState.STOPPED
        if status is not None:
            state = _ACTIVE_TO_STATE.get(status.active_state, MachineState.STOPPED)
        info = MachineInfo(
            name=name,
            state=state,
            image=definition.image if definition else None,
            unit=status.name if status else unit_name(name),
            definition=definition,
            problem=problem,
        )
        if status is not None:
            info.memory = status.memory_current if status.running else None
            info.tasks = status.tasks_current if status.running else None
            info.since = status.active_enter_usec / 1e6 if status.active_enter_usec else None
            info.result = status.result
            info.exit_status = status.exec_main_status
            info.unit_properties = status.properties
        running = _runtime_state().read(self.paths, name)
        if running is not None and state in (MachineState.RUNNING, MachineState.STOPPING):
            info.leader = running.leader
            info.address = running.address
        if info.address is None and definition is not None and _bridged(definition):
            info.address = _address_of(name, self.paths)  # a stopped machine's lease
        return info

    def list(self) -> list[MachineInfo]:
        defined = set(_definitions().list_names(self.paths))
        loaded = set()
        from_units = set()
        for unit, _active, _sub in self.systemd.list_units(
            ["pymachine-*.service", "pymachine-*.scope"]
        ):
            if "@" in unit:  # an instance (pymachine-dns@BRIDGE, a snapshot's): no machine's
                continue
            loaded.add(unit)
            from_units.add(unit.removeprefix("pymachine-").rsplit(".", 1)[0])
        machines = defined | from_units
        names = defined | {n for n in from_units if not _is_port_proxy(n, machines, defined)}
        return [self.info(n, require_definition=False, loaded=loaded) for n in sorted(names)]

    def _unit_states(self, name: str) -> dict[str, str]:
        """ActiveState of the machine's service and scope, those loaded: one round trip."""
        return self._states_of([name])

    def _states_of(self, names: Sequence[str]) -> dict[str, str]:
        """:meth:`_unit_states` of several machines (valid names) in one round trip:
        once their jobs are queued, every call waits for systemd's work on them."""
        return self.systemd.active_states([u for n in names for u in (unit_name(n), scope_name(n))])

    def _batch_states(
        self, names: Sequence[str], errors: list[PymachineError | None]
    ) -> dict[str, str]:
        """:meth:`_states_of` the NAMES that are valid (the others' errors in ERRORS)."""
        valid = _each_of(names, errors, validate_machine_name)
        return self._states_of([names[i] for i in valid]) if valid else {}

    def _active_unit(self, name: str, states: dict[str, str] | None = None) -> tuple[str, str]:
        """(unit, ActiveState) as :meth:`_unit_status` picks it, from the states
        only: the service, or the scope when that is the one running (or
        failed); ("", "") when neither is loaded."""
        states = self._unit_states(name) if states is None else states
        for unit in (unit_name(name), scope_name(name)):
            state = states.get(unit, "")
            if _running(state) or state == "failed":
                return unit, state
        service = unit_name(name)
        return (service, states[service]) if service in states else ("", "")

    def is_running(self, name: str) -> bool:
        return _running(self._active_unit(name)[1])

    # --- lifecycle ---------------------------------------------------------
    def check_startable(self, name: str) -> MachineDefinition:
        """The definition, if the machine can start now (image there, not running)."""
        return self.startable(name)[0]

    def startable(
        self, name: str, states: dict[str, str] | None = None
    ) -> tuple[MachineDefinition, dict[str, str]]:
        """The definition, if the machine can start now (image there, not
        running), and the ActiveState of its units that systemd has loaded
        (a failed one must be reset before a transient start of its name).
        STATES: :meth:`_states_of` with this machine's, read by the caller."""
        definition = self.load(name)
        if not self.paths.image(definition.image).is_dir():
            raise NotFound(f"image '{definition.image}' of machine '{name}' not found")
        states = self._unit_states(name) if states is None else states
        # Still stopping (stopped by another client, a machine that powered itself
        # off, a killed runtime): wait for the stop to finish instead of calling it
        # running, so a start right after a stop never races it (systemd#13766).
        deadline = time.monotonic() + definition.stop_timeout + 10
        while self._active_unit(name, states)[1] == "deactivating":
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
            states = self._unit_states(name)
        if _running(self._active_unit(name, states)[1]):
            raise Conflict(f"machine '{name}' is already running")
        _check_host_ports(definition, self.paths)
        return definition, states

    def settings(self, definition: MachineDefinition, *, scope: bool = False) -> list:
        from machined import credentials
        from machined.properties import machine_settings
        from machined.runtime import cleanup

        name = definition.name
        clean_up = cleanup.needs_command(
            name,
            self.paths,
            bridged=_bridged(definition),
            ephemeral=definition.ephemeral,
            ports=bool(definition.network.ports),
            daemon=cleanup.daemon_cleans(self.paths),
        )
        return machine_settings(
            name,
            definition.resources,
            definition.stop_timeout,
            runtime_command(name),
            runtime_environment(self.paths),
            scope=scope,
            boot=definition.boot,
            exec_stop_post=(
                cleanup.command(name, self.paths, runtime_command(name, "--cleanup"))
                if clean_up
                else None
            ),
            pid_file=str(self.paths.pid_file(name)),
            runtime_directory=cleanup.runtime_directory(name, self.paths),
            exec_start_post=(
                runtime_command(
                    name,
                    "--wait-ready",
                    str(self.paths.machine_runtime(name)),
                    str(self.paths.pid_file(name)),
                )
                if definition.notify != "no" and not scope
                else None
            ),
            credentials=[tuple(c) for c in credentials.unit_credentials(definition, self.paths)],
            devices=[tuple(d) for d in definition.devices],
            watchdog=definition.watchdog,
            restart=definition.restart,
            dependencies=None
            if scope
            else {
                "Requires": [unit_name(n) for n in definition.requires],
                "Wants": [unit_name(n) for n in definition.wants],
                "After": [
                    unit_name(n)
                    for n in dict.fromkeys(
                        [*definition.requires, *definition.wants, *definition.after]
                    )
                ],
            },
        )

    def start(self, name: str, *, timeout: float = 120, _chain: tuple[str, ...] = ()) -> None:
        start = self._prepare_start(name, chain=_chain)
        if start.reload:
            self.systemd.reload()
        self._queue_start(start, wait=True, timeout=timeout)

    def start_many(
        self, names: Sequence[str], *, timeout: float = 120
    ) -> list[PymachineError | None]:
        """Start NAMES side by side, as ``systemctl start a b c`` does: see
        :func:`_rounds` and :meth:`_start_batch`. Each name's error (None:
        started), in NAMES' order; a failure never keeps the others from starting."""
        return _rounds(names, lambda batch: self._start_batch(batch, timeout))

    def _start_batch(self, names: Sequence[str], timeout: float) -> list[PymachineError | None]:
        """Validate every machine as :meth:`start` does, reload systemd once for
        the enabled ones whose unit file changed, queue every start job on this
        one connection, then wait for all of them."""
        errors: list[PymachineError | None] = [None] * len(names)
        states = self._batch_states(names, errors)
        starts = _each_of(names, errors, lambda name: self._prepare_start(name, states))
        for i, error in _ports_claimed_twice(starts).items():
            errors[i] = error
            del starts[i]
        if any(start.reload for start in starts.values()):
            self.systemd.reload()  # once, before any job runs
        jobs: dict[int, tuple[str, str]] = {}
        for i, start in starts.items():
            job = _attempt(errors, i, self._queue_start, start, wait=False)
            if job is not None:
                jobs[i] = (start.unit, job)
        for i, error in self._wait_all(jobs, timeout).items():
            if error is not None:
                errors[i] = self._start_error(starts[i], error)
        return errors

    def _start_dependencies(self, definition: MachineDefinition, chain: tuple[str, ...]) -> None:
        """Start the machines DEFINITION requires or wants, each waited for
        (ready, with Notify=): its transient unit's Requires= can only name
        units that exist. A wanted one that fails is left out, as systemd's
        Wants= does; a required one fails this start. CHAIN: the machines
        being started on the way here (a cycle a hand edit made)."""
        from machined import dependencies

        chain = (*chain, definition.name)
        for name, required in dependencies.started_first(definition):
            if name in chain:
                raise InvalidInput(f"dependency cycle: {' → '.join([*chain, name])}")
            if self.is_running(name):
                continue
            try:
                self.start(name, _chain=chain)
            except Conflict:
                continue  # started meanwhile by another client
            except PymachineError as exc:
                if required:
                    raise type(exc)(
                        f"machine '{definition.name}' requires '{name}', which did not start: {exc}"
                    ) from None

    def _prepare_start(
        self, name: str, states: dict[str, str] | None = None, chain: tuple[str, ...] = ()
    ) -> _Start:
        """What :meth:`start` checks and does before its job: the definition and
        the image, not running, a failed unit reset, an enabled machine's unit
        file re-rendered when its definition changed (by hand too)."""
        definition, states = self.startable(name, states)
        if definition.requires or definition.wants:
            self._start_dependencies(definition, chain)
        unit = unit_name(name)
        if unit in states:  # not loaded: nothing to reset (no round trip)
            self.systemd.reset_failed(unit)
        enabled = self.paths.unit_file(name).exists()
        reload = False
        if enabled:
            from machined import units

            reload = units.refresh(name, machines=self, reload=False, definition=definition)
        return _Start(name, unit, definition, enabled, reload)

    def _queue_start(self, start: _Start, *, wait: bool, timeout: float = 120) -> str:
        """Queue START's job (StartUnit for an enabled machine: its unit file;
        else StartTransientUnit) and, if WAIT, wait for it; the job's path."""
        from machined.dbus import BusError
        from machined.systemd import JobFailed

        try:
            if start.enabled:
                return self.systemd.start_unit(start.unit, wait=wait, timeout=timeout)
            from machined.properties import to_properties

            return self.systemd.start_transient(
                start.unit,
                to_properties(self.settings(start.definition)),
                wait=wait,
                timeout=timeout,
            )
        except JobFailed as exc:
            raise self._start_error(start, exc) from None
        except BusError as exc:
            if exc.name in _RACING_START:  # another process started or is stopping it
                raise Conflict(
                    f"machine '{start.name}' is already running (or being started or stopped)"
                ) from None
            raise

    def _start_error(self, start: _Start, error: PymachineError) -> PymachineError:
        """What a start reports for its job's ERROR (a time-out as it is)."""
        from machined.systemd import JobFailed

        if not isinstance(error, JobFailed):
            return error
        if error.result == "canceled":  # a stop (another process) replaced our start job
            return Conflict(f"machine '{start.name}' was stopped while it was starting")
        return PymachineError(self._failure_report(start.name, start.unit, error.result))

    def _wait_all(
        self, jobs: dict[int, tuple[str, str]], timeout: float
    ) -> dict[int, PymachineError | None]:
        """Wait for every queued job (index -> (unit, job path)) at once: each one's error."""
        if not jobs:
            return {}
        errors = self.systemd.wait_jobs({job: unit for unit, job in jobs.values()}, timeout)
        return {i: errors[job] for i, (_unit, job) in jobs.items()}

    def _failure_report(self, name: str, unit: str, job_result: str) -> str:
        status = self.systemd.status(unit)
        result = status.result if status else job_result
        lines = journal(unit, lines=10)
        text = f"machine '{name}' failed to start ({unit}: result '{result}')"
        return text + ("\n" + lines if lines else "")

    def stop(self, name: str, *, timeout: float = 300) -> None:
        self._queue_stop(name, wait=True, timeout=timeout)
        self._finish_stop(name)

    def stop_many(
        self, names: Sequence[str], *, timeout: float = 300
    ) -> list[PymachineError | None]:
        """Stop NAMES side by side, as ``systemctl stop a b c`` does: every
        machine checked as :meth:`stop` does and its stop job queued, then all
        waited for. Each name's error (None: stopped), in NAMES' order."""
        return _rounds(names, lambda batch: self._stop_batch(batch, timeout))

    def _stop_batch(self, names: Sequence[str], timeout: float) -> list[PymachineError | None]:
        errors: list[PymachineError | None] = [None] * len(names)
        states = self._batch_states(names, errors)
        jobs = _each_of(names, errors, lambda name: self._queue_stop(name, states, wait=False))
        for i, error in self._wait_all(jobs, timeout).items():
            errors[i] = error
            if error is None:
                _attempt(errors, i, self._finish_stop, names[i])
        return errors

    def _queue_stop(
        self, name: str, states: dict[str, str] | None = None, *, wait: bool, timeout: float = 300
    ) -> tuple[str, str]:
        """Queue the stop job of the machine's running unit and, if WAIT, wait
        for it: (unit, job path). STATES: as for :meth:`startable`."""
        validate_machine_name(name)
        states = self._unit_states(name) if states is None else states
        if not _definition_exists(name, self.paths) and unit_name(name) not in states:
            raise NotFound(f"machine '{name}' not found")
        unit, state = self._active_unit(name, states)
        if not _running(state):
            raise NotRunning(f"machine '{name}' is not running")
        from machined.dbus import BusError
        from machined.systemd import is_no_such_unit

        try:
            return unit, self.systemd.stop_unit(unit, wait=wait, timeout=timeout)
        except BusError as exc:
            if is_no_such_unit(exc):  # it stopped (and was unloaded) meanwhile
                raise NotRunning(f"machine '{name}' is not running") from None
            raise

    def _finish_stop(self, name: str) -> None:
        """Gone from ``machinectl list`` and ``ip link`` when ``stop`` returns:
        machined drops a stopped unit's machine on its own, and the kernel a
        bridged machine's veth with its namespace, but both a moment later, and
        the units without an ExecStopPost= do not wait for either
        (runtime.cleanup.needs_command)."""
        from machined.runtime import cleanup

        if (cleanup.MACHINED_STATE / name).exists():
            from machined import registry

            registry.unregister(self.systemd.bus, name)
        owner = self.owns_network
        if owner is None:  # pymachined removes it otherwise, when the unit goes inactive
            owner = not cleanup.daemon_cleans(self.paths)
        if owner:
            from machined.network import state as network_state

            if network_state.host_has_link(network_state.host_ifname(name)):
                from machined import network  # pyroute2: only for a veth that lingers

                network.delete_lingering_veth(name)

    def restart(self, name: str) -> None:
        if self.is_running(name):
            self.stop(name)
        self.start(name)

    def restart_many(self, names: Sequence[str]) -> list[PymachineError | None]:
        """:meth:`restart` of NAMES side by side: the running ones' stop jobs all
        at once, then the start jobs of all but those whose stop failed."""
        return _rounds(names, self._restart_batch)

    def _restart_batch(self, names: Sequence[str]) -> list[PymachineError | None]:
        errors: list[PymachineError | None] = [None] * len(names)
        running = _each_of(names, errors, self.is_running)
        stopping = [i for i, yes in running.items() if yes]
        _into(errors, stopping, self.stop_many([names[i] for i in stopping]))
        starting = [i for i in range(len(names)) if errors[i] is None]
        _into(errors, starting, self.start_many([names[i] for i in starting]))
        return errors

    def kill(self, name: str, signal_number: int) -> None:
        """Send the signal to the machine's PID 1 ourselves, queued as sigqueue(3)
        does, rather than by systemd's KillUnit (kill(2)): pymachine-init passes
        a queued SIGINT on as the user's interrupt, where a killed one is
        machinectl's reboot; and a `run` machine's scope has no main process
        for KillUnit."""
        from machined.runtime import cgroup, linux

        leader = self.running_state(name)
        gone = NotRunning(f"machine '{name}' is not running")
        try:
            pidfd = os.pidfd_open(leader.leader)
        except ProcessLookupError:
            raise gone from None
        try:
            # Held by the pidfd, the PID is the leader's as long as it is in the machine's cgroup.
            where = cgroup.unified_mount() + cgroup.own_cgroup(leader.leader)
            if f"{where}/".startswith(f"{leader.payload_cgroup}/"):
                linux.queue_signal(pidfd, signal_number)
                return
        except (ProcessLookupError, FileNotFoundError):
            pass
        finally:
            os.close(pidfd)
        raise gone

    def remove(self, name: str) -> None:
        validate_machine_name(name)
        if not _definition_exists(name, self.paths):
            raise NotFound(f"machine '{name}' not found")
        if self.is_running(name):
            raise Conflict(f"machine '{name}' is running; stop it first")
        unit_file = self.paths.unit_file(name)
        if unit_file.exists():
            raise Conflict(f"machine '{name}' is enabled; run 'pymachine disable {name}' first")
        if (self.paths.definitions / "schedules" / f"{name}.json").exists():  # machined.schedule
            raise Conflict(
                f"machine '{name}' has a snapshot or backup schedule; "
                f"run 'pymachine schedule {name} --off [--backup]' first"
            )
        self.paths.definition_file(name).unlink()
        import shutil  # here: shutil loads bz2 and lzma, which start/stop/list need not pay for

        shutil.rmtree(self.paths.machine_state(name), ignore_errors=True)
        shutil.rmtree(self.paths.machine_runtime(name), ignore_errors=True)
        from machined import credentials

        credentials.remove(self.paths, name)
        with contextlib.suppress(Exception):
            from machined import network

            network.release(name, self.paths)
        from machined.runtime import userns

        userns.release(self.paths.state, name)
        with contextlib.suppress(Exception):
            self.systemd.reset_failed(unit_name(name))

    def gc(self) -> list[str]:
        """Clean what machines that are not running left behind (a runtime that
        was SIGKILLed, a crash): runtime directories, machined registrations,
        veths, nft rules. Returns a line per thing cleaned."""
        import shutil

        from machined import registry

        active = (MachineState.RUNNING, MachineState.STARTING, MachineState.STOPPING)
        running = {info.name for info in self.list() if info.state in active}
        cleaned: list[str] = []
        if self.paths.runtime.is_dir():
            for directory in sorted(self.paths.runtime.iterdir()):
                if (
                    directory.is_dir()
                    and not directory.name.startswith(".")
                    and directory.name not in running
                ):
                    shutil.rmtree(directory, ignore_errors=True)
                    cleaned.append(f"runtime directory {directory}")
        for name in registry.registered(self.systemd.bus):
            if name not in running:
                registry.unregister(self.systemd.bus, name)
                cleaned.append(f"machined registration of {name}")
        try:
            from machined import network

            cleaned += [f"network of {name}" for name in network.gc(self.paths, running)]
        except ImportError:
            pass
        return cleaned

    def running_state(self, name: str) -> RuntimeState:
        validate_machine_name(name)
        if not _definition_exists(name, self.paths):
            raise NotFound(f"machine '{name}' not found")
        current = _runtime_state().read(self.paths, name)
        if current is None or not current.alive():
            raise NotRunning(f"machine '{name}' is not running")
        return current


def apply_image_defaults(definition: MachineDefinition, paths: Paths) -> None:
    """An imported OCI image brings its Entrypoint/Cmd/Env/WorkingDir/User
    along: these values and no others (each is checked as if typed by hand,
    so a hostile config is refused, never written as another key)."""
    from machined.images import ImageStore

    try:
        config = ImageStore(paths).config(definition.image)
    except NotFound:
        return  # create reports the missing image itself
    except InvalidInput as exc:
        raise InvalidInput(f"image '{definition.image}': {exc}") from None
    definition.command = list(config.command)
    definition.environment = {**config.environment_dict, **definition.environment}
    definition.working_directory = definition.working_directory or config.working_directory
    definition.user = definition.user or config.user


def status_properties(info: MachineInfo, paths: Paths) -> dict[str, Any]:
    """What ``status`` and ``list`` show of a machine, as the D-Bus properties
    of its object (``org.pymachine.machine1.Machine``): the CLI renders these,
    whether pymachined or this process computed them."""
    definition = info.definition
    return {
        "Name": info.name,
        "State": str(info.state),
        "Image": info.image or "",
        "Unit": info.unit,
        "Leader": info.leader or 0,
        "Addresses": [info.address] if info.address else [],
        "Limits": dict(definition.resources) if definition else {},
        "MemoryCurrent": NO_VALUE if info.memory is None else info.memory,
        "TasksCurrent": NO_VALUE if info.tasks is None else info.tasks,
        "Since": int(info.since * 1_000_000) if info.since else 0,
        "Result": info.result or "",
        "ExitStatus": -1 if info.exit_status is None else info.exit_status,
        "Enabled": paths.unit_file(info.name).is_file(),
        "Boot": bool(definition and definition.boot),
        "NetworkMode": str(definition.network.mode) if definition else "",
        "Command": list(definition.command) if definition else [],
        "Security": _security_of(info, paths),
        "Problem": info.problem or "",
        "Health": _health_of(info, paths),
    }


def _health_of(info: MachineInfo, paths: Paths) -> dict[str, str]:
    """HealthCmd='s last result (the init's record), while the machine runs."""
    definition = info.definition
    checked = definition is not None and (
        definition.health.command is not None
        or (definition.boot and definition.health.watched())  # guest health
    )
    if info.state != MachineState.RUNNING or not checked:
        return {}
    from machined.runtime import notify

    return notify.read_health(str(paths.machine_runtime(info.name))) or {}


def _security_of(info: MachineInfo, paths: Paths) -> dict[str, str]:
    """What confines the running machine, from its runtime's record."""
    if info.state != MachineState.RUNNING:
        return {}
    from machined.runtime import security

    # security.read_state, without its preload: that imports pyseccomp and loads
    # libseccomp (~6 ms) for exec, which applies the policy; status only shows it
    record = paths.machine_runtime(info.name) / security.POLICY_FILE
    try:
        policy = security.SecurityPolicy.from_json(record.read_text())
    except (OSError, ValueError, TypeError):
        return {}
    return {key: str(value) for key, value in security.describe(policy).items() if value}


class _Start:
    """A start checked and ready to queue (:meth:`Machines._prepare_start`)."""

    __slots__ = ("name", "unit", "definition", "enabled", "reload")

    def __init__(
        self, name: str, unit: str, definition: MachineDefinition, enabled: bool, reload: bool
    ) -> None:
        self.name = name
        self.unit = unit
        self.definition = definition
        self.enabled = enabled  # its unit file, rather than a transient unit
        self.reload = reload  # the unit file was re-rendered: systemd must reload it


def _attempt(
    errors: list[PymachineError | None], i: int, action: Callable[..., T], *args: Any, **kw: Any
) -> T | None:
    """ACTION(*ARGS, **KW), or None with its error kept as ERRORS[I]."""
    try:
        return action(*args, **kw)
    except PymachineError as exc:
        errors[i] = exc
        return None


def _is_port_proxy(name: str, machines: set[str], defined: set[str]) -> bool:
    """Whether the unit name NAME (``pymachine-NAME.service``) is the ``[::1]``
    proxy of a machine's ``Port=`` (``proxies.unit_names``: ``MACHINE-portN``)
    rather than a machine: MACHINE is one, and NAME has no definition itself."""
    base, separator, port = name.rpartition("-port")
    return bool(separator) and port.isdigit() and base in machines and name not in defined


def _each_of(
    names: Sequence[str], errors: list[PymachineError | None], action: Callable[[str], T]
) -> dict[int, T]:
    """ACTION of each name, by index, for those without an error (kept in ERRORS)."""
    done: dict[int, T] = {}
    for i, name in enumerate(names):
        if errors[i] is None:
            result = _attempt(errors, i, action, name)
            if errors[i] is None:
                done[i] = result  # type: ignore[assignment]
    return done


def _into(
    errors: list[PymachineError | None], indices: list[int], results: list[PymachineError | None]
) -> None:
    """A batch's RESULTS, run over the names at INDICES, into ERRORS."""
    for i, error in zip(indices, results, strict=True):
        errors[i] = error


def _rounds(
    names: Sequence[str], batch: Callable[[Sequence[str]], list[PymachineError | None]]
) -> list[PymachineError | None]:
    """BATCH of NAMES with each name at most once a round, rounds one after the
    other: ``start a a`` starts a and then finds it running (exit code 5), as two
    starts one after the other did; one start job per unit and round."""
    errors: list[PymachineError | None] = [None] * len(names)
    pending = list(range(len(names)))
    while pending:
        first: dict[str, int] = {}
        for i in pending:
            first.setdefault(names[i], i)
        this = list(first.values())
        _into(errors, this, batch([names[i] for i in this]))
        pending = [i for i in pending if i not in first.values()]
    return errors


def _runtime_state():
    """``machined.runtime.state`` (json, a dataclass), on first use: not for ``stop``."""
    from machined.runtime import state

    return state


def _running(active_state: str) -> bool:
    from machined.systemd import RUNNING_STATES  # loaded: the state came through it

    return active_state in RUNNING_STATES


def _bridged(definition: MachineDefinition) -> bool:
    """Only a bridged machine has a lease (the others: no network.lifecycle import)."""
    from machined.network.config import NetworkMode

    return definition.network.mode == NetworkMode.BRIDGE


def _check_host_ports(definition: MachineDefinition, paths: Paths) -> None:
    """A :class:`Conflict` if a host port of the machine's ``Port=`` is forwarded
    to another machine: found before anything starts, where the runtime finds
    it only once the unit runs (and leaves a failed unit). From the runtime
    records, not the nft table (~15 ms of imports and libnftables); the runtime
    checks the table again, under the network lock: a start racing this one."""
    if not definition.network.ports or not _bridged(definition):
        return
    from machined.network import state
    from machined.network.config import check_ports_free

    check_ports_free(definition.name, definition.network.ports, state.forwarded_ports(paths))


def _ports_claimed_twice(starts: dict[int, _Start]) -> dict[int, Conflict]:
    """``start a b`` of two machines that forward the same host port: the
    second one's error (as if started one after the other)."""
    claimed: dict[tuple[str, int], str] = {}
    errors = {}
    for i, start in starts.items():
        ports = start.definition.network.ports if _bridged(start.definition) else ()
        taken = [p for p in ports if (p.protocol, p.host_port) in claimed]
        if taken:
            port = taken[0]
            owner = claimed[(port.protocol, port.host_port)]
            errors[i] = Conflict(
                f"host port {port.protocol}:{port.host_port} is already forwarded to "
                f"machine {owner!r}"
            )
            continue
        claimed.update(((p.protocol, p.host_port), start.name) for p in ports)
    return errors


def _address_of(name: str, paths: Paths) -> str | None:
    try:
        from machined import network

        return network.address_of(name, paths)
    except (ImportError, AttributeError, OSError):
        return None


def journal(unit: str, lines: int = 10, extra: list[str] | None = None) -> str:
    """The unit's last journal lines. journalctl is the journal's own reader:
    pystemd cannot read the journal, and the file format is journald's business."""
    return Journal(unit, lines, extra).lines()


class Journal:
    """:func:`journal`, started now and read later, so that journalctl runs
    while the caller asks systemd for the rest (``status``: ~3 ms less)."""

    def __init__(self, unit: str, lines: int = 10, extra: list[str] | None = None) -> None:
        import subprocess

        self.unit = unit
        args = ["journalctl", "--no-pager", "-q", "-u", unit, "-n", str(lines), *(extra or [])]
        try:
            self._process: subprocess.Popen[str] | None = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env={**os.environ, "SYSTEMD_COLORS": "0"},
            )
        except OSError:
            self._process = None

    def close(self) -> None:
        """Not wanted after all: stop and reap journalctl."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.communicate()
        self._process = None

    def lines(self) -> str:
        import subprocess

        if self._process is None:
            return ""
        try:
            out, _ = self._process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            return ""
        return out.rstrip()
