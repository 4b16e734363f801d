"""Helpers for the in-VM tests: run commands, read unit properties and cgroup files."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

CGROOT = Path("/sys/fs/cgroup")
SWAP_DEVICE = "/dev/disk/by-id/virtio-tier2-swap"


def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run CMD, capture text output; on failure the assertion shows everything."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def show(unit: str, *props: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cgroup_dir(unit: str) -> Path:
    group = show(unit, "ControlGroup")["ControlGroup"]
    assert group, f"{unit} has no control group (not running?)"
    return CGROOT / group.lstrip("/")


def cpu_stat(unit: str) -> dict[str, int]:
    text = (cgroup_dir(unit) / "cpu.stat").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def journal(unit: str, lines: int = 40) -> str:
    return sh("journalctl", "-u", unit, "-n", str(lines), "--no-pager", check=False).stdout


def swap_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def swap_on():
    """The VM's swap disk turned on for the duration (off again afterwards)."""
    assert os.path.exists(SWAP_DEVICE), (
        f"{SWAP_DEVICE} missing: the harness gives the VM a swap disk"
    )
    sh("swapon", SWAP_DEVICE)
    try:
        yield
    finally:
        sh("swapoff", SWAP_DEVICE, check=False, timeout=300)


def host_is_healthy() -> None:
    """The VM itself (the "host" of the machines) still works after a limit hit."""
    state = sh("systemctl", "is-system-running", check=False).stdout.strip()
    # "starting": the tier2-tests unit itself is still running, that is fine.
    assert state in ("running", "starting", "degraded"), state
    assert sh("/bin/true").returncode == 0
    assert sh("systemd-run", "--wait", "-q", "/bin/true").returncode == 0


# --- pymachine -------------------------------------------------------------------
IMAGE = "tiny"


def pm(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """The pymachine CLI as installed in the VM (``pip install`` of the project's wheel)."""
    return sh("pymachine", *args, check=check, timeout=timeout)


def unit_of(machine: str) -> str:
    return f"pymachine-{machine}.service"


def ensure_image() -> str:
    if not Path("/var/lib/machines", IMAGE).is_dir():
        pm("bootstrap", "--distro", "busybox", IMAGE)
    return IMAGE


def create(name: str, *limits: str, command: list[str], extra: tuple[str, ...] = ()) -> None:
    """``pymachine create NAME --image tiny --network none -p LIMIT … -- COMMAND``."""
    args = ["create", name, "--image", ensure_image(), "--network", "none", *extra]
    for limit in limits:
        args += ["-p", limit]
    pm(*args, "--", *command)


def destroy(name: str) -> None:
    """Stop (if running) and remove a machine; best effort, for test cleanup.
    Asks systemctl and the file system first: every pymachine call costs
    seconds under TCG."""
    if active_state(name) in ("active", "activating", "reloading"):
        pm("stop", name, check=False)
    if active_state(name) == "failed":
        sh("systemctl", "reset-failed", unit_of(name), check=False)
    if Path("/etc/pymachine", f"{name}.machine").exists():
        pm("remove", name, check=False)


def active_state(name: str) -> str:
    return show(unit_of(name), "ActiveState")["ActiveState"]


def wait_stopped(name: str, timeout: float = 90) -> dict[str, str]:
    """Wait until the machine's unit is no longer active/activating/deactivating."""
    wait_until(
        lambda: active_state(name) in ("inactive", "failed"),
        timeout=timeout,
        what=f"{unit_of(name)} to stop",
    )
    return show(unit_of(name), "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")


def oom_victims(since_monotonic: float) -> list[str]:
    """Names of processes the kernel's OOM killer killed since a CLOCK_MONOTONIC
    time (from the kernel log: "Memory cgroup out of memory: Killed process N (NAME)")."""
    out = sh(
        "journalctl",
        "-k",
        "-o",
        "short-monotonic",
        "--no-pager",
        "-q",
        "--grep",
        "Killed process",
        check=False,
    ).stdout
    victims = []
    for line in out.splitlines():
        m = re.match(r"\[\s*([0-9.]+)\].*Killed process \d+ \(([^)]*)\)", line)
        if m and float(m.group(1)) >= since_monotonic:
            victims.append(m.group(2))
    return victims
