"""Autostart across reboots: ``pymachine enable web``, reboot, ``web`` runs with
no command given; ``pymachine disable web``, reboot, it does not.

The stages are boots of the VM (see ``tests/tier2/vm.py``): stage 2 and 3 run
after a real reboot (a clean shutdown, then a fresh boot on the same disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from guest import create, journal, pm, sh, show, unit_of, wait_until

NAME = "web"
UNIT_FILE = Path("/etc/systemd/system") / unit_of(NAME)
# busybox's httpd, serving / inside the machine on its own loopback.
BOOT_ID = Path("/var/lib/tier2/autostart-boot1")
COMMAND = ["httpd", "-f", "-p", "80", "-h", "/"]


def state() -> str:
    out = pm("status", NAME, "--json", check=False).stdout
    return json.loads(out)["state"] if out.strip() else "?"


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_autostart_1_enable():
    BOOT_ID.parent.mkdir(parents=True, exist_ok=True)
    BOOT_ID.write_text(_boot_id())
    create(NAME, "MemoryMax=64M", command=COMMAND)
    pm("enable", NAME)
    assert UNIT_FILE.exists(), f"{UNIT_FILE} not written"
    assert sh("systemctl", "is-enabled", unit_of(NAME), check=False).stdout.strip() == "enabled"
    assert state() == "stopped", "enable without --now must not start the machine"


@pytest.mark.stage(2)
def test_autostart_2_running_after_reboot():
    assert _boot_id() != BOOT_ID.read_text(), "stage 2 runs in the same boot as stage 1"
    wait_until(lambda: state() == "running", timeout=60, what=f"{NAME} to be started at boot")
    props = show(unit_of(NAME), "ActiveState", "UnitFileState", "FragmentPath", "ControlGroup")
    assert props["ActiveState"] == "active", props
    assert props["FragmentPath"] == str(UNIT_FILE), props
    assert props["ControlGroup"].startswith("/machine.slice/"), props
    # The limit from the definition came along in the unit file.
    assert show(unit_of(NAME), "MemoryMax")["MemoryMax"] == str(64 << 20)


@pytest.mark.stage(2)
def test_autostart_2b_machine_serves():
    wait_until(lambda: state() == "running", timeout=60, what=f"{NAME} to run")
    out = pm(
        "exec", NAME, "--", "wget", "-q", "-O", "-", "http://127.0.0.1/etc/hostname", check=False
    )
    assert out.returncode == 0, (out.stdout, out.stderr, journal(unit_of(NAME)))


@pytest.mark.stage(2)
def test_autostart_2z_disable():
    pm("disable", NAME)
    assert not UNIT_FILE.exists(), f"{UNIT_FILE} still there after disable"


@pytest.mark.stage(3)
def test_autostart_3_not_running_after_reboot():
    assert not UNIT_FILE.exists()
    assert show(unit_of(NAME), "ActiveState")["ActiveState"] == "inactive"
    assert state() == "stopped"
    # The definition survives disable.
    assert Path("/etc/pymachine", f"{NAME}.machine").exists()
