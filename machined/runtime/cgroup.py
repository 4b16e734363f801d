"""The unit's delegated cgroup, split like systemd-nspawn's service mode:
``supervisor/`` holds the runtime, ``payload/`` holds the container (so the
container can own its subtree and every process inside, including what
``exec`` starts, stays under the unit's limits).

Moving a process between cgroups takes the kernel's cgroup threadgroup lock
for writing, which waits for an RCU grace period when no migration happened
just before (~11 ms measured in a tier-1 host, more on a loaded machine). The
runtime therefore splits in a thread (:class:`PayloadSplit`) that it starts
right after forking the container's intermediate, so the wait overlaps its
imports. Imported on the start path before those imports: ``os`` and
:mod:`.threads` only.
"""

from __future__ import annotations

import os

from machined.runtime.threads import InThread

CGROUP_ROOT = "/sys/fs/cgroup"


def own_cgroup(pid: int | str = "self") -> str:
    """The process's cgroup v2 path, e.g. ``/machine.slice/pymachine-web.service``."""
    with open(f"/proc/{pid}/cgroup") as handle:
        for line in handle:
            if line.startswith("0::"):
                return line[3:].rstrip("\n")
    raise OSError(f"process {pid} is in no cgroup v2 hierarchy")


def unit_of(cgroup_path: str) -> str | None:
    """The unit a cgroup path is in (its ``.service`` or ``.scope`` component)."""
    return next(
        (part for part in cgroup_path.split("/") if part.endswith((".service", ".scope"))), None
    )


def unified_mount() -> str:
    """Where the v2 hierarchy is mounted (pure v2: /sys/fs/cgroup; hybrid: …/unified)."""
    if os.path.exists(f"{CGROUP_ROOT}/cgroup.procs"):
        return CGROUP_ROOT
    return f"{CGROUP_ROOT}/unified"


def move(pid: int, cgroup_dir: str | os.PathLike) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as handle:
        handle.write(str(pid))


def split_for_payload(payload_pid: int) -> tuple[str, str]:
    """Create ``supervisor/`` and ``payload/`` under our cgroup, move ourselves
    into ``supervisor/`` and PAYLOAD_PID (the intermediate) into ``payload/``."""
    base = unified_mount() + own_cgroup()
    supervisor, payload = f"{base}/supervisor", f"{base}/payload"
    for directory in (supervisor, payload):
        os.makedirs(directory, exist_ok=True)
    move(os.getpid(), supervisor)
    move(payload_pid, payload)
    return supervisor, payload


class PayloadSplit:
    """:func:`split_for_payload` in a thread of its own; :meth:`result` waits for it."""

    def __init__(self, payload_pid: int) -> None:
        self._split = InThread(split_for_payload, payload_pid)

    def result(self) -> tuple[str, str]:
        """(supervisor, payload) directories, once both processes are in them."""
        return self._split.result()
