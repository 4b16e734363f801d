"""systemd's manager over D-Bus: start/stop units, wait for jobs, read state.

Follows systemd's own ``bus-wait-for-jobs.c``: subscribe to ``JobRemoved``
*before* queueing a job and buffer results by job path, because the signal can
arrive before the method reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from machined.dbus import Bus, BusError, encode_properties
from machined.errors import PymachineError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import
if TYPE_CHECKING:  # not at run time: stop has no properties to send (dataclasses)
    from typing import Any

    from machined.properties import Property

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
#: ActiveState values of a unit that has processes (or is about to)
RUNNING_STATES = ("active", "activating", "reloading", "deactivating")


def unit_object_path(unit: str) -> str:
    """The unit's D-Bus object path, as sd-bus escapes it (``bus_label_escape``):
    asking that path needs no ``GetUnit`` round trip first (systemctl does the same)."""
    label = "".join(
        c if (c.isascii() and c.isalnum() and not (i == 0 and c.isdigit())) else f"_{ord(c):02x}"
        for i, c in enumerate(unit)
    )
    return UNIT_PATH_PREFIX + label


def is_no_such_unit(exc: BusError) -> bool:
    """Whether systemd answered "Unit X not loaded." pystemd reports that error
    as a generic ENOENT error without its D-Bus name, so the text decides too."""
    return exc.name == NO_SUCH_UNIT or "not loaded" in str(exc)


class JobFailed(PymachineError):
    def __init__(self, unit: str, result: str) -> None:
        super().__init__(f"job for {unit} finished with result '{result}'")
        self.unit = unit
        self.result = result


class UnitStatus:
    """What ``status``/``list`` show of a unit: a snapshot of its properties.
    (A plain class: ``dataclasses`` costs every CLI call ~4 ms of imports.)"""

    __slots__ = (
        "name",
        "active_state",
        "sub_state",
        "result",
        "main_pid",
        "exec_main_status",
        "exec_main_code",
        "active_enter_usec",
        "memory_current",
        "tasks_current",
        "properties",
    )

    def __init__(
        self,
        *,
        name: str,
        active_state: str,
        sub_state: str,
        result: str,
        main_pid: int,
        exec_main_status: int,
        exec_main_code: int,
        active_enter_usec: int,
        memory_current: int | None,
        tasks_current: int | None,
        properties: dict[str, Any],
    ) -> None:
        self.name = name
        self.active_state = active_state
        self.sub_state = sub_state
        self.result = result
        self.main_pid = main_pid
        self.exec_main_status = exec_main_status
        self.exec_main_code = exec_main_code
        self.active_enter_usec = active_enter_usec
        self.memory_current = memory_current
        self.tasks_current = tasks_current
        self.properties = properties

    def __repr__(self) -> str:
        return f"UnitStatus({self.name!r}, {self.active_state!r}, {self.sub_state!r})"

    @property
    def running(self) -> bool:
        return self.active_state in RUNNING_STATES


_UINT64_UNSET = 2**64 - 1


def _optional(value: Any) -> int | None:
    return None if value is None or value == _UINT64_UNSET else int(value)


class Systemd:
    def __init__(self, bus: Bus | None = None) -> None:
        self.bus = bus or Bus()
        self._jobs: dict[str, str] = {}
        self._subscribed = False

    def close(self) -> None:
        self.bus.close()

    def __enter__(self) -> Systemd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls -----------------------------------------------------------
    def _manager(
        self, method: str, signature: str = "", args: Sequence[Any] = (), **kw: Any
    ) -> Any:
        return self.bus.call(SYSTEMD, MANAGER_PATH, MANAGER, method, signature, args, **kw)

    def _subscribe_jobs(self) -> None:
        """Match ``JobRemoved`` (before queueing a job). No ``Subscribe``: systemd
        sends a job's signals to the client that queued it anyway (the job tracks
        its requester, as for systemctl), and a subscriber makes systemd broadcast
        every unit's changes while it lives — a round trip and work for nothing."""
        if self._subscribed:
            return
        self.bus.match_signal(SYSTEMD, MANAGER_PATH, MANAGER, "JobRemoved", self._on_job_removed)
        self._subscribed = True

    def _on_job_removed(self, body: Any) -> None:
        _id, job, _unit, result = body
        self._jobs[job] = result

    def _wait_job(self, job: str, unit: str, timeout: float) -> None:
        error = self.wait_jobs({job: unit}, timeout)[job]
        if error is not None:
            raise error

    def wait_jobs(
        self, jobs: Mapping[str, str], timeout: float
    ) -> dict[str, PymachineError | None]:
        """Wait for every one of JOBS (job path -> unit), queued with ``wait=False``
        on this connection, at once: ``systemctl start a b c`` queues all its jobs
        and then waits, so that their units start side by side. Each job's error
        (:class:`JobFailed`, or a time-out once TIMEOUT seconds have passed for
        all of them); None for a job that finished with result "done"."""
        self.bus.process_until(lambda: all(job in self._jobs for job in jobs), timeout)
        return {job: self._job_error(job, unit, timeout) for job, unit in jobs.items()}

    def _job_error(self, job: str, unit: str, timeout: float) -> PymachineError | None:
        if job not in self._jobs:
            return PymachineError(f"timed out after {timeout:g}s waiting for {unit}")
        result = self._jobs.pop(job)
        return None if result == "done" else JobFailed(unit, result)

    def start_transient(
        self,
        unit: str,
        properties: Sequence[Property],
        *,
        aux: Sequence[tuple[str, Sequence[Property]]] = (),
        wait: bool = True,
        timeout: float = 120,
    ) -> str:
        """``StartTransientUnit(name, "fail", props, aux)`` and wait for the job
        (unless WAIT is false); the job's path."""
        self._subscribe_jobs()
        raw = encode_properties(properties) + [(ord("a"), b"(sa(sv))")]
        for aux_name, aux_properties in aux:
            raw += [(ord("r"), b"sa(sv)"), (ord("s"), aux_name.encode())]
            raw += encode_properties(aux_properties) + [(-1, None)]
        raw.append((-1, None))
        job = self._manager("StartTransientUnit", "ss", [unit, "fail"], raw_args=raw)
        if wait:
            self._wait_job(job, unit, timeout)
        return job

    def _job(self, method: str, unit: str, mode: str, wait: bool, timeout: float) -> str:
        self._subscribe_jobs()
        job = self._manager(method, "ss", [unit, mode])
        if wait:
            self._wait_job(job, unit, timeout)
        return job

    def start_unit(self, unit: str, *, wait: bool = True, timeout: float = 120) -> str:
        return self._job("StartUnit", unit, "fail", wait, timeout)

    def stop_unit(self, unit: str, *, wait: bool = True, timeout: float = 300) -> str:
        return self._job("StopUnit", unit, "replace", wait, timeout)

    def restart_unit(self, unit: str, *, wait: bool = True, timeout: float = 300) -> str:
        return self._job("RestartUnit", unit, "replace", wait, timeout)

    def freeze_unit(self, unit: str) -> None:
        """Freeze the unit's cgroup (returns once frozen); BusError where the
        cgroup v2 freezer is missing."""
        self._manager("FreezeUnit", "s", [unit])

    def thaw_unit(self, unit: str) -> None:
        self._manager("ThawUnit", "s", [unit])

    def reset_failed(self, unit: str) -> None:
        try:
            self._manager("ResetFailedUnit", "s", [unit])
        except BusError as exc:
            if not is_no_such_unit(exc):
                raise

    def set_properties(self, unit: str, properties: Sequence[Property], *, runtime: bool) -> None:
        self._manager(
            "SetUnitProperties", "sb", [unit, runtime], raw_args=encode_properties(properties)
        )

    def reload(self) -> None:
        self._manager("Reload")

    def enable_unit_files(
        self, files: Sequence[str], *, runtime: bool = False, force: bool = True
    ) -> Any:
        return self._manager("EnableUnitFiles", "asbb", [list(files), runtime, force])

    def disable_unit_files(self, files: Sequence[str], *, runtime: bool = False) -> Any:
        return self._manager("DisableUnitFiles", "asb", [list(files), runtime])

    def unit_file_state(self, unit: str) -> str | None:
        try:
            return self._manager("GetUnitFileState", "s", [unit])
        except BusError:
            return None

    # --- state -----------------------------------------------------------
    def unit_path(self, unit: str) -> str | None:
        """The unit's object path if systemd has it loaded, else None."""
        try:
            return self._manager("GetUnit", "s", [unit])
        except BusError as exc:
            if "NoSuchUnit" in exc.name or "not loaded" in str(exc):
                return None
            raise

    def status(self, unit: str) -> UnitStatus | None:
        """The unit's properties, None unless systemd has it loaded. One round
        trip: the object path is computed (a unit systemd does not have comes
        back as LoadState=not-found, as for ``systemctl status``), and sd-bus
        answers GetAll("") with every interface's properties (Unit, Service…)."""
        try:
            props = self.bus.get_all(SYSTEMD, unit_object_path(unit), "")
        except BusError as exc:
            if is_no_such_unit(exc) or "UnknownObject" in exc.name:
                return None
            raise
        if props.get("LoadState", "not-found") == "not-found":
            return None
        return UnitStatus(
            name=unit,
            active_state=props.get("ActiveState", ""),
            sub_state=props.get("SubState", ""),
            result=props.get("Result", ""),
            main_pid=int(props.get("MainPID", 0) or 0),
            exec_main_status=int(props.get("ExecMainStatus", 0) or 0),
            exec_main_code=int(props.get("ExecMainCode", 0) or 0),
            active_enter_usec=int(props.get("ActiveEnterTimestamp", 0) or 0),
            memory_current=_optional(props.get("MemoryCurrent")),
            tasks_current=_optional(props.get("TasksCurrent")),
            properties=props,
        )

    def active_states(self, units: Sequence[str]) -> dict[str, str]:
        """ActiveState of each of UNITS that systemd has loaded, in one round trip
        (``ListUnitsByPatterns`` with the names themselves: ours hold no glob
        characters); a unit that is only referenced (not-found) is left out."""
        listed = self._manager("ListUnitsByPatterns", "asas", [[], list(units)])
        return {u[0]: u[3] for u in listed if u[2] != "not-found" and u[0] in units}

    def list_units(self, patterns: Sequence[str]) -> list[tuple[str, str, str]]:
        """Loaded units matching glob patterns: (name, active_state, sub_state)."""
        units = self._manager("ListUnitsByPatterns", "asas", [[], list(patterns)])
        return [(u[0], u[3], u[4]) for u in units]
