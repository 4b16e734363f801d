"""The unit's delegated cgroup, split like systemd-nspawn's service mode:
``supervisor/`` holds the runtime, ``payload/`` holds the container (so the
container can own its subtree and every process inside, including what
``exec`` starts, stays under the unit's limits).
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroup(pid: int | str = "self") -> str:
    """The process's cgroup v2 path, e.g. ``/machine.slice/pymachine-web.service``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise OSError(f"process {pid} is in no cgroup v2 hierarchy")


def unified_mount() -> Path:
    """Where the v2 hierarchy is mounted (pure v2: /sys/fs/cgroup; hybrid: …/unified)."""
    if (CGROUP_ROOT / "cgroup.procs").exists():
        return CGROUP_ROOT
    return CGROUP_ROOT / "unified"


def split_for_payload() -> tuple[Path, Path]:
    """Create ``supervisor/`` and ``payload/`` under our cgroup, move ourselves
    into ``supervisor/``; returns both directories."""
    base = unified_mount() / own_cgroup().lstrip("/")
    supervisor = base / "supervisor"
    payload = base / "payload"
    supervisor.mkdir(exist_ok=True)
    payload.mkdir(exist_ok=True)
    (supervisor / "cgroup.procs").write_text(str(os.getpid()))
    return supervisor, payload


def move(pid: int, cgroup_dir: Path) -> None:
    (cgroup_dir / "cgroup.procs").write_text(str(pid))
