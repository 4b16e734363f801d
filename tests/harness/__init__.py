"""Test harness: throwaway systemd hosts (tier 1) and the project's skip policy.

The policy for tests that need something the machine may not have: when the
environment variable ``CI`` is unset (a developer's machine) they are skipped
with the reason; when ``CI`` is set they fail, so a CI run can never go green
by skipping everything. Use :func:`skip_or_fail` for any tier: a
``require_tierN()`` helper computes what is missing and hands the reason to it.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

__all__ = ["require_tier1", "skip_or_fail", "tier1_missing"]

_TIER1_TOOLS = ("unshare", "nsenter", "setpriv", "pivot_root", "mount", "umount")


def skip_or_fail(reason: str) -> None:
    """Skip the current test (CI unset) or fail it (CI set) with REASON."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(
            f"{reason} (CI is set: missing prerequisites fail instead of skip)", pytrace=False
        )
    pytest.skip(reason)


def _has_overlayfs() -> bool:
    try:
        if "overlay" in Path("/proc/filesystems").read_text().split():
            return True
    except OSError:
        return False
    mods = Path("/lib/modules") / platform.release()
    return any(mods.glob("kernel/fs/overlayfs/overlay.ko*")) if mods.is_dir() else False


def tier1_missing() -> str | None:
    """Why a tier-1 host (systemd in namespaces) cannot be booted here, or None."""
    from .systemd_host import HostBootError, cgroup2_root

    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    missing = [t for t in _TIER1_TOOLS if shutil.which(t) is None]
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (util-linux, mount)")
    if not any(os.path.exists(p) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")):
        problems.append("no systemd binary (apt-get install systemd)")
    if not any(
        os.path.exists(p)
        for p in ("/lib/systemd/systemd-machined", "/usr/lib/systemd/systemd-machined")
    ):
        problems.append("no systemd-machined (apt-get install systemd-container)")
    if shutil.which("dbus-daemon") is None and shutil.which("dbus-broker") is None:
        problems.append("no D-Bus daemon (apt-get install dbus)")
    if not _has_overlayfs():
        problems.append("no overlayfs in this kernel")
    try:
        cgroup2_root()
    except HostBootError as e:
        problems.append(str(e))
    if not problems:
        return None
    return "tier 1 (systemd host in namespaces) unavailable: " + "; ".join(problems)


def require_tier1() -> None:
    """Skip (or, under CI, fail) the current test unless a tier-1 host can be booted."""
    reason = tier1_missing()
    if reason:
        skip_or_fail(reason)
