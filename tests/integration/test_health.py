"""Readiness, as systemd's own mechanisms carry it (issue 20), in a real systemd host."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.tier1

# sd_notify(3) in a few lines, static: the busybox image has no systemd-notify.
NOTIFY_C = r"""
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
int main(int argc, char **argv) {
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path || argc != 2 || strlen(path) >= sizeof(addr.sun_path))
        return 2;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    return sendto(fd, argv[1], strlen(argv[1]), 0, (struct sockaddr *)&addr, sizeof(addr)) < 0;
}
"""
NOTIFY = "/usr/local/bin/sd-notify"  # inside the machines


@pytest.fixture(scope="module")
def notify_tool(systemd_host) -> str:
    """The static sd-notify binary, on the host, to bind into machines."""
    directory = "/var/lib/pymachine/test-notify"
    systemd_host.run(["mkdir", "-p", directory])
    systemd_host.run(["sh", "-c", f"cat > {directory}/notify.c"], input=NOTIFY_C)
    systemd_host.run(
        ["gcc", "-O2", "-static", "-o", f"{directory}/sd-notify", f"{directory}/notify.c"]
    )
    return f"{directory}/sd-notify:{NOTIFY}:ro"


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_start_returns_once_the_payload_is_ready(
    systemd_host, make_machine, machine_name, notify_tool
):
    """A payload that is ready after 2 s: start returns after its READY=1, not
    before (the file it writes just before is there), and its STATUS= reaches
    the unit."""
    script = (
        "echo $NOTIFY_SOCKET > /run/socket; ls -l /proc/$$/fd > /run/fds; "
        f"{NOTIFY} 'STATUS=warming up'; sleep 2; touch /run/warm; "
        f"{NOTIFY} \"$(printf 'READY=1\\nSTATUS=serving')\"; while :; do sleep 1; done"
    )
    name = make_machine(
        machine_name, "--notify", "--bind", notify_tool, command=("/bin/sh", "-c", script)
    )
    assert systemd_host.pymachine("exec", name, "--", "test", "-e", "/run/warm").returncode == 0
    unit = f"pymachine-{name}.service"
    props = show(systemd_host, unit, "ActiveState", "StatusText", "NotifyAccess")
    assert props == {"ActiveState": "active", "StatusText": "serving", "NotifyAccess": "main"}
    # the payload has the socket's name, and none of the init's descriptors
    assert inside(systemd_host, name, "cat /run/socket") == "/run/host/notify"
    fds = dict(
        line.split()[-3::2] for line in inside(systemd_host, name, "cat /run/fds").splitlines()[1:]
    )  # fd -> target; ash keeps a copy of stdout at 10
    assert set(fds.values()) == {"/dev/null", "/run/fds", fds["2"]}, fds


def inside(host, name: str, script: str) -> str:
    return host.pymachine("exec", name, "--", "sh", "-c", script).stdout.strip()


def test_without_notify_start_does_not_wait(systemd_host, make_machine, machine_name):
    """The control: the same payload without Notify=yes is running before it is warm."""
    script = "sleep 2; touch /run/warm; while :; do sleep 1; done"
    name = make_machine(machine_name, command=("/bin/sh", "-c", script))
    assert (
        systemd_host.pymachine(
            "exec", name, "--", "test", "-e", "/run/warm", check=False
        ).returncode
        == 1
    )


def test_a_payload_that_exits_before_ready_fails_the_start(
    systemd_host, make_machine, machine_name, notify_tool
):
    name = make_machine(
        machine_name, "--notify", "--bind", notify_tool, command=("/bin/sh", "-c", "exit 3"),
        start=False,
    )  # fmt: skip
    out = systemd_host.pymachine("start", name, check=False)
    assert out.returncode == 1, out
    journal = systemd_host.journal(f"pymachine-{name}.service")
    assert "exited before it was ready" in journal
    status = systemd_host.pymachine("status", name, "--json", check=False)
    assert json.loads(status.stdout)["state"] == "failed"


def test_notify_survives_enable(systemd_host, make_machine, machine_name, notify_tool):
    """An enabled machine's unit file carries the same wait."""
    script = f"sleep 1; touch /run/warm; {NOTIFY} READY=1; while :; do sleep 1; done"
    name = make_machine(
        machine_name, "--notify", "--bind", notify_tool, command=("/bin/sh", "-c", script),
        start=False,
    )  # fmt: skip
    systemd_host.pymachine("enable", name)
    try:
        text = systemd_host.run(["cat", f"/etc/systemd/system/pymachine-{name}.service"]).stdout
        assert "NotifyAccess=main" in text and "--wait-ready" in text
        systemd_host.pymachine("start", name)
        assert systemd_host.pymachine("exec", name, "--", "test", "-e", "/run/warm").returncode == 0
    finally:
        systemd_host.pymachine("disable", name, "--now", check=False)
