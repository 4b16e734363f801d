"""Boot mode (issue 3): the image's own systemd as PID 1, as systemd-nspawn --boot."""

from __future__ import annotations

import time


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_booted(host, name: str) -> str:
    """The machine's `systemctl is-system-running --wait` (running, degraded…).

    `start` returns once the image's systemd is PID 1 (as nspawn's unit does
    without --notify-ready): until that systemd listens on its private socket,
    systemctl answers "offline" at once instead of waiting, so ask again."""
    deadline = time.monotonic() + 90
    while True:
        state = host.pymachine(
            "exec",
            name,
            "--",
            "timeout",
            "90",
            "systemctl",
            "is-system-running",
            "--wait",
            check=False,
            timeout=120,
        ).stdout.strip()
        if state not in ("offline", "unknown", "") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_boot_mode_runs_systemd_and_halts_cleanly(systemd_host, debian_image, machine_name):
    name = machine_name
    unit = f"pymachine-{name}.service"
    systemd_host.pymachine(
        "create",
        name,
        "--image",
        debian_image,
        "--boot",
        "--network",
        "none",
        "--stop-timeout",
        "30",
    )
    try:
        systemd_host.pymachine("start", name)
        state = wait_booted(systemd_host, name)
        assert state in ("running", "degraded"), systemd_host.pymachine(
            "exec", name, "--", "systemctl", "--failed", "--no-pager", check=False
        ).stdout
        assert (
            systemd_host.pymachine("exec", name, "--", "cat", "/proc/1/comm").stdout.strip()
            == "systemd"
        )
        assert (
            systemd_host.pymachine(
                "exec", name, "--", "systemd-detect-virt", "-c", check=False
            ).stdout.strip()
            == "container-other"
        )
        assert systemd_host.pymachine("exec", name, "--", "hostname").stdout.strip() == name
        # The container's systemd owns a writable cgroup subtree: a nested transient unit works.
        nested = systemd_host.pymachine(
            "exec",
            name,
            "--",
            "systemd-run",
            "--wait",
            "-q",
            "-p",
            "MemoryMax=32M",
            "/bin/true",
            check=False,
            timeout=60,
        )
        assert nested.returncode == 0, nested.stderr
        assert name in systemd_host.run(["machinectl", "list", "--no-legend"]).stdout

        began = time.monotonic()
        systemd_host.pymachine("stop", name, timeout=120)
        elapsed = time.monotonic() - began
        props = show(systemd_host, unit, "ActiveState", "Result", "ExecMainStatus")
        assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
        journal = systemd_host.journal(unit, lines=400)
        assert "SIGKILL" not in journal, journal[-2000:]
        assert elapsed < 30  # halted by SIGRTMIN+3, not by the stop timeout
    finally:
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)


def test_pymachine_runs_a_nested_machine_inside_a_boot_mode_machine(
    systemd_host, debian_image, machine_name
):
    """moby#44402: inside a boot-mode machine, pymachine itself starts a
    machine of its own, as a transient unit of the inner systemd (issue 9 item 4)."""
    import sys
    from pathlib import Path

    import machined
    from tests.harness import skip_or_fail

    prefix = Path(sys.base_prefix).resolve()
    if str(prefix) in ("/usr", "/usr/local"):
        skip_or_fail(
            "the nested test binds the test run's own Python install, not the system's /usr"
        )
    repo = Path(machined.__file__).resolve().parents[1]
    outer = machine_name
    state = f"/var/lib/pymachine/nested/{outer}"
    systemd_host.run(["mkdir", "-p", f"{state}/state", f"{state}/images"])
    systemd_host.pymachine(
        "create",
        outer,
        "--image",
        debian_image,
        "--boot",
        "--network",
        "none",
        "--stop-timeout",
        "30",
        "--bind",
        f"{prefix}:{prefix}:ro",
        "--bind",
        f"{repo}:{repo}:ro",
        # the nested machines' layers must not live on the outer machine's overlay root
        "--bind",
        f"{state}/state:/var/lib/pymachine",
        "--bind",
        f"{state}/images:/var/lib/machines",
    )
    inner_pm = ["exec", outer, "--", sys.executable, "-m", "machined"]
    try:
        systemd_host.pymachine("start", outer)
        wait_booted(systemd_host, outer)
        systemd_host.pymachine(*inner_pm, "bootstrap", "--distro", "busybox", "tiny", timeout=120)
        systemd_host.pymachine(
            *inner_pm,
            "create",
            "inner",
            "--image",
            "tiny",
            "--network",
            "none",
            "--private-users",
            "no",
            "--",
            "/bin/sh",
            "-c",
            "while :; do sleep 1; done",
        )
        systemd_host.pymachine(*inner_pm, "start", "inner", timeout=120)
        assert (
            systemd_host.pymachine(*inner_pm, "exec", "inner", "--", "hostname").stdout == "inner\n"
        )
        listed = systemd_host.pymachine(
            "exec", outer, "--", "machinectl", "list", "--no-legend"
        ).stdout
        assert listed.split()[:3] == ["inner", "container", "pymachine"]
        shown = systemd_host.pymachine(
            "exec", outer, "--", "systemctl", "show", "-p", "ActiveState", "pymachine-inner.service"
        ).stdout
        assert shown.strip() == "ActiveState=active"
        systemd_host.pymachine(*inner_pm, "stop", "inner", timeout=120)
    finally:
        systemd_host.pymachine("stop", outer, check=False, timeout=120)
        systemd_host.pymachine("remove", outer, check=False)
