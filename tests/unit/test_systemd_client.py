"""The systemd client's round trips and the machine verbs' choice of unit, against
a fake bus (no systemd needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from machined import definition as definitions
from machined.dbus import BusError
from machined.definition import MachineDefinition
from machined.errors import NotFound, NotRunning
from machined.machines import Machines
from machined.network.config import NetworkMode
from machined.paths import Paths
from machined.systemd import Systemd, unit_object_path


class FakeBus:
    """Answers the manager's calls from a table of units: name -> (load, active)."""

    def __init__(self, units: dict[str, tuple[str, str]] | None = None) -> None:
        self.units = units or {}
        self.calls: list[str] = []
        self._callback = None

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
            job = "/org/freedesktop/systemd1/job/1"
            self._callback((1, job, args[0], "done"))
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
    definitions.save(MachineDefinition(name="web", image="tiny"), paths)
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


def _keys(m: Machines, mode: NetworkMode = NetworkMode.NONE, **kw) -> dict[str, str]:
    definition = MachineDefinition(name="web", image="tiny", **kw)
    definition.network.mode = mode
    return {s.key: s.text for s in m.settings(definition)}


def test_a_plain_machine_has_no_exec_stop_post_and_a_runtime_directory(tmp_path: Path) -> None:
    m = Machines(Paths("/"))
    settings = _keys(m)
    assert settings["RuntimeDirectory"] == "pymachine/web"
    assert "ExecStopPost" not in settings
    assert "ExecStopPost" in _keys(m, NetworkMode.HOST, ephemeral=True)
    assert "ExecStopPost" in _keys(m, NetworkMode.BRIDGE)
    # another root: no RuntimeDirectory= there, so the shell line cleans up
    other = _keys(Machines(Paths(tmp_path)))
    assert "ExecStopPost" in other and "RuntimeDirectory" not in other


def test_bus_error_names_are_kept() -> None:
    assert BusError("x", "org.freedesktop.systemd1.NoSuchUnit").name.endswith("NoSuchUnit")
