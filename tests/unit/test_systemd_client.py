"""The systemd client's round trips and the machine verbs' choice of unit, against
a fake bus (no systemd needed)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from machined import definition as definitions
from machined.dbus import BusError
from machined.definition import MachineDefinition
from machined.errors import Conflict, InvalidInput, NotFound, NotRunning
from machined.machines import Machines
from machined.network.config import NetworkMode, PortForward
from machined.paths import Paths
from machined.systemd import JobFailed, Systemd, unit_object_path


class FakeBus:
    """Answers the manager's calls from a table of units: name -> (load, active).
    A job's JobRemoved (its result from RESULTS, "done" by default) arrives when
    the client waits; WAITED counts the jobs queued before each wait."""

    def __init__(
        self, units: dict[str, tuple[str, str]] | None = None, results: dict[str, str] | None = None
    ) -> None:
        self.units = units or {}
        self.results = results or {}
        self.refuse: dict[str, str] = {}  # unit -> the D-Bus error its job's call gets
        self.calls: list[str] = []
        self.waited: list[int] = []
        self._callback = None
        self._signals: list[tuple[int, str, str, str]] = []
        self._jobs = itertools.count(1)

    def call(self, destination, path, interface, method, signature="", args=(), **kw) -> Any:
        self.calls.append(method)
        if method == "ListUnitsByPatterns":
            _states, patterns = args
            return [
                (name, "", load, active, "", "", "/", 0, "", "/")
                for name, (load, active) in self.units.items()
                if name in patterns
            ]
        if method in ("StopUnit", "StartTransientUnit"):
            unit = args[0]
            if unit in self.refuse:
                raise BusError(f"refused {unit}", self.refuse[unit])
            job = f"/org/freedesktop/systemd1/job/{next(self._jobs)}"
            result = self.results.get(unit, "done")
            self._signals.append((1, job, unit, result))
            if result == "done":
                self.units[unit] = ("loaded", "inactive" if method == "StopUnit" else "active")
            return job
        if method == "ResetFailedUnit":
            return None
        raise AssertionError(f"unexpected call {method}")

    def get_all(self, destination, path, interface) -> dict[str, Any]:
        self.calls.append("GetAll")
        for name, (load, active) in self.units.items():
            if unit_object_path(name) == path:
                return {"LoadState": load, "ActiveState": active}
        return {"LoadState": "not-found", "ActiveState": "inactive"}

    def match_signal(self, sender, path, interface, member, callback) -> None:
        self.calls.append(f"AddMatch:{member}")
        self._callback = callback

    def process_until(self, done, timeout) -> bool:
        self.waited.append(len(self._signals))
        while self._signals:
            self._callback(self._signals.pop(0))
        return done()

    def close(self) -> None:
        pass


def test_unit_object_path_escapes_as_sd_bus_does() -> None:
    prefix = "/org/freedesktop/systemd1/unit/"
    assert unit_object_path("pymachine-t1.service") == prefix + "pymachine_2dt1_2eservice"
    assert unit_object_path("pymachine-a_b.scope") == prefix + "pymachine_2da_5fb_2escope"
    assert unit_object_path("1x") == prefix + "_31x"  # a leading digit is escaped too


def test_active_states_is_one_call_and_leaves_out_units_not_found() -> None:
    bus = FakeBus({"a.service": ("loaded", "active"), "b.scope": ("not-found", "inactive")})
    states = Systemd(bus).active_states(["a.service", "b.scope", "c.service"])
    assert states == {"a.service": "active"}
    assert bus.calls == ["ListUnitsByPatterns"]


def test_status_is_one_get_all_and_none_for_a_unit_not_found() -> None:
    bus = FakeBus({"a.service": ("loaded", "active")})
    systemd = Systemd(bus)
    assert systemd.status("a.service").running
    assert systemd.status("b.service") is None
    assert bus.calls == ["GetAll", "GetAll"]


def test_a_job_is_matched_but_not_subscribed() -> None:
    bus = FakeBus()
    Systemd(bus).stop_unit("a.service")
    assert bus.calls == ["AddMatch:JobRemoved", "StopUnit"]


@pytest.fixture
def machines(tmp_path: Path) -> tuple[Machines, FakeBus]:
    paths = Paths(tmp_path)
    paths.image("tiny").mkdir(parents=True)
    for name in ("web", "db", "app"):
        definitions.save(MachineDefinition(name=name, image="tiny"), paths)
    bus = FakeBus()
    machines = Machines(paths)
    machines._systemd = Systemd(bus)
    return machines, bus


def test_stop_asks_once_for_both_units_then_stops_the_running_one(machines) -> None:
    m, bus = machines
    bus.units = {"pymachine-web.service": ("loaded", "inactive")}
    bus.units["pymachine-web.scope"] = ("loaded", "active")  # a foreground run
    m.stop("web")
    assert bus.calls == ["ListUnitsByPatterns", "AddMatch:JobRemoved", "StopUnit"]


def test_stop_of_a_stopped_or_unknown_machine(machines) -> None:
    m, bus = machines
    with pytest.raises(NotRunning):
        m.stop("web")
    with pytest.raises(NotFound):
        m.stop("nosuch")
    assert bus.calls == ["ListUnitsByPatterns", "ListUnitsByPatterns"]


def test_start_resets_only_a_loaded_unit(machines) -> None:
    m, bus = machines
    definition, states = m.startable("web")
    assert states == {} and bus.calls == ["ListUnitsByPatterns"]
    bus.units = {"pymachine-web.service": ("loaded", "failed")}
    bus.calls.clear()
    m.start("web")
    assert bus.calls == [
        "ListUnitsByPatterns",
        "ResetFailedUnit",
        "AddMatch:JobRemoved",
        "StartTransientUnit",
    ]


def _keys(
    m: Machines, mode: NetworkMode = NetworkMode.NONE, ports: tuple[str, ...] = (), **kw
) -> dict[str, str]:
    definition = MachineDefinition(name="web", image="tiny", **kw)
    definition.network.mode = mode
    definition.network.ports = [PortForward.parse(p) for p in ports]
    return {s.key: s.text for s in m.settings(definition)}


def test_a_plain_machine_has_no_exec_stop_post_and_a_runtime_directory(tmp_path: Path) -> None:
    m = Machines(Paths("/"))
    settings = _keys(m)
    assert settings["RuntimeDirectory"] == "pymachine/web"
    assert "ExecStopPost" not in settings
    assert "ExecStopPost" in _keys(m, NetworkMode.HOST, ephemeral=True)
    # bridged: a clean-up for the nft rules of its ports only (the record is in
    # the runtime directory, the veth dies with the namespace)
    assert "ExecStopPost" not in _keys(m, NetworkMode.BRIDGE)
    assert "ExecStopPost" in _keys(m, NetworkMode.BRIDGE, ports=("tcp:8080:80",))
    # another root: no RuntimeDirectory= there, so the shell line cleans up
    other = _keys(Machines(Paths(tmp_path)))
    assert "ExecStopPost" in other and "RuntimeDirectory" not in other


def test_bus_error_names_are_kept() -> None:
    assert BusError("x", "org.freedesktop.systemd1.NoSuchUnit").name.endswith("NoSuchUnit")


# --- several machines: every job queued, then all waited for ------------------------------


def _service(name: str) -> str:
    return f"pymachine-{name}.service"


def test_start_many_queues_every_job_then_waits_for_all(machines, monkeypatch) -> None:
    m, bus = machines
    monkeypatch.setattr("machined.machines.journal", lambda unit, lines=10: "")
    bus.results[_service("db")] = "failed"
    errors = m.start_many(["web", "nosuch", "db", "app"])
    assert [type(e).__name__ if e else None for e in errors] == [
        None,
        "NotFound",
        "PymachineError",
        None,
    ]
    assert str(errors[1]).startswith("machine 'nosuch' not found")
    assert str(errors[2]) == "machine 'db' failed to start (pymachine-db.service: result 'failed')"
    assert bus.waited == [3]  # one wait, once the three start jobs were queued
    assert bus.calls.count("ListUnitsByPatterns") == 1  # every machine's units at once
    assert bus.calls.count("AddMatch:JobRemoved") == 1
    assert bus.calls.index("AddMatch:JobRemoved") < bus.calls.index("StartTransientUnit")


def test_start_many_of_a_name_twice_starts_it_then_finds_it_running(machines) -> None:
    m, bus = machines
    first, second = m.start_many(["web", "web"])
    assert first is None
    assert isinstance(second, Conflict) and str(second) == "machine 'web' is already running"
    assert bus.waited == [1]


def test_start_many_reports_a_racing_start_as_a_conflict(machines) -> None:
    m, bus = machines
    bus.refuse = {_service("db"): "org.freedesktop.systemd1.UnitExists"}
    errors = m.start_many(["web", "db"])
    assert errors[0] is None and isinstance(errors[1], Conflict)
    assert "already running (or being started or stopped)" in str(errors[1])


def test_stop_many_queues_the_running_ones_then_waits_for_all(machines) -> None:
    m, bus = machines
    bus.units = {_service("web"): ("loaded", "active"), _service("app"): ("loaded", "active")}
    errors = m.stop_many(["web", "db", "app", "-bad"])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], NotRunning) and str(errors[1]) == "machine 'db' is not running"
    assert isinstance(errors[3], InvalidInput)
    assert bus.waited == [2]
    assert bus.calls.count("ListUnitsByPatterns") == 1
    assert bus.units[_service("web")][1] == bus.units[_service("app")][1] == "inactive"


def test_restart_many_stops_the_running_ones_together_then_starts_all(machines) -> None:
    m, bus = machines
    bus.units = {_service("web"): ("loaded", "active")}
    assert m.restart_many(["web", "db"]) == [None, None]
    assert bus.waited == [1, 2]  # web's stop, then both starts
    assert bus.calls.count("StopUnit") == 1 and bus.calls.count("StartTransientUnit") == 2


def test_restart_many_does_not_start_a_machine_whose_stop_failed(machines) -> None:
    m, bus = machines
    bus.units = {_service("web"): ("loaded", "active"), _service("db"): ("loaded", "active")}
    bus.results[_service("web")] = "failed"
    errors = m.restart_many(["web", "db"])
    assert isinstance(errors[0], JobFailed) and errors[1] is None
    assert bus.calls.count("StartTransientUnit") == 1


def test_a_job_without_its_signal_by_the_deadline_is_a_time_out() -> None:
    bus = FakeBus()
    systemd = Systemd(bus)
    a = systemd.stop_unit("a.service", wait=False)
    b = systemd.stop_unit("b.service", wait=False)
    bus._signals.pop()  # b's JobRemoved never comes
    errors = systemd.wait_jobs({a: "a.service", b: "b.service"}, 0.01)
    assert errors[a] is None
    assert str(errors[b]) == "timed out after 0.01s waiting for b.service"
