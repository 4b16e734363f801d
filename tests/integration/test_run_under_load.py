"""``pymachine run`` under CPU load: the container's PID 1 must outlive the
intermediate process that forked it (it arms PR_SET_PDEATHSIG for the runtime,
and an arming made while the intermediate was still its parent SIGKILLed the
container when the intermediate exited: ``run`` ended 137 with no output, seen
once in a full tier-1 run and every time under this load)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.tier1


@pytest.fixture
def busy_cpus():
    """Three spinning processes on this 2-core machine, ended after the test."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    yield
    for p in spinners:
        p.kill()
        p.wait()


def test_run_survives_a_slow_intermediate(systemd_host, make_machine, machine_name, busy_cpus):
    make_machine(machine_name, start=False, command=("true",))
    failures = []
    for attempt in range(25):
        result = systemd_host.pymachine("run", machine_name, "--", "echo", "ok", check=False)
        if result.returncode != 0 or result.stdout.strip() != "ok":
            failures.append((attempt, result.returncode, result.stdout, result.stderr[-300:]))
    assert not failures, failures
