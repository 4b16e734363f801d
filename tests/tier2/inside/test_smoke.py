"""Harness smoke tests: plain systemd inside the VM, no pymachine.

They prove the VM boots with the full cgroup v2 tree, that the kernel enforces
limits on transient units and that results come out: when a pymachine test in
test_limits.py fails and its systemd-run twin here passes, the bug is pymachine's.
"""

from __future__ import annotations

import re
import time

from guest import (
    CGROOT,
    cgroup_dir,
    cpu_stat,
    host_is_healthy,
    journal,
    sh,
    show,
    swap_on,
    swap_total_kb,
    wait_until,
)


def test_cgroup_v2_controllers():
    controllers = (CGROOT / "cgroup.controllers").read_text().split()
    for c in ("cpu", "memory", "pids"):
        assert c in controllers
    assert (CGROOT / "cgroup.subtree_control").exists()


def test_python_deps_importable():
    sh("python3", "-c", "import machined, pystemd, jinja2, pyseccomp")


def test_runtime_dependencies_declared():
    """What the runtime imports must be declared: ``pip install .`` alone must give
    a working pymachine."""
    from importlib.metadata import requires

    declared = {
        re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires("pymachine") or []
    }
    needed = {"pystemd", "jinja2", "pyseccomp"}
    assert needed <= declared, f"not in pyproject.toml's dependencies: {sorted(needed - declared)}"


def test_memory_max_oom_kill_systemd_run():
    unit = "tier2-smoke-oom.service"
    proc = sh(
        "systemd-run", "--wait", "--unit", unit,
        "-p", "MemoryMax=50M", "-p", "MemorySwapMax=0",
        "python3", "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])",
        check=False,
    )  # fmt: skip
    props = show(unit, "Result", "ActiveState")
    sh("systemctl", "reset-failed", unit, check=False)
    assert proc.returncode != 0, proc.stderr
    assert props["Result"] == "oom-kill", (props, proc.stderr)
    host_is_healthy()


def test_cpu_quota_systemd_run():
    unit = "tier2-smoke-cpu.service"
    sh("systemd-run", "--unit", unit, "-p", "CPUQuota=20%", "sh", "-c", "while :; do :; done")
    try:
        before, t0 = cpu_stat(unit), time.monotonic()
        time.sleep(3)
        after, t1 = cpu_stat(unit), time.monotonic()
    finally:
        sh("systemctl", "stop", unit)
    share = (after["usage_usec"] - before["usage_usec"]) / ((t1 - t0) * 1e6)
    assert share <= 0.25, share
    assert share > 0.05, share  # it did run
    assert after["nr_throttled"] > 0


FORK_MANY = """
import os, sys, time
failed = 0
for _ in range(50):
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
    except OSError:
        failed += 1
print("fork failures:", failed, flush=True)
time.sleep(120)
"""


def test_tasks_max_systemd_run():
    unit = "tier2-smoke-pids.service"
    sh("systemd-run", "--unit", unit, "-p", "TasksMax=10", "python3", "-c", FORK_MANY)
    try:
        wait_until(lambda: "fork failures" in journal(unit), timeout=60, what="the forks")
        assert int((cgroup_dir(unit) / "pids.current").read_text()) <= 10
        assert "fork failures: 0" not in journal(unit)
    finally:
        sh("systemctl", "stop", unit)


def test_swap_disk_present():
    assert swap_total_kb() == 0, "swap must be off outside the swap tests"
    with swap_on():
        assert swap_total_kb() > 100_000


def test_swap_absorbs_memory_over_memory_max_systemd_run():
    """The control for test_limits.py::test_memory_swap_max_zero_with_swap: with
    swap on and no swap limit, 120 MB under MemoryMax=50M survives by swapping."""
    unit = "tier2-smoke-swap.service"
    with swap_on():
        proc = sh(
            "systemd-run", "--wait", "--unit", unit, "-p", "MemoryMax=50M",
            "python3", "-c", "b = bytearray(120 << 20); b[::4096] = b'x' * len(b[::4096])",
            check=False, timeout=300,
        )  # fmt: skip
    props = show(unit, "Result")
    sh("systemctl", "reset-failed", unit, check=False)
    assert proc.returncode == 0 and props["Result"] == "success", (props, proc.stderr)
