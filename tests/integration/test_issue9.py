"""Where systemd-nspawn's users hurt, pymachine should not (issue 9):
item 3, no restart race (systemd#13766, #7681: "Machine 'X' already exists"),
and item 5, limits reach the unit the machine runs in, in every form
(systemd#32783: TasksMax stuck at 16384 in machined's scopes).
Items 1–2 are in test_machine_network.py, item 6 in test_transfer.py.

The loops run as one shell script inside the host: the harness's own cost
per command would otherwise be most of the time."""

from __future__ import annotations

import subprocess
import sys
import time

SLEEP = ("/bin/sleep", "1000000")  # dies at once on SIGTERM: the loops measure pymachine
ROUNDS = 20

# After every start: machined knows exactly one NAME, and its leader is the one
# the runtime recorded (not a stale registration of the previous run).
CHECK_REGISTERED = r"""
check_registered() {
    n=$(machinectl list --no-legend | awk -v m="$NAME" '$1 == m' | wc -l)
    [ "$n" = 1 ] || { echo "round $1: $n registrations of $NAME"; machinectl list; exit 1; }
    leader=$(machinectl show "$NAME" -p Leader --value)
    recorded=$(sed 's/.*"leader": \([0-9]*\).*/\1/' /run/pymachine/$NAME/state.json)
    [ "$leader" = "$recorded" ] || { echo "round $1: machined leader $leader, ours $recorded"; exit 1; }
}
"""


def _loop(host, name: str, body: str) -> subprocess.Popen:
    script = f"NAME={name}\n{CHECK_REGISTERED}\nfor i in $(seq {ROUNDS}); do\n{body}\ndone\n"
    return host.popen(
        ["/bin/sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_restart_and_stop_start_twenty_times_never_race(systemd_host, make_machine, machine_name):
    """Both loops at once, on two machines: they also must not disturb each other
    (and the test takes half the time on two cores)."""
    pm = f"{sys.executable} -m machined"
    restarted = make_machine(f"{machine_name}-r", command=SLEEP)
    cycled = make_machine(f"{machine_name}-s", command=SLEEP)
    t0 = time.monotonic()
    loops = {
        "restart": _loop(
            systemd_host,
            restarted,
            f'{pm} restart "$NAME" || {{ echo "round $i: restart failed"; exit 1; }}\n'
            "check_registered $i",
        ),
        "stop+start": _loop(
            systemd_host,
            cycled,
            f'{pm} stop "$NAME" || {{ echo "round $i: stop failed"; exit 1; }}\n'
            # registration and state are gone once stop returns, before the next start
            'if machinectl show "$NAME" >/dev/null 2>&1; then echo "round $i: still registered"; '
            "exit 1; fi\n"
            '[ ! -e /run/pymachine/$NAME/state.json ] || { echo "round $i: state left"; exit 1; }\n'
            f'{pm} start "$NAME" || {{ echo "round $i: start failed"; exit 1; }}\n'
            "check_registered $i",
        ),
    }
    failures = []
    for what, loop in loops.items():
        try:
            output, _ = loop.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            loop.kill()
            output, _ = loop.communicate()
        if loop.returncode != 0:
            failures.append(f"{what} loop (status {loop.returncode}):\n{output}")
    print(f"{ROUNDS} restarts and {ROUNDS} stop+start in parallel: {time.monotonic() - t0:.1f} s")
    assert not failures, "\n".join(failures)


def test_start_right_after_a_killed_runtime(systemd_host, make_machine, machine_name):
    """A SIGKILLed runtime cannot unregister: the next start must not trip on it."""
    name = make_machine(machine_name, command=SLEEP)
    unit = f"pymachine-{name}.service"
    systemd_host.run(["systemctl", "kill", "-s", "KILL", "--kill-whom=main", unit])
    systemd_host.run(f"while systemctl is-active -q {unit}; do sleep 0.05; done", timeout=30)
    systemd_host.pymachine("start", name)
    out = systemd_host.run(["machinectl", "list", "--no-legend"]).stdout
    assert [line.split()[0] for line in out.splitlines()].count(name) == 1


# --- limits in every form --------------------------------------------------------

LIMITS = {
    "TasksMax": ("100000", "100000"),
    "MemoryHigh": ("200M", str(200 * 1024 * 1024)),
    "MemoryMax": ("300M", str(300 * 1024 * 1024)),
    "CPUQuota": ("50%", None),  # shown as CPUQuotaPerSecUSec
    "CPUWeight": ("200", "200"),
}
KERNEL_FILES = {"TasksMax": "pids.max", "MemoryHigh": "memory.high", "MemoryMax": "memory.max"}


def _read_back(host, name: str, unit: str) -> None:
    keys = [k for k, (_, shown) in LIMITS.items() if shown] + ["CPUQuotaPerSecUSec"]
    out = host.run(["systemctl", "show", unit, *(f"-p{k}" for k in keys), "-pControlGroup"]).stdout
    props = dict(line.split("=", 1) for line in out.splitlines())
    expected = {k: shown for k, (_, shown) in LIMITS.items() if shown}
    expected["CPUQuotaPerSecUSec"] = "500ms"
    assert {k: props[k] for k in expected} == expected, unit
    # the machine runs in that unit: machined says so, and so does its leader's cgroup
    assert host.run(["machinectl", "show", name, "-p", "Unit", "--value"]).stdout.strip() == unit
    leader = host.run(["machinectl", "show", name, "-p", "Leader", "--value"]).stdout.strip()
    cgroup = host.run(["cat", f"/proc/{leader}/cgroup"]).stdout
    assert f"/{unit}/" in cgroup, cgroup
    # where the kernel's controllers are in the v2 tree (not on a hybrid host), their files too
    base = f"/sys/fs/cgroup{props['ControlGroup']}"
    for key, filename in KERNEL_FILES.items():
        found = host.run(["cat", f"{base}/{filename}"], check=False)
        if found.returncode == 0:
            assert found.stdout.strip() == LIMITS[key][1], (unit, filename)


def test_limits_reach_transient_enabled_and_foreground_machines(
    systemd_host, make_machine, machine_name
):
    flags = [arg for key, (value, _) in LIMITS.items() for arg in ("-p", f"{key}={value}")]
    name = make_machine(machine_name, *flags, command=SLEEP)
    service = f"pymachine-{name}.service"
    host = systemd_host

    _read_back(host, name, service)  # transient: StartTransientUnit's properties
    host.pymachine("stop", name)

    host.pymachine("enable", name)  # enabled: the unit file systemd starts
    try:
        host.pymachine("start", name)
        _read_back(host, name, service)
        host.pymachine("stop", name)
    finally:
        host.pymachine("disable", name, check=False)

    scope = f"pymachine-{name}.scope"  # foreground: the CLI's own scope
    run = host.popen(
        [sys.executable, "-m", "machined", "run", name, "--", *SLEEP],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while host.run(["machinectl", "show", name], check=False).returncode:
            assert run.poll() is None, run.stdout.read().decode()
            assert time.monotonic() < deadline, "the foreground machine did not register"
            time.sleep(0.1)
        _read_back(host, name, scope)
        host.pymachine("stop", name)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
