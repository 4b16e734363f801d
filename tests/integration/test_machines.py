"""The walking skeleton, as a user sees it (issue 2), in a real systemd host."""

from __future__ import annotations

import json

import pytest

LOOP = ("/bin/sh", "-c", "echo hello from $(hostname); while :; do sleep 1; done")


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_started_machine_is_a_systemd_service_with_its_limits(
    systemd_host, make_machine, machine_name
):
    name = make_machine(
        machine_name, "-p", "MemoryMax=64M", "-p", "CPUQuota=20%", "-p", "TasksMax=50", command=LOOP
    )
    unit = f"pymachine-{name}.service"
    props = show(
        systemd_host,
        unit,
        "ActiveState",
        "MemoryMax",
        "CPUQuotaPerSecUSec",
        "TasksMax",
        "Slice",
        "Delegate",
        "KillMode",
        "Type",
        "MainPID",
    )
    main_pid = props.pop("MainPID")
    assert props == {
        "ActiveState": "active",
        "MemoryMax": "67108864",
        "CPUQuotaPerSecUSec": "200ms",
        "TasksMax": "50",
        "Slice": "machine.slice",
        "Delegate": "yes",
        "KillMode": "mixed",
        "Type": "forking",
    }
    # The runtime handed the unit over: its main process is the container's PID 1,
    # a child of systemd, and the leader machined knows.
    comm, ppid = systemd_host.run(["ps", "-o", "comm=,ppid=", "-p", main_pid]).stdout.split()
    assert (comm, ppid) == ("pymachine-init", "1")
    leader = systemd_host.run(["machinectl", "show", "-p", "Leader", "--value", name]).stdout
    assert leader.strip() == main_pid
    assert name in systemd_host.run(["machinectl", "list", "--no-legend"]).stdout
    status = systemd_host.run(["machinectl", "status", name]).stdout
    assert "pymachine" in status and unit in status
    assert systemd_host.pymachine("exec", name, "--", "hostname").stdout.strip() == name
    systemd_host.wait_for_journal(unit, f"hello from {name}")


def test_list_and_status_show_the_machine(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, "-p", "TasksMax=77", command=LOOP)
    table = systemd_host.pymachine("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "IMAGE", "ADDRESS", "MEMORY", "TASKS", "UPTIME"]
    row = next(line.split() for line in table if line.split()[0] == name)
    assert row[1:3] == ["running", "tiny"]
    entries = {m["name"]: m for m in json.loads(systemd_host.pymachine("list", "--json").stdout)}
    assert entries[name]["state"] == "running"
    assert entries[name]["unit"] == f"pymachine-{name}.service"
    assert entries[name]["leader"] > 1
    status = systemd_host.pymachine("status", name).stdout
    assert "State: running" in status
    assert f"Unit: pymachine-{name}.service" in status
    assert "TasksMax=77" in status
    assert f"hello from {name}" in status  # the journal's last lines
    data = json.loads(systemd_host.pymachine("status", name, "--json").stdout)
    assert data["limits"] == {"TasksMax": "77"} and data["state"] == "running"


def test_exec_passes_the_exit_status(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    assert (
        systemd_host.pymachine("exec", name, "--", "sh", "-c", "exit 7", check=False).returncode
        == 7
    )
    missing = systemd_host.pymachine("exec", name, "--", "/no/such/command", check=False)
    assert missing.returncode == 127
    assert "not found" in missing.stderr


def test_writable_layer_survives_restart_and_never_reaches_the_image(
    systemd_host, make_machine, machine_name
):
    name = make_machine(machine_name)
    systemd_host.pymachine("exec", name, "--", "sh", "-c", "echo kept > /etc/marker")
    systemd_host.pymachine("stop", name)
    systemd_host.pymachine("start", name)
    assert systemd_host.pymachine("exec", name, "--", "cat", "/etc/marker").stdout == "kept\n"
    assert (
        systemd_host.run(
            ["test", "-e", "/var/lib/machines/tiny/etc/marker"], check=False
        ).returncode
        == 1
    )
    upper = f"/var/lib/pymachine/machines/{name}/upper/etc/marker"
    assert systemd_host.run(["cat", upper]).stdout == "kept\n"


def test_stop_leaves_no_mount_registration_or_state(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    systemd_host.pymachine("stop", name)
    unit = f"pymachine-{name}.service"
    assert show(systemd_host, unit, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert name not in systemd_host.run(["machinectl", "list", "--no-legend"]).stdout
    mounts = systemd_host.run(["cat", "/proc/self/mountinfo"]).stdout
    assert f"/run/pymachine/{name}" not in mounts
    assert (
        systemd_host.run(
            ["test", "-e", f"/run/pymachine/{name}/state.json"], check=False
        ).returncode
        == 1
    )
    assert "stopped" in systemd_host.pymachine("status", name, check=False).stdout


def test_machinectl_terminate_stops_the_unit(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    systemd_host.run(["machinectl", "terminate", name])
    systemd_host.run(
        f"for i in $(seq 100); do case $(systemctl is-active pymachine-{name}.service) in"
        " inactive|failed) exit 0;; esac; sleep 0.1; done; exit 1"
    )  # stopped, not just deactivating
    assert name not in systemd_host.run(["machinectl", "list", "--no-legend"]).stdout


def test_remove_deletes_definition_and_writable_layer(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    refused = systemd_host.pymachine("remove", name, check=False)
    assert refused.returncode == 5 and "running" in refused.stderr
    systemd_host.pymachine("stop", name)
    systemd_host.pymachine("remove", name)
    for path in (f"/etc/pymachine/{name}.machine", f"/var/lib/pymachine/machines/{name}"):
        assert systemd_host.run(["test", "-e", path], check=False).returncode == 1
    assert name not in systemd_host.pymachine("list").stdout


def _snapshot(host) -> str:
    return host.run(
        "ls -la /etc/pymachine /var/lib/pymachine/machines 2>&1; systemctl list-units --all --no-legend 'pymachine-*'"
    ).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["create", "../x", "--image", "tiny"], 2, "invalid machine name"),
        (["create", "a/b", "--image", "tiny"], 2, "invalid machine name"),
        (["create", "", "--image", "tiny"], 2, "must not be empty"),
        (["create", "x" * 65, "--image", "tiny"], 2, "at most 64"),
        (["create", "-lead", "--image", "tiny"], 2, ""),
        (["create", "wéb", "--image", "tiny"], 2, "invalid machine name"),
        (["create", "bad-image", "--image", "no-such-image"], 4, "image 'no-such-image' not found"),
        (
            ["create", "bad-prop", "--image", "tiny", "-p", "MemoryMaximum=1G"],
            2,
            "unknown property 'MemoryMaximum'",
        ),
        (["create", "bad-value", "--image", "tiny", "-p", "MemoryMax=12Q"], 2, "MemoryMax"),
        (["start", "never-created"], 4, "not found"),
        (["exec", "never-created", "--", "true"], 4, "not found"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    systemd_host, tiny_image, args, code, message
):
    before = _snapshot(systemd_host)
    result = systemd_host.pymachine(*args, check=False)
    assert result.returncode == code, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pymachine")
    assert _snapshot(systemd_host) == before


def test_state_conflicts_are_refused(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    again = systemd_host.pymachine("start", name, check=False)
    assert again.returncode == 5 and "already running" in again.stderr
    systemd_host.pymachine("stop", name)
    stopped = systemd_host.pymachine("stop", name, check=False)
    assert stopped.returncode == 3 and "not running" in stopped.stderr
    exec_stopped = systemd_host.pymachine("exec", name, "--", "true", check=False)
    assert exec_stopped.returncode == 3 and "not running" in exec_stopped.stderr
    duplicate = systemd_host.pymachine("create", name, "--image", "tiny", check=False)
    assert duplicate.returncode == 5 and "already exists" in duplicate.stderr


def test_several_machines_at_once_and_one_that_fails(systemd_host, make_machine, machine_name):
    """start/stop/restart of several names, as systemctl does several units: the
    valid machines are started (stopped…), each failure is reported with its own
    message, and the exit code is the first failure's."""
    a = make_machine(f"{machine_name}-a", start=False)
    b = make_machine(f"{machine_name}-b", start=False)
    crashes = make_machine(f"{machine_name}-c", "--bind", "/no/such/source:/x", start=False)
    units = [f"pymachine-{n}.service" for n in (a, b)]

    def active() -> list[str]:
        return [show(systemd_host, u, "ActiveState")["ActiveState"] for u in units]

    started = systemd_host.pymachine("start", a, "never-created", crashes, b, check=False)
    assert started.returncode == 4, started  # not found, the first failure
    lines = started.stderr.strip().splitlines()
    assert (
        lines[0]
        == "pymachine: machine 'never-created' not found (no /etc/pymachine/never-created.machine)"
    )
    assert lines[1].startswith(
        f"pymachine: machine '{crashes}' failed to start (pymachine-{crashes}.service"
    )
    assert "Traceback" not in started.stderr
    assert active() == ["active", "active"]

    again = systemd_host.pymachine("start", a, b, check=False)
    assert again.returncode == 5
    assert again.stderr.splitlines() == [
        f"pymachine: machine '{a}' is already running",
        f"pymachine: machine '{b}' is already running",
    ]
    leaders = [show(systemd_host, u, "MainPID")["MainPID"] for u in units]
    systemd_host.pymachine("restart", a, b)
    assert active() == ["active", "active"]
    assert all(show(systemd_host, u, "MainPID")["MainPID"] not in leaders for u in units)

    stopped = systemd_host.pymachine("stop", a, crashes, b, check=False)
    assert stopped.returncode == 3 and stopped.stderr.strip() == (
        f"pymachine: machine '{crashes}' is not running"
    )
    assert [s in ("inactive", "failed") for s in active()] == [True, True]
    assert a not in systemd_host.run(["machinectl", "list", "--no-legend"]).stdout
