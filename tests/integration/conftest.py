"""Fixtures shared by the tier-1 machine tests: one busybox image per session."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def tiny_image(systemd_host) -> str:
    """A busybox image in the session's systemd host (offline, about a second)."""
    name = "tiny"
    if systemd_host.run(["test", "-d", f"/var/lib/machines/{name}"], check=False).returncode:
        systemd_host.pymachine("bootstrap", "--distro", "busybox", name)
    return name


@pytest.fixture
def machine_name(request) -> str:
    """A machine name unique in the session (tests share one systemd host)."""
    base = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:40]
    return f"{base}-{os.getpid() % 1000}-{next(_counter)}"


@pytest.fixture
def make_machine(systemd_host, tiny_image):
    """create (and at teardown stop + remove) a machine in the session host."""
    made: list[str] = []

    def make(
        name: str,
        *flags: str,
        command: tuple[str, ...] = ("/bin/sh", "-c", "while :; do sleep 1; done"),
        start: bool = True,
    ) -> str:
        args = ["create", name, "--image", tiny_image, *flags]
        if "--network" not in flags:
            args += ["--network", "none"]
        if command:
            args += ["--", *command]
        systemd_host.pymachine(*args)
        made.append(name)
        if start:
            systemd_host.pymachine("start", name)
        return name

    yield make
    for name in made:
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)


@pytest.fixture(scope="session")
def debian_image(systemd_host) -> str:
    """Debian bookworm minbase with systemd, dbus, machined and busybox (for boot
    mode and nested machines), bootstrapped for real inside
    the host (mmdebstrap, ~30 s; packages cached in /var/cache/pymachine across
    runs). One image serves the image tests and boot mode."""
    from tests.harness import skip_or_fail

    if not (shutil.which("mmdebstrap") or shutil.which("debootstrap")):
        skip_or_fail("neither mmdebstrap nor debootstrap is installed (apt-get install mmdebstrap)")
    name = "debian-test"
    if systemd_host.run(["test", "-d", f"/var/lib/machines/{name}"], check=False).returncode:
        systemd_host.pymachine(
            "bootstrap",
            "--distro",
            "debian",
            "--release",
            "bookworm",
            "--variant",
            "minbase",
            "--include",
            "systemd,systemd-sysv,dbus,systemd-container,busybox-static",
            name,
            timeout=900,
        )
    return name
