"""Enabled machines for real (tier 1): unit files, machines.target, live limits.

In the session's throwaway systemd host: ``enable`` renders and enables
``/etc/systemd/system/pymachine-NAME.service``, ``start`` then runs that unit
file, ``set`` changes limits on the running unit and in the file,
``systemctl start machines.target`` (what boot does) starts enabled machines
with no pymachine command, ``disable`` undoes it all, and ``systemd-analyze
verify`` accepts every rendered and shipped unit.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = "autostart-img"
SLEEPER = ("/bin/sh", "-c", "while :; do sleep 1; done")
UNIT_DIR = "/etc/systemd/system"
WANTS = f"{UNIT_DIR}/machines.target.wants"
_counter = itertools.count()


def unit(name: str) -> str:
    return f"pymachine-{name}.service"


def show(host, name: str, *props: str) -> dict[str, str]:
    args = ["systemctl", "show", unit(name)]
    for prop in props:
        args += ["-p", prop]
    out = host.run(args).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def exists(host, path: str) -> bool:
    return host.run(["test", "-e", path], check=False).returncode == 0


@pytest.fixture(scope="module")
def image(systemd_host) -> str:
    if not exists(systemd_host, f"/var/lib/machines/{IMAGE}"):
        systemd_host.pymachine("bootstrap", "--distro", "busybox", IMAGE)
    return IMAGE


@pytest.fixture
def machine(systemd_host, image):
    """create NAME (a sleeper, no network) with -p limits; disable, stop and remove at the end."""
    made: list[str] = []

    def make(*limits: str, start: bool = False) -> str:
        name = f"auto-{os.getpid() % 1000}-{next(_counter)}"
        args = ["create", name, "--image", image, "--network", "none"]
        for limit in limits:
            args += ["-p", limit]
        systemd_host.pymachine(*args, "--", *SLEEPER)
        made.append(name)
        if start:
            systemd_host.pymachine("start", name)
        return name

    yield make
    for name in made:
        systemd_host.pymachine("disable", "--now", name, check=False)
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)


def verify(host, path: str) -> None:
    cp = host.run(["systemd-analyze", "verify", path], check=False)
    assert cp.returncode == 0, f"systemd-analyze verify {path}:\n{cp.stdout}{cp.stderr}"
    name = Path(path).name
    complaints = [line for line in cp.stderr.splitlines() if name in line]
    assert not complaints, "\n".join(complaints)


# --- verify ----------------------------------------------------------------------------


def test_rendered_unit_with_limits_passes_systemd_analyze_verify(systemd_host, machine):
    name = machine(
        "MemoryMax=64M",
        "MemoryHigh=48M",
        "MemorySwapMax=0",
        "CPUQuota=20%",
        "CPUWeight=50",
        "IOWeight=200",
        "TasksMax=30",
        "AllowedCPUs=0",
    )
    systemd_host.pymachine("enable", name)
    path = f"{UNIT_DIR}/{unit(name)}"
    text = systemd_host.run(["cat", path]).stdout
    assert "CPUQuota=20%\n" in text and "TasksMax=30\n" in text
    verify(systemd_host, path)


def test_shipped_units_pass_systemd_analyze_verify(systemd_host):
    from machined.units import UNIT_SUFFIXES

    shipped = sorted(p for p in (REPO / "units").iterdir() if p.name.endswith(UNIT_SUFFIXES))
    assert shipped
    for path in shipped:
        verify(systemd_host, str(path))


# --- enable / start / set / disable -------------------------------------------------------


def test_enable_start_set_disable(systemd_host, machine):
    host = systemd_host
    name = machine("MemoryMax=64M")
    path = f"{UNIT_DIR}/{unit(name)}"

    out = host.pymachine("enable", name).stdout
    assert f"Created symlink {WANTS}/{unit(name)}" in out
    assert host.run(["systemctl", "is-enabled", unit(name)]).stdout.strip() == "enabled"
    assert host.run(["readlink", f"{WANTS}/{unit(name)}"]).stdout.strip() == path
    assert "MemoryMax=64M\n" in host.run(["cat", path]).stdout
    assert "already enabled" in host.pymachine("enable", name).stdout  # idempotent

    host.pymachine("start", name)
    state = show(host, name, "FragmentPath", "ActiveState", "MemoryMax", "Transient")
    assert state == {
        "FragmentPath": path,
        "ActiveState": "active",
        "MemoryMax": str(64 * 2**20),
        "Transient": "no",
    }
    assert host.pymachine("status", name, check=False).returncode == 0

    host.pymachine("set", name, "-p", "MemoryMax=128M", "-p", "TasksMax=40")
    state = show(host, name, "ActiveState", "MemoryMax", "TasksMax", "NeedDaemonReload")
    assert state == {
        "ActiveState": "active",  # no restart
        "MemoryMax": str(128 * 2**20),
        "TasksMax": "40",
        "NeedDaemonReload": "no",
    }
    text = host.run(["cat", path]).stdout
    assert "MemoryMax=128M\n" in text and "TasksMax=40\n" in text
    assert "MemoryMax=128M" in host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout
    # the unit file is the one source: no set-property drop-in left overriding it
    assert show(host, name, "DropInPaths")["DropInPaths"] == ""
    cgroup = show(host, name, "ControlGroup")["ControlGroup"]
    memory_max = f"/sys/fs/cgroup{cgroup}/memory.max"
    if exists(host, memory_max):  # the kernel got it too
        assert host.run(["cat", memory_max]).stdout.strip() == str(128 * 2**20)

    out = host.pymachine("disable", "--now", name).stdout
    assert "Stopped machine" in out and f'Removed "{WANTS}/{unit(name)}"' in out
    assert not exists(host, path) and not exists(host, f"{WANTS}/{unit(name)}")
    assert show(host, name, "ActiveState")["ActiveState"] == "inactive"
    assert host.run(["systemctl", "is-enabled", unit(name)], check=False).returncode != 0
    assert "not enabled" in host.pymachine("disable", name).stdout  # idempotent
    # back to a transient unit, with the limit set before
    host.pymachine("start", name)
    state = show(host, name, "Transient", "MemoryMax")
    assert state == {"Transient": "yes", "MemoryMax": str(128 * 2**20)}


def test_machines_target_starts_an_enabled_machine(systemd_host, machine):
    """What boot does: machines.target wants the unit; no pymachine command runs."""
    host = systemd_host
    name = machine("MemoryMax=64M", "TasksMax=50")
    host.pymachine("enable", name)
    assert show(host, name, "ActiveState")["ActiveState"] == "inactive"
    host.run(["systemctl", "start", "machines.target"])
    assert wait_until(lambda: show(host, name, "ActiveState")["ActiveState"] == "active")
    state = show(host, name, "FragmentPath", "MemoryMax", "TasksMax")
    assert state == {
        "FragmentPath": f"{UNIT_DIR}/{unit(name)}",
        "MemoryMax": str(64 * 2**20),
        "TasksMax": "50",
    }
    listed = host.pymachine("list").stdout
    assert any(line.split()[:2] == [name, "running"] for line in listed.splitlines())
    # machinectl sees it under the same name
    assert wait_until(
        lambda: name in host.run(["machinectl", "list", "--no-legend"], check=False).stdout
    )
    host.pymachine("stop", name)  # stop works on the enabled unit too
    assert show(host, name, "ActiveState")["ActiveState"] == "inactive"
    host.pymachine("disable", name)


def test_enable_now_and_a_running_transient_machine(systemd_host, machine):
    host = systemd_host
    name = machine(start=True)
    assert show(host, name, "Transient")["Transient"] == "yes"
    cp = host.pymachine("enable", name)
    assert "transient" in cp.stderr  # said what happened: it runs on as it is
    # the transient unit's file shadows ours until it stops, but the link is made
    assert host.run(["readlink", f"{WANTS}/{unit(name)}"]).stdout.strip().endswith(unit(name))
    host.pymachine("restart", name)  # from its next start on, the unit file
    assert show(host, name, "FragmentPath")["FragmentPath"] == f"{UNIT_DIR}/{unit(name)}"
    assert host.run(["systemctl", "is-enabled", unit(name)]).stdout.strip() == "enabled"
    host.pymachine("disable", "--now", name)

    out = host.pymachine("enable", "--now", name).stdout
    assert "Started machine" in out
    assert show(host, name, "ActiveState", "FragmentPath") == {
        "ActiveState": "active",
        "FragmentPath": f"{UNIT_DIR}/{unit(name)}",
    }
    assert "already running" in host.pymachine("enable", "--now", name).stdout


def test_set_runtime_is_not_saved(systemd_host, machine):
    host = systemd_host
    name = machine("TasksMax=60")
    cp = host.pymachine("set", name, "--runtime", "-p", "TasksMax=20", check=False)
    assert cp.returncode == 3 and "not running" in cp.stderr
    host.pymachine("start", name)
    host.pymachine("set", name, "--runtime", "-p", "TasksMax=20")
    assert show(host, name, "TasksMax")["TasksMax"] == "20"
    assert "TasksMax=60" in host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout
    host.pymachine("restart", name)
    assert show(host, name, "TasksMax")["TasksMax"] == "60"


def test_bad_input_and_exit_codes(systemd_host, machine):
    host = systemd_host
    name = machine()
    definition = host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout
    for args, code, text in (
        (("enable", "no-such-machine"), 4, "not found"),
        (("disable", "no-such-machine"), 4, "not found"),
        (("enable", "bad/name"), 2, "invalid machine name"),
        (("set", "no-such-machine", "-p", "MemoryMax=1G"), 4, "not found"),
        (("set", name, "-p", "MemoryMax=lots"), 2, "invalid value for MemoryMax"),
        (("set", name, "-p", "NoSuchKey=1"), 2, "unknown property"),
        (("set", name, "-p", "MemoryMax"), 2, "KEY=VALUE"),
    ):
        cp = host.pymachine(*args, check=False)
        assert (cp.returncode, text in cp.stderr) == (code, True), (args, cp.stderr)
    assert host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout == definition
    host.pymachine("enable", name)
    cp = host.pymachine("remove", name, check=False)
    assert cp.returncode == 5 and "disable" in cp.stderr
    host.pymachine("disable", name)


def test_install_units(systemd_host):
    out = systemd_host.pymachine("install-units").stdout
    # this host has systemd-container's machines.target: left to the host
    assert "Skipped machines.target: provided by the host." in out
    assert not exists(systemd_host, f"{UNIT_DIR}/machines.target")
    assert (
        systemd_host.run(["systemctl", "is-enabled", "machines.target"]).stdout.strip() == "enabled"
    )


def test_start_renders_the_unit_file_again_only_after_the_definition_changed(systemd_host, machine):
    """A start of an enabled machine leaves a current unit file alone and renders
    it again after a hand edit of the definition, whose limit then applies."""
    host = systemd_host
    name = machine("TasksMax=30")
    host.pymachine("enable", name)
    path = f"{UNIT_DIR}/{unit(name)}"

    def file_state() -> str:
        return host.run(["stat", "-c", "%y %i", path]).stdout + host.run(["cat", path]).stdout

    before = file_state()
    host.pymachine("start", name)
    host.pymachine("stop", name)
    assert file_state() == before  # not written again
    host.run(["sed", "-i", "s/^TasksMax=30$/TasksMax=31/", f"/etc/pymachine/{name}.machine"])
    host.pymachine("start", name)
    assert show(host, name, "TasksMax", "NeedDaemonReload") == {
        "TasksMax": "31",
        "NeedDaemonReload": "no",
    }
    assert "TasksMax=31\n" in host.run(["cat", path]).stdout
