"""Guest health (issue 20) in a real VM: a booted Debian guest whose systemd
becomes ``degraded`` (a unit of it failed) is restarted by systemd, as
``HealthOnFailure=restart`` says, and the journal says why.

The guest is this VM's own Debian (bookworm, systemd, dbus), made an image by
hard links (``cp -al``: no copy of its data, and the VM has no network to
bootstrap one); the overlay never writes to its lower layer, so the VM's
files stay as they are. What would run the tier-2 tests again inside the
guest, and the VM's machine ID, are left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from guest import destroy, journal, pm, sh, show, unit_of, wait_until

IMAGE = "tier2-debian"
NAME = "guest"
IMAGES = Path("/var/lib/machines")
#: What the image takes of the VM's root (merged /usr: bin, sbin, lib are links).
TREES = ("etc", "usr", "var")
LEFT_OUT = (
    "var/lib/machines", "var/lib/pymachine", "var/lib/tier2", "var/log/journal",
    "var/cache", "var/tmp", "usr/local/lib/tier2",
    "etc/systemd/system/multi-user.target.wants/tier2-tests.service",
    "etc/systemd/system/tier2-tests.service", "etc/machine-id", "etc/pymachine",
    "etc/systemd/system/machines.target.wants",
)  # fmt: skip


def link_tree(source: Path, target: Path, skip: tuple[str, ...], at: str = "") -> None:
    """SOURCE into TARGET by hard links (``cp -al``), leaving out SKIP (paths
    relative to the top): a directory on the way to one is walked, not linked."""
    target.mkdir(exist_ok=True)
    shutil.copystat(source, target)
    for entry in sorted(source.iterdir()):
        path = f"{at}{entry.name}"
        if path in skip:
            continue
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and any(s.startswith(f"{path}/") for s in skip)
        ):
            link_tree(entry, target / entry.name, skip, f"{path}/")
        else:
            sh("cp", "-al", str(entry), str(target / entry.name), timeout=600)


def debian_image() -> str:
    root = IMAGES / IMAGE
    if root.is_dir():
        return IMAGE
    staging = IMAGES / f".#{IMAGE}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for tree in TREES:
        link_tree(
            Path("/", tree),
            staging / tree,
            tuple(p.removeprefix(f"{tree}/") for p in LEFT_OUT if p.startswith(f"{tree}/")),
        )
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/", link).is_symlink():
            (staging / link).symlink_to(Path("/", link).readlink())
    for empty in ("proc", "sys", "dev", "run", "tmp", "root", "home", "mnt", "srv", "opt"):
        (staging / empty).mkdir(exist_ok=True)
    (staging / "etc/machine-id").touch()  # a new inode: the guest's systemd makes one up
    (staging / "var/tmp").mkdir(mode=0o1777)
    (staging / "var/tmp").chmod(0o1777)
    staging.rename(root)
    mask_what_fails_in_a_container(root)
    return IMAGE


def mask_what_fails_in_a_container(root: Path) -> None:
    """Boot the guest once, unchecked, and mask in the image what failed
    there (a unit of the VM that a container cannot run), so the test starts
    from a guest that is "running"; what was masked is printed (the run's
    junit output)."""
    name = "guest-probe"
    pm("create", name, "--image", IMAGE, "--boot", "--network", "none", "--stop-timeout", "60")
    try:
        pm("start", name, timeout=300)
        state = wait_until(
            lambda: (
                (
                    answer := pm(
                        "exec",
                        name,
                        "--",
                        "systemctl",
                        "is-system-running",
                        check=False,
                        timeout=120,
                    ).stdout.strip()
                )
                not in ("initializing", "starting", "")
                and answer
            ),
            timeout=180,
            what="the probe guest to finish booting",
        )
        failed = pm(
            "exec", name, "--", "systemctl", "list-units", "--failed", "--plain", "--no-legend",
            check=False, timeout=120,
        ).stdout.split("\n")  # fmt: skip
        units = [line.split()[0] for line in failed if line.strip()]
        print(f"probe guest: {state}; failed units masked in the image: {units or 'none'}")
        for unit in units:
            print(pm("exec", name, "--", "journalctl", "-b", "-u", unit, "--no-pager", "-n", "20",
                     check=False, timeout=120).stdout)  # fmt: skip
            mask = root / "etc/systemd/system" / unit
            mask.unlink(missing_ok=True)
            mask.symlink_to("/dev/null")
    finally:
        destroy(name)


def health() -> dict:
    out = pm("status", NAME, "--json", check=False).stdout
    return (json.loads(out).get("health") or {}) if out.strip() else {}


@pytest.mark.stage(3)
def test_a_degraded_debian_guest_is_restarted():
    image = debian_image()
    unit = unit_of(NAME)
    pm(
        "create", NAME, "--image", image, "--boot", "--network", "none", "--stop-timeout", "60",
        "--health-interval", "2", "--health-timeout", "30", "--health-retries", "2",
        "--health-on-failure", "restart",
    )  # fmt: skip
    try:
        pm("start", NAME, timeout=300)
        first = show(unit, "InvocationID")["InvocationID"]
        wait_until(
            lambda: health().get("status") == "healthy",
            timeout=180,
            what=f"the guest's systemd to be running ({health()}, {journal(unit)})",
        )
        # a unit of the guest fails: its systemd is degraded
        pm(
            "exec", NAME, "--", "systemd-run", "--wait", "-q", "--unit=tier2-fail", "/bin/false",
            check=False, timeout=120,
        )  # fmt: skip
        wait_until(
            lambda: (
                "guest health check failed 2 times in a row: restarting the machine "
                "(is-system-running: degraded)" in journal(unit, lines=400)
            ),
            timeout=120,
            what="the guest health action in the journal",
        )
        wait_until(
            lambda: (
                show(unit, "InvocationID")["InvocationID"] not in ("", first)
                and show(unit, "ActiveState")["ActiveState"] == "active"
            ),
            timeout=180,
            what=f"{unit} restarted by systemd ({journal(unit)})",
        )
    finally:
        destroy(NAME)
