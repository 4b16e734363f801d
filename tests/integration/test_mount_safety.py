"""Mounts root inside cannot undo, and mount targets that never leave the
machine's root (issue 15, items 3 and 6).

* Read-only binds, a ``--read-only`` root, the read-only and masked parts of
  /proc and /sys and the /etc files stay as they are: the kernel locks them
  (they are made in the runtime's mount namespace, copied into the machine's).
  A control inside shows that root there can remount a mount of its own, so
  an attempt fails because of the lock, not a missing tool or capability.
* A symlink in the image (``etc -> /var/tmp``) or one root inside puts in
  place of a bind target's directory before a restart resolves inside the
  machine's root: the start creates nothing on the host.
"""

from __future__ import annotations

import uuid

import pytest

from tests.harness import require_tier1

pytestmark = pytest.mark.tier1

SLEEPER = ("/bin/sh", "-c", "while :; do sleep 0.2; done")


def inside(host, name: str, script: str):
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script, check=False)


@pytest.fixture
def locked(systemd_host, make_machine, machine_name):
    """A machine with every default (PrivateUsers=pick), a read-only bind of a
    host directory at /ro and a read-only root; its host source dir."""
    require_tier1()
    src = f"/var/lib/pymachine/test-binds/{machine_name}"
    systemd_host.run(["mkdir", "-p", src])
    systemd_host.run(["sh", "-c", f"echo host > {src}/file"])
    name = make_machine(machine_name, "--bind", f"{src}:/ro:ro", "--read-only", command=SLEEPER)
    # the control: root inside may remount (and unmount) what it mounted itself
    control = inside(
        systemd_host,
        name,
        "mkdir -p /tmp/own && mount -t tmpfs own /tmp/own && mount -o remount,bind,ro /tmp/own "
        "&& mount -o remount,bind,rw /tmp/own && touch /tmp/own/x && umount /tmp/own",
    )
    assert control.returncode == 0, control.stderr
    return name, src


def _masked_entry(host) -> str:
    from machined.runtime.mounts import PROC_MASKED

    for entry in PROC_MASKED:
        if host.run(["test", "-f", f"/proc/{entry}"], check=False).returncode == 0:
            return entry
    pytest.fail("the host's /proc has none of the masked files")


def _mount_options(host, name: str, mountpoint: str) -> list[str] | None:
    """The per-mount options of the topmost mount at MOUNTPOINT inside (None: none)."""
    options = None
    for line in inside(host, name, "cat /proc/self/mountinfo").stdout.splitlines():
        fields = line.split()
        if fields[4] == mountpoint:
            options = fields[5].split(",")
    return options


# each: what root inside runs (every alternative must fail), and the mount point
ATTEMPTS = {
    "remount-ro-bind-rw": ("mount -o remount,bind,rw /ro", "/ro"),
    "unmount-ro-bind": ("umount /ro || umount -l /ro", "/ro"),
    "remount-read-only-root-rw": ("mount -o remount,bind,rw / || mount -o remount,rw /", "/"),
    "remount-proc-sys-rw": ("mount -o remount,bind,rw /proc/sys", "/proc/sys"),
    "unmount-proc-sys": ("umount /proc/sys || umount -l /proc/sys", "/proc/sys"),
    "remount-sys-rw": ("mount -o remount,bind,rw /sys", "/sys"),
    "remount-etc-hostname-rw": ("mount -o remount,bind,rw /etc/hostname", "/etc/hostname"),
    "unmount-etc-hostname": ("umount /etc/hostname", "/etc/hostname"),
}


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
def test_read_only_mounts_stay_read_only(systemd_host, locked, attempt):
    name, src = locked
    script, mountpoint = ATTEMPTS[attempt]
    cp = inside(systemd_host, name, script)
    options = _mount_options(systemd_host, name, mountpoint)
    assert cp.returncode != 0, f"{attempt} worked inside:\n{cp.stdout}{cp.stderr}"
    assert options is not None and "ro" in options, f"{mountpoint}: {options}"
    assert inside(systemd_host, name, f"touch {mountpoint}/pwned").returncode != 0
    assert systemd_host.run(["ls", src]).stdout.split() == ["file"]


def test_masked_proc_files_cannot_be_revealed(systemd_host, locked):
    name, _src = locked
    entry = _masked_entry(systemd_host)
    cp = inside(systemd_host, name, f"umount /proc/{entry} || umount -l /proc/{entry}")
    assert cp.returncode != 0, f"unmounting the mask over /proc/{entry} worked"
    mountinfo = inside(systemd_host, name, "cat /proc/self/mountinfo").stdout
    assert f" /proc/{entry} " in mountinfo
    # nor by a fresh proc without the masks (the kernel refuses one that reveals more)
    fresh = inside(systemd_host, name, "mkdir -p /tmp/p && mount -t proc proc /tmp/p")
    assert fresh.returncode != 0


def _host_lacks(host, path: str) -> bool:
    return host.run(["test", "-e", path], check=False).returncode != 0


@pytest.fixture
def hostile_image(systemd_host, tiny_image):
    """make(script): a copy of the tiny image, SCRIPT run in its directory."""
    made = []
    base = "/var/lib/machines"

    def make(script: str) -> str:
        image = f"hostile-{uuid.uuid4().hex[:8]}"
        systemd_host.run(["cp", "-a", f"{base}/{tiny_image}", f"{base}/{image}"])
        made.append(image)
        systemd_host.run(f"cd {base}/{image} && {script}")
        return image

    yield make
    for image in made:
        systemd_host.run(["rm", "-rf", f"{base}/{image}"])


def test_an_image_whose_etc_points_at_a_host_directory(
    systemd_host, make_machine, machine_name, hostile_image
):
    """A hostile image: ``etc -> /var/tmp``. The start writes /etc/hostname,
    hosts and resolv.conf into the image's /var/tmp, never the host's."""
    image = hostile_image(
        "mkdir -p var/tmp && cp -a etc/. var/tmp/ && rm -rf etc && ln -s /var/tmp etc"
    )
    planted = ["/var/tmp/hostname", "/var/tmp/hosts", "/var/tmp/resolv.conf"]
    systemd_host.run(["rm", "-f", *planted])
    try:
        name = make_machine(machine_name, "--image", image, command=SLEEPER)
        leaked = [path for path in planted if not _host_lacks(systemd_host, path)]
        assert leaked == [], f"the start created {leaked} on the host"
        assert inside(systemd_host, name, "cat /etc/hostname").stdout.strip() == name
    finally:
        systemd_host.run(["rm", "-f", *planted])
        systemd_host.pymachine("stop", machine_name, check=False)
        systemd_host.pymachine("remove", machine_name, check=False)


def test_an_image_whose_proc_is_its_root_is_refused(
    systemd_host, make_machine, machine_name, hostile_image
):
    """``proc -> /``: a mount there would cover the whole machine; the start
    fails and says why."""
    image = hostile_image("rm -rf proc && ln -s / proc")
    make_machine(machine_name, "--image", image, command=SLEEPER, start=False)
    cp = systemd_host.pymachine("start", machine_name, check=False)
    assert cp.returncode != 0
    assert "resolves to the machine's root" in cp.stderr


def test_a_bind_target_replaced_by_a_symlink_before_a_restart(
    systemd_host, make_machine, machine_name
):
    """Root inside moves the bind target's directory away and puts a symlink to
    the host's /var/tmp in its place; the restart mounts inside the machine."""
    unique = f"pymtest-{uuid.uuid4().hex[:8]}"
    src = f"/var/lib/pymachine/test-binds/{machine_name}"
    systemd_host.run(["mkdir", "-p", src])
    systemd_host.run(["sh", "-c", f"echo host > {src}/file"])
    name = make_machine(machine_name, "--bind", f"{src}:/bt/{unique}", command=SLEEPER)
    assert inside(systemd_host, name, f"cat /bt/{unique}/file").stdout == "host\n"
    swap = inside(systemd_host, name, "mv /bt /bt-old && ln -s /var/tmp /bt")
    assert swap.returncode == 0, swap.stderr
    try:
        systemd_host.pymachine("restart", name)
        assert _host_lacks(systemd_host, f"/var/tmp/{unique}"), "the start made a host directory"
        assert inside(systemd_host, name, f"cat /var/tmp/{unique}/file").stdout == "host\n"
    finally:
        systemd_host.run(["rm", "-rf", f"/var/tmp/{unique}"])


def test_a_live_read_only_bind_stays_read_only(systemd_host, locked):
    """``pymachine bind --read-only`` into a running machine: locked as well."""
    name, src = locked
    systemd_host.pymachine("bind", name, src, "/tmp/live", "--mkdir", "--read-only")
    assert inside(systemd_host, name, "cat /tmp/live/file").stdout == "host\n"
    cp = inside(systemd_host, name, "mount -o remount,bind,rw /tmp/live")
    assert cp.returncode != 0, "the live read-only bind was remounted read-write"
    assert "ro" in (_mount_options(systemd_host, name, "/tmp/live") or [])
    assert inside(systemd_host, name, "touch /tmp/live/pwned").returncode != 0
    assert systemd_host.run(["ls", src]).stdout.split() == ["file"]


def test_a_live_bind_target_resolves_inside_the_machine(systemd_host, locked):
    """A symlink to a host path in place of the target: the bind lands inside."""
    name, src = locked
    unique = f"pymtest-{uuid.uuid4().hex[:8]}"
    assert inside(systemd_host, name, "ln -s /run /tmp/link").returncode == 0
    systemd_host.pymachine("bind", name, src, f"/tmp/link/{unique}", "--mkdir")
    try:
        assert _host_lacks(systemd_host, f"/run/{unique}")
        assert inside(systemd_host, name, f"cat /run/{unique}/file").stdout == "host\n"
    finally:
        systemd_host.run(["rm", "-rf", f"/run/{unique}"])
