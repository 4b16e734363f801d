"""Resource limits of machines made by pymachine, enforced by the kernel (cgroup v2).

Every machine here is a busybox image (``pymachine bootstrap --distro busybox``)
with ``--network none``, so a failure points at the limit, not at networking.
Swap is off except in the swap test: with swap on, a payload over
``MemoryMax=`` is swapped out instead of OOM-killed (test_smoke.py shows that
with plain systemd-run, cheaply).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from guest import (
    active_state,
    cgroup_dir,
    cpu_stat,
    create,
    destroy,
    host_is_healthy,
    journal,
    oom_victims,
    pm,
    show,
    swap_on,
    swap_total_kb,
    unit_of,
    wait_stopped,
    wait_until,
)

# busybox dd allocates a buffer of bs bytes and fills it from /dev/zero: a
# memory hog with no extra tools. The sleep keeps it clear of start-up.
HOG_200M = [
    "sh",
    "-c",
    "sleep 2; dd if=/dev/zero of=/dev/null bs=200M count=1 && echo SURVIVED; sleep 600",
]


@pytest.fixture
def machine(request):
    """A unique machine name, removed after the test whatever happened."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    destroy(name)
    yield name
    destroy(name)


@pytest.fixture
def bystander():
    """Another machine running beside the one under test: it must be unaffected."""
    name = "bystander"
    destroy(name)
    create(name, command=["sleep", "3600"])
    pm("start", name)
    yield name
    destroy(name)


def test_memory_max_oom_kill(machine, bystander):
    assert swap_total_kb() == 0
    create(machine, "MemoryMax=50M", command=HOG_200M)
    t0 = time.monotonic()
    pm("start", machine)
    assert (cgroup_dir(unit_of(machine)) / "memory.max").read_text().strip() == str(50 << 20)
    props = wait_stopped(machine, timeout=240)
    victims = oom_victims(t0)
    assert victims, f"no OOM kill in the kernel log; {props}"
    assert victims == ["dd"], (
        f"the OOM killer chose {victims}, not (only) the payload 'dd': whatever else runs in "
        "the machine's cgroup (pymachine's runtime) counts against MemoryMax"
    )
    assert props["Result"] == "oom-kill", (props, journal(unit_of(machine)))
    assert "SURVIVED" not in journal(unit_of(machine))

    status = pm("status", machine, check=False)
    assert "oom-kill" in status.stdout, status.stdout
    data = json.loads(pm("status", machine, "--json", check=False).stdout)
    assert data["result"] == "oom-kill", data

    host_is_healthy()
    assert active_state(bystander) == "active"
    assert json.loads(pm("status", bystander, "--json").stdout)["state"] == "running"


# One machine for CPUQuota= and TasksMax=: under TCG every start costs seconds of
# CPU (the runtime is Python). Its command waits, then runs a fork bomb in the
# background and a busy loop (a shell builtin: no forks) in the foreground.
# CPUQuota=20% is applied with `pymachine set` once the machine runs: created
# with the quota, the runtime itself starts at a fifth of a (TCG-slow) CPU and
# outlives systemd's 90 s start timeout on a busy host (seen here).
BOMB_AND_SPIN = "sleep 5; (bomb() { bomb | bomb & }; bomb) 2>/dev/null & while :; do :; done"


@pytest.fixture(scope="module")
def limited():
    name = "cpu-tasks"
    destroy(name)
    create(name, "TasksMax=30", command=["sh", "-c", BOMB_AND_SPIN])
    pm("start", name, timeout=300)
    pm("set", name, "-p", "CPUQuota=20%")
    yield name
    destroy(name)


def test_cpu_quota(limited):
    unit = unit_of(limited)
    assert (cgroup_dir(unit) / "cpu.max").read_text().split() == ["20000", "100000"]
    assert "CPUQuota=20%" in Path("/etc/pymachine", f"{limited}.machine").read_text()
    # The payload sleeps 5 s before it spins (for the fork bomb's sake): measure
    # once the quota throttles it, not from an assumed start-up time.
    first = cpu_stat(unit)["nr_throttled"]
    deadline = time.monotonic() + 120
    while cpu_stat(unit)["nr_throttled"] == first:
        assert time.monotonic() < deadline, "the busy loop never got throttled: did it run?"
        time.sleep(0.2)
    before, t0 = cpu_stat(unit), time.monotonic()
    time.sleep(5)
    after, t1 = cpu_stat(unit), time.monotonic()
    share = (after["usage_usec"] - before["usage_usec"]) / ((t1 - t0) * 1e6)
    assert share <= 0.25, f"busy loop used {share:.0%} of a CPU under CPUQuota=20%"
    assert share >= 0.05, f"busy loop used only {share:.0%}: did it run?"
    assert after["nr_throttled"] > before["nr_throttled"], after


def test_tasks_max_fork_bomb(limited):
    unit = unit_of(limited)
    group = cgroup_dir(unit)
    assert (group / "pids.max").read_text().strip() == "30"
    wait_until(
        lambda: int((group / "pids.events").read_text().split()[1]) > 0,
        timeout=90,
        what="the fork bomb to hit TasksMax",
    )
    peak = 0
    for _ in range(10):
        peak = max(peak, int((group / "pids.current").read_text()))
        time.sleep(0.3)
    assert peak <= 30
    host_is_healthy()

    t0 = time.monotonic()
    pm("stop", limited, timeout=180)
    took = time.monotonic() - t0
    props = show(unit, "ActiveState", "Result")
    assert props["ActiveState"] in ("inactive", "failed"), props
    assert not group.exists(), f"{group} left behind"
    assert took < 120, f"stop took {took:.0f}s"


def test_memory_swap_max_zero_with_swap(machine):
    with swap_on():
        assert swap_total_kb() > 100_000
        create(machine, "MemoryMax=50M", "MemorySwapMax=0", command=HOG_200M)
        t0 = time.monotonic()
        pm("start", machine)
        assert (cgroup_dir(unit_of(machine)) / "memory.swap.max").read_text().strip() == "0"
        props = wait_stopped(machine, timeout=120)
        assert oom_victims(t0), f"no OOM kill in the kernel log; {props}"
        assert props["Result"] == "oom-kill", (props, journal(unit_of(machine)))
        assert "SURVIVED" not in journal(unit_of(machine))
        host_is_healthy()
