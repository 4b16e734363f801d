"""Enabled machines' unit files: rendering (pure), and enable/disable/set/refresh
against a fake systemd (the order of D-Bus calls, idempotency, rollback)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from machined import definition as definitions
from machined import units
from machined.definition import MachineDefinition
from machined.errors import InvalidInput, NotFound, NotRunning, PymachineError
from machined.machines import Machines, runtime_command
from machined.paths import Paths
from machined.properties import to_properties
from machined.systemd import UnitStatus
from machined.unitfile import parse

LIMITS = {
    "MemoryMax": "64M",
    "MemoryHigh": "50%",
    "CPUQuota": "20%",
    "TasksMax": "30",
    "AllowedCPUs": "0-1",
    "MemorySwapMax": "0",
}


def make(name: str = "web", **kw) -> MachineDefinition:
    kw.setdefault("resources", dict(LIMITS))
    return MachineDefinition(name=name, image="busybox", **kw)


def sections(text: str) -> dict[str, list[tuple[str, str]]]:
    return {s: [(e.key, e.value) for e in entries] for s, entries in parse(text).sections.items()}


def unquote(value: str) -> list[str]:
    """How systemd reads a word list back (for what quote_word produces)."""
    return [w.replace("%%", "%") for w in shlex.split(value)]


# --- render ------------------------------------------------------------------------


def test_render_carries_every_setting_of_the_transient_unit():
    paths = Paths()
    definition = make()
    text = units.render(definition, paths)
    parsed = sections(text)
    settings = Machines(paths).settings(definition)
    rendered = parsed["Unit"][:1] + parsed["Service"]
    assert [k for k, _ in rendered] == [s.key for s in settings]
    for (key, value), setting in zip(rendered, settings, strict=True):
        assert key == setting.key
        if key not in ("ExecStart", "Environment"):
            assert value == setting.text  # the text form, verbatim
    # the transient path gets the same list as D-Bus properties
    assert to_properties(settings)


def test_render_has_nspawn_unit_shape():
    text = units.render(make(), Paths())
    parsed = sections(text)
    unit = dict(parsed["Unit"])
    service = dict(parsed["Service"])
    assert unit["Description"] == "pymachine machine web"
    assert unit["PartOf"] == "machines.target"
    assert unit["Before"] == "machines.target"
    assert unit["After"] == "network.target"
    assert unit["RequiresMountsFor"].split() == [
        "/var/lib/machines/busybox",
        "/var/lib/pymachine/machines/web",
    ]
    assert service["Slice"] == "machine.slice"
    assert service["Delegate"] == "yes"
    assert service["Type"] == "forking"
    assert service["PIDFile"].endswith("/run/pymachine/web/leader.pid")
    assert service["KillMode"] == "mixed"
    assert service["SuccessExitStatus"] == "143"
    assert service["TimeoutStopSec"] == "15s"
    # python -I -S, with the module path spelled out (see machines.runtime_command)
    assert shlex.split(service["ExecStart"]) == runtime_command("web")
    assert shlex.split(service["ExecStart"])[:3] == [sys.executable, "-I", "-S"]
    for key, value in LIMITS.items():
        assert service[key] == value  # no doubled % in resource values (no specifiers there)
    assert parsed["Install"] == [("WantedBy", "machines.target")]
    assert "Environment" not in service  # default root: nothing to pass


def test_render_quotes_and_escapes_a_strange_root():
    root = Path("/srv/odd root/50%")
    text = units.render(make(), Paths(root))
    parsed = sections(text)
    unit = dict(parsed["Unit"])
    service = dict(parsed["Service"])
    assert unquote(unit["RequiresMountsFor"]) == [
        f"{root}/var/lib/machines/busybox",
        f"{root}/var/lib/pymachine/machines/web",
    ]
    assert unquote(service["Environment"]) == [f"PYMACHINE_ROOT={root}"]


def test_render_is_deterministic_and_ends_with_newline():
    a = units.render(make(), Paths())
    b = units.render(make(), Paths())
    assert a == b
    assert a.endswith("\n") and not a.endswith("\n\n")
    assert "\n\n\n" not in a


def test_render_validates_the_definition():
    with pytest.raises(InvalidInput):
        units.render(make(resources={"MemoryMax": "lots"}), Paths())


def test_stop_timeout_follows_the_definition():
    service = dict(sections(units.render(make(stop_timeout=2.5), Paths()))["Service"])
    assert service["TimeoutStopSec"] == "7.5s"


def test_watchdog_and_restart_reach_the_enabled_unit_file():
    """Restart= and WatchdogSec= are [Service] lines of the file, as of the transient unit."""
    service = sections(units.render(make(watchdog=3, restart="on-failure"), Paths()))["Service"]
    assert ("WatchdogSec", "3s") in service and ("Restart", "on-failure") in service
    assert ("NotifyAccess", "main") in service


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("machined.runtime", "machined.runtime"),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("50%", "50%%"),
        ("", '""'),
    ],
)
def test_quote_word(word, expected):
    assert units.quote_word(word) == expected
    assert unquote(units.quote_word(word)) == [word]


def test_quote_word_doubles_dollar_signs_where_systemd_expands_variables():
    assert units.quote_word("$HOME", variables=True) == '"$$HOME"'
    assert units.quote_word("${X}%", variables=True) == '"$${X}%%"'
    assert units.quote_word("$HOME") == '"$HOME"'  # Environment= expands nothing


def test_quote_word_refuses_line_breaks():
    with pytest.raises(InvalidInput):
        units.quote_word("a\nb")


def test_template_ships_inside_the_package():
    from machined.resources import templates_dir

    assert (templates_dir() / units.TEMPLATE).is_file()


def test_shipped_units_are_unit_files():
    shipped = dict(units.shipped_units())
    assert "machines.target" in shipped
    target = sections(shipped["machines.target"])
    assert ("WantedBy", "multi-user.target") in target["Install"]


# --- enable / disable / set / refresh against a fake systemd ----------------------------


def status(unit: str, active: str = "active", transient: bool = False, **props) -> UnitStatus:
    fragment = f"/run/systemd/transient/{unit}" if transient else f"/etc/systemd/system/{unit}"
    return UnitStatus(
        name=unit,
        active_state=active,
        sub_state="running" if active == "active" else "dead",
        result="success",
        main_pid=0,
        exec_main_status=0,
        exec_main_code=0,
        active_enter_usec=0,
        memory_current=None,
        tasks_current=None,
        properties={"FragmentPath": fragment, "Transient": transient, **props},
    )


class FakeSystemd:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.file_states: dict[str, str] = {"machines.target": "enabled"}
        self.units: dict[str, UnitStatus] = {}
        self.fail_enable = False

    def _log(self, *call) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def unit_file_state(self, unit):
        return self.file_states.get(unit)

    def status(self, unit):
        return self.units.get(unit)

    def active_states(self, units):
        return {u: self.units[u].active_state for u in units if u in self.units}

    def reset_failed(self, unit):
        self._log("reset_failed", unit)

    def reload(self):
        self._log("reload")

    def enable_unit_files(self, files, runtime=False, force=True):
        self._log("enable", list(files))
        if self.fail_enable:
            raise PymachineError("enable failed")
        changes = []
        for f in files:
            name = Path(f).name
            if self.file_states.get(name) != "enabled":
                self.file_states[name] = "enabled"
                changes.append(
                    ("symlink", f"/etc/systemd/system/machines.target.wants/{name}", str(f))
                )
        return [True, changes]

    def disable_unit_files(self, files, runtime=False):
        self._log("disable", list(files))
        for f in files:
            self.file_states[f] = "disabled"
        return [("unlink", f"/etc/systemd/system/machines.target.wants/{f}", "") for f in files]

    def start_unit(self, unit, **kw):
        self._log("start_unit", unit)
        self.units[unit] = status(unit)
        return f"/job/{unit}"

    def wait_jobs(self, jobs, timeout):
        self._log("wait_jobs", sorted(jobs.values()))
        return dict.fromkeys(jobs)

    def start_transient(self, unit, props, **kw):
        self._log("start_transient", unit)

    def stop_unit(self, unit, **kw):
        self._log("stop_unit", unit)
        self.units.pop(unit, None)

    def set_properties(self, unit, props, runtime):
        self._log("set_properties", unit, [p.name for p in props], runtime)

    def close(self):
        pass


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    paths = Paths(tmp_path)
    paths.image("busybox").mkdir(parents=True)
    definitions.save(make(resources={"MemoryMax": "64M"}), paths)
    machines = Machines(paths)
    fake = FakeSystemd()
    machines._systemd = fake
    return machines, fake, paths


def test_enable_writes_enables_then_reloads(env):
    machines, fake, paths = env
    result = units.enable("web", machines=machines)
    path = paths.unit_files / "pymachine-web.service"
    assert result.path == path and path.read_text() == units.render(definitions.load("web"), paths)
    assert fake.names() == ["reset_failed", "enable", "reload"]  # reload after the symlinks
    assert fake.calls[1] == ("enable", ["pymachine-web.service"])
    assert result.changes == [
        "Created symlink /etc/systemd/system/machines.target.wants/pymachine-web.service"
        " → pymachine-web.service."
    ]
    assert not result.already and not result.started


def test_enable_twice_is_idempotent(env):
    machines, fake, _ = env
    units.enable("web", machines=machines)
    fake.calls.clear()
    result = units.enable("web", machines=machines)
    assert result.already
    assert "enable" not in fake.names() and "reload" not in fake.names()


def test_enable_enables_a_disabled_machines_target_too(env):
    machines, fake, _ = env
    fake.file_states["machines.target"] = "disabled"
    units.enable("web", machines=machines)
    assert fake.calls[1] == ("enable", ["pymachine-web.service", "machines.target"])


def test_enable_without_machines_target_changes_nothing(env):
    machines, fake, paths = env
    del fake.file_states["machines.target"]
    with pytest.raises(PymachineError, match="machines.target is not installed"):
        units.enable("web", machines=machines)
    assert not (paths.unit_files / "pymachine-web.service").exists()


def test_enable_failure_removes_the_new_file(env):
    machines, fake, paths = env
    fake.fail_enable = True
    with pytest.raises(PymachineError, match="enable failed"):
        units.enable("web", machines=machines)
    assert not (paths.unit_files / "pymachine-web.service").exists()


def test_enable_unknown_machine(env):
    machines, fake, _ = env
    with pytest.raises(NotFound):
        units.enable("nope", machines=machines)
    assert fake.calls == []


def test_enable_now_starts_with_start_unit(env):
    machines, fake, _ = env
    result = units.enable("web", now=True, machines=machines)
    assert result.started
    assert fake.calls[-1] == ("start_unit", "pymachine-web.service")


def test_enable_a_transient_machine_enables_by_path_without_reload(env):
    machines, fake, paths = env
    fake.units["pymachine-web.service"] = status("pymachine-web.service", transient=True)
    fake.file_states["pymachine-web.service"] = "transient"
    result = units.enable("web", now=True, machines=machines)
    assert fake.calls == [("enable", [str(paths.unit_files / "pymachine-web.service")])]
    assert result.running and not result.started
    assert any("transient" in w for w in result.warnings)


def test_disable_disables_removes_and_reloads(env):
    machines, fake, paths = env
    units.enable("web", machines=machines)
    dropin = units.control_dropins("web", ["MemoryMax"], paths)[0]
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nMemoryMax=1M\n")
    fake.calls.clear()
    result = units.disable("web", machines=machines)
    assert not (paths.unit_files / "pymachine-web.service").exists()
    assert fake.names() == ["disable", "reload"]
    assert not dropin.exists()  # would otherwise apply to a later transient start
    assert not result.already and not result.running


def test_disable_now_stops_first(env):
    machines, fake, _ = env
    units.enable("web", now=True, machines=machines)
    fake.calls.clear()
    result = units.disable("web", now=True, machines=machines)
    assert fake.names() == ["stop_unit", "disable", "reload"]
    assert result.stopped


def test_disable_keeps_a_running_machine_running(env):
    machines, fake, _ = env
    units.enable("web", now=True, machines=machines)
    result = units.disable("web", machines=machines)
    assert result.running and "stop_unit" not in fake.names()


def test_disable_not_enabled_is_idempotent(env):
    machines, fake, _ = env
    result = units.disable("web", machines=machines)
    assert result.already
    assert "disable" not in fake.names() and "reload" not in fake.names()
    with pytest.raises(NotFound):
        units.disable("nope", machines=machines)


def test_refresh_is_a_no_op_for_a_machine_not_enabled(env):
    machines, fake, _ = env
    assert units.refresh("web", machines=machines) is False
    assert fake.calls == []


def test_refresh_re_renders_an_enabled_machine(env):
    machines, fake, paths = env
    units.enable("web", machines=machines)
    definition = definitions.load("web", paths)
    definition.resources["TasksMax"] = "10"
    definitions.save(definition, paths)
    fake.calls.clear()
    assert units.refresh("web", machines=machines) is True
    assert "TasksMax=10\n" in (paths.unit_files / "pymachine-web.service").read_text()
    assert fake.names() == ["reload"]
    assert units.refresh("web", machines=machines) is False  # up to date now


def test_refresh_does_not_render_a_current_unit_file(env, monkeypatch):
    machines, fake, paths = env
    units.enable("web", machines=machines)
    fake.calls.clear()

    def no_jinja2():
        raise AssertionError("rendered again")

    monkeypatch.setattr(units, "_environment", no_jinja2)
    assert units.refresh("web", machines=machines) is False
    machines.start("web")  # the enabled unit: StartUnit, and no Reload
    assert fake.names() == ["start_unit"]


def test_refresh_re_renders_after_a_hand_edit_of_the_definition(env):
    machines, fake, paths = env
    units.enable("web", machines=machines)
    definition_file = paths.definition_file("web")
    text = definition_file.read_text()
    assert "MemoryMax=64M\n" in text
    definition_file.write_text(text.replace("MemoryMax=64M", "MemoryMax=96M"))
    fake.calls.clear()
    machines.start("web")
    unit_text = (paths.unit_files / "pymachine-web.service").read_text()
    assert "MemoryMax=96M\n" in unit_text and "MemoryMax=64M" not in unit_text
    assert fake.names() == ["reload", "start_unit"]  # the new file, loaded before the start


def test_refresh_rewrites_a_hand_edited_or_older_unit_file(env):
    machines, fake, paths = env
    units.enable("web", machines=machines)
    path = paths.unit_files / "pymachine-web.service"
    rendered = path.read_text()
    path.write_text(rendered.replace("MemoryMax=64M", "MemoryMax=1G"))  # the file, by hand
    assert units.refresh("web", machines=machines) is True
    assert path.read_text() == rendered
    older = rendered[: rendered.rindex(units.STAMP)]  # rendered before checksums
    path.write_text(older)
    assert units.refresh("web", machines=machines) is True
    assert path.read_text() == rendered
    assert units.refresh("web", machines=machines) is False


def test_start_many_reloads_once_for_every_unit_file_rendered_again(env):
    machines, fake, paths = env
    definitions.save(make("db", resources={"MemoryMax": "64M"}), paths)
    for name in ("web", "db"):
        units.enable(name, machines=machines)
        definition_file = paths.definition_file(name)
        definition_file.write_text(definition_file.read_text().replace("64M", "96M"))
    fake.calls.clear()
    assert machines.start_many(["web", "db"]) == [None, None]
    assert fake.names() == ["reload", "start_unit", "start_unit", "wait_jobs"]


def test_set_persists_a_stopped_machine(env):
    machines, fake, paths = env
    result = units.set_properties("web", ["MemoryMax=128M", "CPUQuota=50%"], machines=machines)
    assert result.persisted and result.live_unit is None
    assert definitions.load("web", paths).resources == {"MemoryMax": "128M", "CPUQuota": "50%"}
    assert "set_properties" not in fake.names()


def test_set_applies_live_persists_and_re_renders(env):
    machines, fake, paths = env
    units.enable("web", now=True, machines=machines)
    dropin = units.control_dropins("web", ["MemoryMax"], paths)[0]
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\nMemoryMax=128M\n")  # what SetUnitProperties would leave
    fake.calls.clear()
    result = units.set_properties("web", ["MemoryMax=128M"], machines=machines)
    assert fake.calls[0] == ("set_properties", "pymachine-web.service", ["MemoryMax"], True)
    assert fake.names()[-1] == "reload"
    assert result.unit_file_rewritten
    assert "MemoryMax=128M\n" in (paths.unit_files / "pymachine-web.service").read_text()
    assert not dropin.exists()


def test_set_runtime_needs_a_running_machine_and_saves_nothing(env):
    machines, fake, paths = env
    with pytest.raises(NotRunning):
        units.set_properties("web", ["MemoryMax=1G"], runtime=True, machines=machines)
    fake.units["pymachine-web.service"] = status("pymachine-web.service", transient=True)
    result = units.set_properties("web", ["MemoryMax=1G"], runtime=True, machines=machines)
    assert result.live_unit == "pymachine-web.service" and not result.persisted
    assert definitions.load("web", paths).resources == {"MemoryMax": "64M"}


def test_set_bad_input_changes_nothing(env):
    machines, fake, paths = env
    before = paths.definition_file("web").read_text()
    for bad in (["MemoryMax=lots"], ["Nope=1"], ["MemoryMax"], []):
        with pytest.raises(InvalidInput):
            units.set_properties("web", bad, machines=machines)
    with pytest.raises(NotFound):
        units.set_properties("nope", ["MemoryMax=1G"], machines=machines)
    assert paths.definition_file("web").read_text() == before
    assert fake.calls == []


def test_set_takes_definition_keys_for_the_next_start(env):
    """Notify=, WatchdogSec=, Health*=, Requires=… go into the definition (a
    list key adds, an empty value clears), never to the live unit, and the
    enabled unit file follows."""
    machines, fake, paths = env
    definitions.save(make("db", resources={}), paths)
    units.enable("web", now=True, machines=machines)
    fake.calls.clear()
    result = units.set_properties(
        "web",
        ["Notify=yes", "WatchdogSec=5", "Restart=on-watchdog", "Requires=db", "Device=/dev/fuse",
         "HealthCmd=true", "HealthOnFailure=restart", "MemoryMax=1G"],
        machines=machines,
    )  # fmt: skip
    assert fake.calls[0] == ("set_properties", "pymachine-web.service", ["MemoryMax"], True)
    assert result.next_start == [
        "Notify", "WatchdogSec", "Restart", "Requires", "Device", "HealthCmd", "HealthOnFailure",
    ]  # fmt: skip
    web = definitions.load("web", paths)
    assert (web.notify, web.watchdog, web.restart, web.requires) == (
        "yes", 5.0, "on-watchdog", ["db"],
    )  # fmt: skip
    assert (str(web.devices[0]), web.health.command, web.resources["MemoryMax"]) == (
        "/dev/fuse", "true", "1G",
    )  # fmt: skip
    text = (paths.unit_files / "pymachine-web.service").read_text()
    assert "WatchdogSec=5s\n" in text and "Requires=pymachine-db.service\n" in text
    units.set_properties("web", ["Device=/dev/kvm:rw", "Requires="], machines=machines)
    web = definitions.load("web", paths)
    assert [str(d) for d in web.devices] == ["/dev/fuse", "/dev/kvm:rw"] and web.requires == []


@pytest.mark.parametrize(
    "assignment, error, message",
    [
        ("Requires=nope", NotFound, "Requires=nope: machine 'nope' not found"),
        ("Wants=web", InvalidInput, "cannot depend on itself"),
        ("Requires=db", InvalidInput, "dependency cycle: web → db → web"),
        ("Notify=healthy", InvalidInput, "Notify=healthy needs a HealthCmd="),
        ("WatchdogSec=soon", InvalidInput, "invalid duration"),
        ("Restart=sometimes", InvalidInput, "invalid Restart="),
        ("Device=/etc/shadow", InvalidInput, "invalid device"),
        ("LoadCredential=x:relative", InvalidInput, "invalid credential path"),
        ("HealthCmd=true\nImage=evil", InvalidInput, "line"),
        ("Image=other", InvalidInput, "Image"),
        ("SetCredential=token", InvalidInput, "SetCredential"),
    ],
)
def test_set_refuses_definition_keys_as_create_does_and_changes_nothing(
    env, assignment, error, message
):
    machines, fake, paths = env
    definitions.save(make("db", requires=["web"], resources={}), paths)
    before = paths.definition_file("web").read_text()
    with pytest.raises(error, match=message):
        units.set_properties("web", [assignment], machines=machines)
    assert paths.definition_file("web").read_text() == before
    assert fake.calls == []


def test_set_runtime_refuses_definition_keys(env):
    machines, fake, paths = env
    fake.units["pymachine-web.service"] = status("pymachine-web.service", transient=True)
    with pytest.raises(InvalidInput, match="Notify= applies at the next start"):
        units.set_properties("web", ["Notify=yes"], runtime=True, machines=machines)
    assert fake.calls == []


def test_install_units_copies_and_leaves_the_hosts_own(env):
    machines, fake, paths = env
    result = units.install_units(machines=machines)
    assert result.skipped == [("machines.target", "provided by the host")]
    assert not (paths.unit_files / "machines.target").exists()
    del fake.file_states["machines.target"]
    result = units.install_units(machines=machines)
    assert result.installed == ["machines.target"]
    assert (paths.unit_files / "machines.target").is_file()
    assert ("enable", ["machines.target"]) in fake.calls
    result = units.install_units(machines=machines)
    assert "machines.target" in result.unchanged and not result.installed


def test_install_units_installs_pymachined_and_version_sees_it(env):
    from machined.daemon import install

    machines, fake, paths = env
    assert len(install.problems(paths)) == len(install.FILES)  # all missing
    result = units.install_units(machines=machines)
    for _source, target in install.FILES:
        assert str(paths.root / target) in result.installed
    assert install.problems(paths) == []
    service = (paths.unit_files / "pymachined.service").read_text()
    assert "Type=dbus" in service and "BusName=org.pymachine.machine1" in service
    (paths.root / install.FILES[3][1]).write_text("<policyconfig/>")  # an older package's
    assert (
        len(install.problems(paths)) == 1 and "not this pymachine's" in install.problems(paths)[0]
    )


def test_enable_warns_of_wanted_and_required_machines_that_are_not_enabled(env):
    machines, fake, paths = env
    definitions.save(make("db", resources={}), paths)
    definitions.save(make("cache", resources={}), paths)
    definitions.save(make("app", requires=["db"], wants=["cache"], resources={}), paths)
    warnings = units.enable("app", machines=machines).warnings
    assert warnings == [
        "machine 'app' requires 'db', which is not enabled: it will fail to start at boot "
        "('pymachine enable db')",
        "machine 'app' wants 'cache', which is not enabled: it will start at boot without it "
        "('pymachine enable cache')",
    ]
    units.enable("db", machines=machines)
    units.enable("cache", machines=machines)
    assert units.enable("app", machines=machines).warnings == []
