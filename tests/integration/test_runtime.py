"""Inside a machine (issue 3): isolation, mounts, the PID-1 init, run/shell/exec/logs."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

import machined

SLEEPER = ("/bin/sh", "-c", "while :; do sleep 0.2; done")


def inside(host, name: str, script: str, *, check: bool = True):
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script, check=check)


def unit_state(host, unit: str) -> dict[str, str]:
    out = host.run(
        ["systemctl", "show", unit, "-p", "ActiveState", "-p", "Result", "-p", "ExecMainStatus"]
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def assert_cgroup_root(proc_self_cgroup: str) -> None:
    """The v2 line is ``0::/`` (on this hybrid machine, v1 lines follow the namespace too)."""
    lines = proc_self_cgroup.split()
    assert "0::/" in lines
    assert all(line.endswith(":/") for line in lines), lines


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- isolation ----------------------------------------------------------------


def test_namespaces_are_private(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=SLEEPER)
    assert_cgroup_root(inside(systemd_host, name, "cat /proc/self/cgroup").stdout)
    assert inside(systemd_host, name, "ls /sys/class/net").stdout.split() == ["lo"]
    assert inside(systemd_host, name, "cat /proc/1/comm").stdout.strip() == "pymachine-init"
    assert inside(systemd_host, name, "hostname").stdout.strip() == name
    host_pids = len(systemd_host.run("ls -d /proc/[0-9]*").stdout.split())
    machine_pids = inside(systemd_host, name, "ls -d /proc/[0-9]*").stdout.split()
    assert len(machine_pids) < host_pids and "/proc/1" in machine_pids
    # IPC: a message queue made on the host is not visible inside
    host_ipc = systemd_host.run(["cat", "/proc/sysvipc/shm"]).stdout
    assert (
        inside(systemd_host, name, "cat /proc/sysvipc/shm").stdout.splitlines()[:1]
        == host_ipc.splitlines()[:1]
    )


@pytest.mark.parametrize(
    "attempt",
    [
        "echo x > /proc/sys/kernel/domainname",
        "echo h > /proc/sysrq-trigger",
        "touch /sys/kernel/pymachine-probe",
        "test -s /proc/kcore",
        "ls /dev/sda /dev/vda /dev/mem /dev/kmsg 2>/dev/null | grep .",
    ],
)
def test_host_kernel_interfaces_are_read_only_or_masked(
    systemd_host, make_machine, machine_name, attempt
):
    name = make_machine(machine_name, command=SLEEPER)
    assert inside(systemd_host, name, attempt, check=False).returncode != 0


def test_dev_is_private_and_minimal(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=SLEEPER)
    entries = set(inside(systemd_host, name, "ls /dev").stdout.split())
    assert entries == {
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "pts",
        "ptmx",
        "shm",
        "fd",
        "stdin",
        "stdout",
        "stderr",
    }
    mounts = inside(systemd_host, name, "cat /proc/mounts").stdout
    assert " /dev/pts devpts " in mounts and " /dev/shm tmpfs " in mounts
    assert " /tmp tmpfs " in mounts and " /run tmpfs " in mounts
    assert inside(systemd_host, name, "ls /dev/pts").stdout.split() == ["ptmx"]  # a new instance
    assert inside(systemd_host, name, "head -c 4 /dev/urandom | wc -c").stdout.strip() == "4"
    assert (
        inside(systemd_host, name, "cat /run/host/container-manager").stdout.strip() == "pymachine"
    )


def test_bind_mounts_and_read_only_root(systemd_host, make_machine, machine_name):
    # On a real file system (the host's root is an overlay, which cannot be idmapped
    # on this kernel): with PrivateUsers, host root's files must be root's inside.
    src = f"/var/lib/pymachine/test-binds/{machine_name}"
    systemd_host.run(["mkdir", "-p", f"{src}/rw", f"{src}/ro"])
    systemd_host.run(["sh", "-c", f"echo from-host > {src}/ro/file"])
    name = make_machine(
        machine_name,
        "--bind",
        f"{src}/ro:/data:ro",
        "--bind",
        f"{src}/rw:/out",
        "--read-only",
        command=SLEEPER,
    )
    assert inside(systemd_host, name, "cat /data/file").stdout == "from-host\n"
    assert inside(systemd_host, name, "echo x > /data/new", check=False).returncode != 0
    inside(systemd_host, name, "echo written > /out/result")
    assert systemd_host.run(["cat", f"{src}/rw/result"]).stdout == "written\n"
    assert inside(systemd_host, name, "touch /etc/new", check=False).returncode != 0
    inside(systemd_host, name, "touch /tmp/ok")  # tmpfs stays writable


def test_ephemeral_machine_forgets_its_writes(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, "--ephemeral", command=SLEEPER)
    inside(systemd_host, name, "echo gone > /etc/ephemeral-marker")
    systemd_host.pymachine("restart", name)
    assert inside(systemd_host, name, "test -e /etc/ephemeral-marker", check=False).returncode == 1
    assert systemd_host.run(f"ls -A /var/lib/pymachine/machines/{name}/upper").stdout == ""


def test_exec_runs_inside_the_machines_cgroup(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=SLEEPER)
    # Inside the cgroup namespace whose root is the machine's payload cgroup:
    assert_cgroup_root(inside(systemd_host, name, "cat /proc/self/cgroup").stdout)
    procs = f"/sys/fs/cgroup/machine.slice/pymachine-{name}.service/payload/cgroup.procs"
    before = len(systemd_host.run(["cat", procs]).stdout.split())
    sleeper = systemd_host.popen([*_pm(), "exec", name, "--", "sleep", "3"])
    try:
        assert wait_until(lambda: len(systemd_host.run(["cat", procs]).stdout.split()) > before, 5)
    finally:
        sleeper.wait(10)


def _pm() -> list[str]:
    import sys

    return [sys.executable, "-m", "machined"]


# --- the init -----------------------------------------------------------------


def test_init_reaps_every_orphan(systemd_host, make_machine, machine_name):
    script = "for i in $(seq 200); do sh -c 'sleep 0.1 &'; done; while :; do sleep 0.2; done"
    name = make_machine(machine_name, command=("/bin/sh", "-c", script))

    def leftovers() -> list[str]:
        table = inside(systemd_host, name, "ps -o stat,args").stdout.splitlines()[1:]
        return [
            r for r in table if r.split()[0].startswith("Z") or r.split()[1:] == ["sleep", "0.1"]
        ]

    assert wait_until(lambda: not leftovers(), 20), leftovers()


@pytest.mark.parametrize("sig", ["USR1", "USR2", "HUP", "QUIT", "WINCH"])
def test_init_forwards_signals_to_the_payload(systemd_host, make_machine, machine_name, sig):
    script = f"trap 'echo got-{sig}' {sig}; echo ready; while :; do sleep 0.2; done"
    name = make_machine(machine_name, command=("/bin/sh", "-c", script))
    unit = f"pymachine-{name}.service"
    systemd_host.wait_for_journal(unit, "ready")
    systemd_host.pymachine("kill", name, "--signal", sig)
    systemd_host.wait_for_journal(unit, f"got-{sig}")
    assert unit_state(systemd_host, unit)["ActiveState"] == "active"


def test_exit_status_passes_on_to_the_unit_and_to_run(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=("/bin/sh", "-c", "sleep 0.5; exit 3"))
    unit = f"pymachine-{name}.service"
    assert wait_until(
        lambda: unit_state(systemd_host, unit)["ActiveState"] in ("failed", "inactive")
    )
    assert unit_state(systemd_host, unit)["ExecMainStatus"] == "3"
    assert "Exit status: 3" in systemd_host.pymachine("status", name, check=False).stdout
    assert (
        systemd_host.pymachine("run", name, "--", "sh", "-c", "exit 3", check=False).returncode == 3
    )
    killed = systemd_host.pymachine("run", name, "--", "sh", "-c", "kill -9 $$", check=False)
    assert killed.returncode == 128 + 9
    ok = systemd_host.pymachine("run", name, "--", "sh", "-c", "echo out-of-run; cat /proc/1/comm")
    assert ok.stdout == "out-of-run\npymachine-init\n"


def test_leftover_processes_are_killed_when_the_payload_exits(
    systemd_host, make_machine, machine_name
):
    script = "sh -c 'trap \"\" TERM; while :; do sleep 0.2; done' & sleep 0.5; exit 0"
    name = make_machine(machine_name, "--stop-timeout", "2", command=("/bin/sh", "-c", script))
    unit = f"pymachine-{name}.service"
    assert wait_until(
        lambda: unit_state(systemd_host, unit)["ActiveState"] in ("inactive", "failed"), 15
    )
    assert unit_state(systemd_host, unit)["ExecMainStatus"] == "0"


def test_stop_of_a_payload_that_ignores_sigterm_ends_after_the_stop_timeout(
    systemd_host, make_machine, machine_name
):
    script = "trap '' TERM; while :; do sleep 0.2; done"
    name = make_machine(machine_name, "--stop-timeout", "2", command=("/bin/sh", "-c", script))
    began = time.monotonic()
    systemd_host.pymachine("stop", name, timeout=60)
    elapsed = time.monotonic() - began
    assert 1.5 <= elapsed < 2 + 5  # the init escalates after 2 s; systemd's own timeout is 2+5 s
    assert unit_state(systemd_host, f"pymachine-{name}.service")["ActiveState"] in (
        "inactive",
        "failed",
    )


def test_machinectl_poweroff_and_reboot(systemd_host, make_machine, machine_name):
    script = "echo start >> /root/boots; while :; do sleep 0.2; done"
    name = make_machine(machine_name, command=("/bin/sh", "-c", script))
    unit = f"pymachine-{name}.service"
    assert wait_until(
        lambda: inside(systemd_host, name, "cat /root/boots", check=False).stdout == "start\n"
    )
    systemd_host.run(["machinectl", "reboot", name])
    assert wait_until(
        lambda: (
            inside(systemd_host, name, "cat /root/boots", check=False).stdout == "start\nstart\n"
        )
    )
    assert unit_state(systemd_host, unit)["ActiveState"] == "active"
    systemd_host.run(["machinectl", "poweroff", name])
    assert wait_until(
        lambda: unit_state(systemd_host, unit)["ActiveState"] in ("inactive", "failed")
    )
    assert unit_state(systemd_host, unit)["Result"] == "success"


# --- verbs --------------------------------------------------------------------


def test_run_uses_a_scope_with_the_limits(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, "-p", "TasksMax=42", "-p", "MemoryMax=32M", start=False)
    run = systemd_host.popen([*_pm(), "run", name, "--", "sleep", "30"])
    scope = f"pymachine-{name}.scope"
    try:
        assert wait_until(lambda: unit_state(systemd_host, scope)["ActiveState"] == "active")
        shown = systemd_host.run(
            ["systemctl", "show", scope, "-p", "TasksMax", "-p", "MemoryMax"]
        ).stdout
        assert "TasksMax=42" in shown and "MemoryMax=33554432" in shown
        assert wait_until(lambda: name in systemd_host.run(["machinectl", "list"]).stdout)
        assert "running" in systemd_host.pymachine("status", name, check=False).stdout
    finally:
        run.terminate()
        run.wait(20)


def test_exec_user_env_and_workdir(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, "--env", "MODE=prod", command=SLEEPER)
    out = systemd_host.pymachine(
        "exec",
        name,
        "--user",
        "nobody",
        "--env",
        "EXTRA=1",
        "--workdir",
        "/tmp",
        "--",
        "sh",
        "-c",
        "id -u; echo $MODE $EXTRA; pwd",
    ).stdout
    assert out.split("\n")[:3] == ["65534", "prod 1", "/tmp"]
    unknown = systemd_host.pymachine(
        "exec", name, "--user", "nosuchuser", "--", "true", check=False
    )
    assert unknown.returncode != 0 and "nosuchuser" in unknown.stderr


def test_logs_show_the_payloads_output(systemd_host, make_machine, machine_name):
    name = make_machine(
        machine_name, command=("/bin/sh", "-c", "echo line-one; echo line-two; sleep 1000")
    )
    systemd_host.wait_for_journal(f"pymachine-{name}.service", "line-two")
    logs = systemd_host.pymachine("logs", name, "-n", "20").stdout
    assert "line-one" in logs and "line-two" in logs


def test_restart_gives_a_new_container(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=SLEEPER)
    leader = systemd_host.pymachine("status", name, "--json").stdout
    systemd_host.pymachine("restart", name)
    assert systemd_host.pymachine("status", name, "--json").stdout != leader
    assert "running" in systemd_host.pymachine("status", name).stdout


def test_shell_gives_a_real_terminal(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=SLEEPER)
    session = f"sh-{machine_name}"[:30]
    systemd_host.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "120",
            "-y",
            "20",
            f"{' '.join(_pm())} shell {name}; echo shell-exit=$?; sleep 30",
        ]
    )
    try:
        screen = lambda: systemd_host.run(["tmux", "capture-pane", "-p", "-t", session]).stdout  # noqa: E731
        assert wait_until(lambda: "#" in screen(), 10)
        systemd_host.run(
            ["tmux", "send-keys", "-t", session, "tty; hostname; echo $((6*7))", "Enter"]
        )
        assert wait_until(lambda: "42" in screen(), 10)
        systemd_host.run(["tmux", "send-keys", "-t", session, "exit 5", "Enter"])
        assert wait_until(lambda: "shell-exit=5" in screen(), 10)
        text = screen()
        assert "/dev/pts/0" in text and f"\n{name}\n" in text
    finally:
        systemd_host.run(["tmux", "kill-session", "-t", session], check=False)


def test_a_package_under_a_0700_directory_starts_user_namespaced_machines(
    systemd_host, tiny_image, machine_name
):
    """Mapped root in a user namespace cannot read files under a 0700 directory
    (such as /root, where a checkout or a CI clone may live): PID 1 must have
    loaded everything it needs, and opened the init, before it is root inside."""
    repo = Path(machined.__file__).resolve().parents[1]
    private = "/srv/pymachine-0700"
    copy = f"{private}/checkout"
    py = f"cd {copy} && {shlex.quote(sys.executable)} -m machined"
    systemd_host.run(
        f"rm -rf {private} && mkdir -m 700 {private} && mkdir {copy} && cd {repo} && "
        f"git ls-files | tar -cf - -T - | tar -xf - -C {copy} && "
        f"cp machined/runtime/pymachine-init {copy}/machined/runtime/"
    )
    try:  # a service: its runtime forks the intermediate before importing anything else
        systemd_host.run(
            f"{py} create {machine_name} --image {tiny_image} --network none -- /bin/sleep 1000"
        )
        started = systemd_host.run(f"{py} start {machine_name}", check=False)
        assert started.returncode == 0, started
        uid_map = inside(systemd_host, machine_name, "cat /proc/self/uid_map").stdout
        inside_uid, outside_uid, _count = uid_map.split()
        assert (inside_uid, outside_uid != "0") == ("0", True), uid_map  # a user namespace
        assert inside(systemd_host, machine_name, "cat /proc/1/comm").stdout == "pymachine-init\n"
    finally:
        systemd_host.run(f"{py} stop {machine_name}; {py} remove {machine_name}", check=False)
        systemd_host.run(f"rm -rf {private}", check=False)


def test_a_service_whose_payload_exits_at_once_starts_and_ends_with_its_status(
    systemd_host, make_machine, machine_name
):
    """As with ``machinectl start`` of such a container: the start succeeds, the
    unit ends, its status is the payload's (the init must be alive when
    systemd reads its PID file, however fast the payload is)."""
    name = make_machine(machine_name, command=("/bin/sh", "-c", "exit 7"), start=False)
    unit = f"pymachine-{name}.service"
    for _ in range(3):
        started = systemd_host.pymachine("start", name, check=False)
        assert started.returncode == 0, started
        assert wait_until(lambda: unit_state(systemd_host, unit)["ActiveState"] == "failed")
        assert unit_state(systemd_host, unit)["ExecMainStatus"] == "7"
        assert unit_state(systemd_host, unit)["Result"] == "exit-code"


def test_pid1_and_the_payload_hold_no_host_file_descriptor(
    systemd_host, make_machine, machine_name
):
    """pymachine-init is exec'd through an fd opened on the host, and the runtime's
    pipes reach it: none of them may stay open inside (a host directory's fd is
    a way out of the container), only stdin, stdout and stderr."""
    name = make_machine(machine_name, command=SLEEPER)
    for pid in ("1", "2"):  # the init, the payload
        fds = inside(systemd_host, name, f"ls /proc/{pid}/fd").stdout.split()
        assert fds == ["0", "1", "2"], (pid, fds)


def test_an_app_machine_without_the_built_init_is_refused_with_the_reason(
    systemd_host, make_machine, machine_name
):
    """A checkout nobody built: a clear error (how to get the init), one
    message, nothing registered; the unit just fails."""
    from machined.runtime import init

    name = make_machine(machine_name, command=SLEEPER, start=False)
    hidden = init.BINARY + ".hidden"
    systemd_host.run(["mv", init.BINARY, hidden])  # inside the test host only
    try:
        result = systemd_host.pymachine("start", name, check=False)
    finally:
        systemd_host.run(["mv", hidden, init.BINARY])
    output = result.stdout + result.stderr
    assert result.returncode == 1, result
    assert f"cannot start machine {name}: {init.BINARY} is missing" in output, output
    assert "gcc, libc6-dev" in output and "Broken pipe" not in output, output
    listed = systemd_host.run(["machinectl", "list", "--no-legend"]).stdout
    assert name not in listed
