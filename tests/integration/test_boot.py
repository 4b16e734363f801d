"""Boot mode (issue 3): the image's own systemd as PID 1, as systemd-nspawn --boot."""

from __future__ import annotations

import time


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


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
        state = systemd_host.pymachine(
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
