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


def inside(host, name: str, script: str, check: bool = True) -> str:
    return host.pymachine("exec", name, "--", "sh", "-c", script, check=check).stdout.strip()


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


def test_credentials_reach_the_payload_and_nothing_else(systemd_host, make_machine, machine_name):
    """SetCredential (kept root-only apart from the definition), LoadCredential
    (a root-only host file) and LoadCredentialEncrypted (systemd-creds encrypt's
    output) are files under $CREDENTIALS_DIRECTORY inside; no value shows in
    the definition, status --json, the journal or any process's environment."""
    directory = f"/var/lib/pymachine/test-creds/{machine_name}"
    systemd_host.run(["mkdir", "-p", directory])
    systemd_host.run(["sh", "-c", f"umask 077; printf file-secret-42 > {directory}/plain"])
    systemd_host.run(
        f"printf enc-secret-43 | systemd-creds encrypt --with-key=host --name=enc - {directory}/enc"
    )
    script = "echo $CREDENTIALS_DIRECTORY > /run/dir; while :; do sleep 1; done"
    name = make_machine(
        machine_name,
        "--set-credential", "token:set-secret-41",
        "--load-credential", f"plain:{directory}/plain",
        "--load-credential-encrypted", f"enc:{directory}/enc",
        command=("/bin/sh", "-c", script),
    )  # fmt: skip
    assert inside(systemd_host, name, "cat /run/dir") == "/run/host/credentials"
    values = inside(systemd_host, name, "cd /run/host/credentials && cat token plain enc")
    assert values == "set-secret-41file-secret-42enc-secret-43"
    # root's inside, read-only
    listing = inside(systemd_host, name, "ls -ln /run/host/credentials").splitlines()[1:]
    assert all(line.split()[0] == "-r--------" and line.split()[2] == "0" for line in listing)
    assert inside(systemd_host, name, "echo x > /run/host/credentials/token 2>&1; echo $?") != "0"
    secrets = ("set-secret-41", "file-secret-42", "enc-secret-43")
    places = {
        "definition": systemd_host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout,
        "status": systemd_host.pymachine("status", name, "--json").stdout,
        "journal": systemd_host.journal(f"pymachine-{name}.service", lines=1000),
        "unit": systemd_host.run(["systemctl", "show", f"pymachine-{name}.service"]).stdout,
        "environ": systemd_host.run(
            "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'", check=False
        ).stdout,
    }
    for place, text in places.items():
        assert not any(secret in text for secret in secrets), place
    store = systemd_host.run(["stat", "-c", "%a %U", f"/etc/pymachine/credentials/{name}/token"])
    assert store.stdout.split() == ["600", "root"]
    systemd_host.pymachine("stop", name)
    systemd_host.pymachine("remove", name)
    gone = systemd_host.run(["test", "-e", f"/etc/pymachine/credentials/{name}"], check=False)
    assert gone.returncode == 1


def test_a_payload_that_is_not_root_reads_its_credentials_alone(
    systemd_host, make_machine, machine_name
):
    """User=nobody: the credentials belong to the payload's user, as systemd
    gives a unit's User= its credentials (0400 files in a 0500 directory), so
    the payload reads them; another user inside does not."""
    script = (
        "id -u > /tmp/uid; cat $CREDENTIALS_DIRECTORY/token > /tmp/seen 2>&1; "
        "while :; do sleep 1; done"
    )
    name = make_machine(
        machine_name, "--user", "nobody", "--set-credential", "token:set-secret-44",
        command=("/bin/sh", "-c", script),
    )  # fmt: skip
    assert inside(systemd_host, name, "cat /tmp/uid") == "65534"
    assert inside(systemd_host, name, "cat /tmp/seen") == "set-secret-44"
    directory, token = inside(
        systemd_host, name, "ls -lnd /run/host/credentials /run/host/credentials/token"
    ).splitlines()
    assert directory.split()[0] == "dr-x------" and directory.split()[2:4] == ["65534"] * 2
    assert token.split()[0] == "-r--------" and token.split()[2:4] == ["65534"] * 2
    other = systemd_host.pymachine(
        "exec", "--user", "1000", name, "--", "cat", "/run/host/credentials/token", check=False
    )
    assert other.returncode != 0 and "set-secret-44" not in other.stdout, other
    assert "Permission denied" in other.stderr, other


def test_start_of_a_machine_starts_what_it_requires_first(
    systemd_host, make_machine, machine_name, notify_tool
):
    """web Requires=db: start web starts db and waits for its readiness first;
    stopping db stops web (systemd's own Requires=)."""
    ready = f"sleep 1; touch /run/warm; {NOTIFY} READY=1; while :; do sleep 1; done"
    db = make_machine(
        f"{machine_name}-db", "--notify", "--bind", notify_tool,
        command=("/bin/sh", "-c", ready), start=False,
    )  # fmt: skip
    web = make_machine(f"{machine_name}-web", "--requires", db, start=False)
    systemd_host.pymachine("start", web)
    assert systemd_host.pymachine("exec", db, "--", "test", "-e", "/run/warm").returncode == 0
    db_unit, web_unit = f"pymachine-{db}.service", f"pymachine-{web}.service"
    db_ready = int(show(systemd_host, db_unit, "ActiveEnterTimestampMonotonic").popitem()[1])
    web_began = int(show(systemd_host, web_unit, "InactiveExitTimestampMonotonic").popitem()[1])
    assert 0 < db_ready <= web_began
    assert db_unit in show(systemd_host, web_unit, "Requires")["Requires"].split()
    systemd_host.pymachine("stop", db)
    assert show(systemd_host, web_unit, "ActiveState")["ActiveState"] in ("inactive", "failed")


def test_unknown_machines_and_cycles_are_refused(systemd_host, make_machine, machine_name):
    out = systemd_host.pymachine(
        "create", machine_name, "--image", "tiny", "--requires", "no-such-machine", check=False
    )
    assert out.returncode == 4 and "Requires=no-such-machine" in out.stderr, out
    out = systemd_host.pymachine(
        "create", machine_name, "--image", "tiny", "--wants", machine_name, check=False
    )
    assert out.returncode == 2 and "cannot depend on itself" in out.stderr, out
    a = make_machine(f"{machine_name}-a", start=False)
    b = make_machine(f"{machine_name}-b", "--requires", a, start=False)
    out = systemd_host.pymachine(
        "create", f"{machine_name}-c", "--image", "tiny", "--requires", b, "--after", b,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out
    systemd_host.pymachine("remove", f"{machine_name}-c")
    # a hand edit closes the circle: start refuses it, nothing is started
    systemd_host.run(
        [
            "sh",
            "-c",
            f"sed -i 's/^Image=tiny$/Image=tiny\\nRequires={b}/' /etc/pymachine/{a}.machine",
        ]
    )
    out = systemd_host.pymachine("start", b, check=False)
    assert out.returncode == 2 and "dependency cycle" in out.stderr, out
    states = {
        m["name"]: m["state"] for m in json.loads(systemd_host.pymachine("list", "--json").stdout)
    }
    assert (states[a], states[b]) == ("stopped", "stopped"), states


def test_a_wanted_machine_must_exist_at_create_and_may_be_gone_at_start(
    systemd_host, make_machine, machine_name
):
    """Wants=: an unknown machine is refused at create as Requires= is (exit 4,
    nothing written); one removed since then is left out at start, as
    systemd's Wants= leaves out a unit that is not there, where a removed
    required machine fails the start."""
    out = systemd_host.pymachine(
        "create", machine_name, "--image", "tiny", "--wants", "no-such-machine", check=False
    )
    assert out.returncode == 4, out
    assert out.stderr.strip().endswith("Wants=no-such-machine: machine 'no-such-machine' not found")
    shown = systemd_host.pymachine("show", machine_name, "--json", check=False)
    assert shown.returncode == 4, shown
    cache = make_machine(f"{machine_name}-cache", start=False)
    db = make_machine(f"{machine_name}-db", start=False)
    web = make_machine(f"{machine_name}-web", "--wants", cache, start=False)
    api = make_machine(f"{machine_name}-api", "--requires", db, start=False)
    systemd_host.pymachine("remove", cache)
    systemd_host.pymachine("remove", db)
    systemd_host.pymachine("start", web)
    assert status_json(systemd_host, web)["state"] == "running"
    out = systemd_host.pymachine("start", api, check=False)
    assert out.returncode == 4 and f"requires '{db}', which did not start" in out.stderr, out
    assert status_json(systemd_host, api)["state"] == "stopped"


def test_enabling_a_machine_whose_required_machine_is_not_enabled_warns(
    systemd_host, make_machine, machine_name
):
    """web Requires=db, db not enabled: enable web says, in one line, that web
    will fail at boot, which is what systemd does (db has no unit then); once
    db is enabled, no warning, and systemd's own start of web (as at boot)
    starts db first."""
    db = make_machine(f"{machine_name}-db", start=False)
    web = make_machine(f"{machine_name}-web", "--requires", db, start=False)
    web_unit = f"pymachine-{web}.service"
    try:
        out = systemd_host.pymachine("enable", web)
        warnings = [line for line in out.stderr.splitlines() if "warning" in line]
        assert warnings == [
            f"pymachine: warning: machine '{web}' requires '{db}', which is not enabled: "
            f"it will fail to start at boot ('pymachine enable {db}')"
        ], out
        refused = systemd_host.run(["systemctl", "start", web_unit], check=False)
        assert refused.returncode != 0 and "not found" in refused.stderr, refused
        systemd_host.pymachine("enable", db)
        out = systemd_host.pymachine("disable", web)
        out = systemd_host.pymachine("enable", web)
        assert "warning" not in out.stderr, out
        systemd_host.run(["systemctl", "start", web_unit])
        assert status_json(systemd_host, db)["state"] == "running"
    finally:
        systemd_host.pymachine("disable", "--now", web, check=False)
        systemd_host.pymachine("disable", "--now", db, check=False)


def test_a_device_passed_through_is_usable(systemd_host, make_machine, machine_name):
    """/dev/fuse in a user-namespaced machine: there, root's inside, opened for
    reading and writing (the unit's device policy allows it); a machine
    without --device has none, and a node missing on the host fails the start."""
    name = make_machine(machine_name, "--device", "/dev/fuse")
    listing = inside(systemd_host, name, "ls -ln /dev/fuse").split()
    assert listing[0].startswith("crw") and listing[2:4] == ["0", "0"], listing
    assert inside(systemd_host, name, "exec 3<>/dev/fuse && echo opened") == "opened"
    unit = f"pymachine-{name}.service"
    allowed = systemd_host.run(["systemctl", "show", "-p", "DeviceAllow", unit]).stdout
    assert "/dev/fuse rwm" in allowed, allowed
    other = make_machine(f"{machine_name}-none")
    assert inside(systemd_host, other, "test -e /dev/fuse; echo $?") == "1"
    missing = make_machine(f"{machine_name}-missing", "--device", "/dev/no-such-node", start=False)
    out = systemd_host.pymachine("start", missing, check=False)
    assert out.returncode == 1 and "device /dev/no-such-node does not exist on the host" in (
        out.stdout + out.stderr
    ), out


def test_a_device_keeps_its_group_by_name_for_a_payload_user(
    systemd_host, make_machine, machine_name
):
    """A host node of group G (as /dev/kvm is kvm's, 0660) is made in a
    user-namespaced machine with the machine's own group G (its GID in the
    machine's /etc/group, mapped): a payload user in G there opens it, one
    not in G does not. Without such a group, the node is root's group."""
    node, group = "/dev/pymtest-null", "pymtest-dev"
    systemd_host.run(
        f"getent group {group} >/dev/null || groupadd {group}; rm -f {node}; "
        f"mknod -m 660 {node} c 1 3 && chgrp {group} {node}"
    )  # the /dev/null device, as a node only G may open
    try:
        name = make_machine(machine_name, "--device", node)
        assert inside(systemd_host, name, f"ls -ln {node}").split()[2:4] == ["0", "0"]
        inside(systemd_host, name, f"echo {group}:x:4242:nobody >> /etc/group")
        systemd_host.pymachine("restart", name)
        assert inside(systemd_host, name, f"ls -ln {node}").split()[:4] == [
            "crw-rw----", "1", "0", "4242",
        ]  # fmt: skip
        member = systemd_host.pymachine(
            "exec", "--user", "nobody", name, "--", "sh", "-c", f"exec 3<>{node} && echo opened"
        )
        assert member.stdout.strip() == "opened", member
        other = systemd_host.pymachine(
            "exec", "--user", "1000", name, "--", "sh", "-c", f"exec 3<>{node}", check=False
        )
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
    finally:
        systemd_host.run(["rm", "-f", node])


def test_the_device_policy_still_refuses_other_nodes(systemd_host, make_machine, machine_name):
    """Device=/dev/fuse:r: read-only access to it; write is refused by the cgroup."""
    name = make_machine(machine_name, "--device", "/dev/fuse:r")
    assert inside(systemd_host, name, "exec 3</dev/fuse && echo opened") == "opened"
    out = inside(
        systemd_host, name, "(exec 3<>/dev/fuse) 2>/dev/null && echo opened || echo refused"
    )
    assert out == "refused"


def wait_until(condition, what: str, timeout: float = 60):
    """Poll CONDITION (a function) until it returns something true: health
    checks run on their own clock, which a test can only wait for."""
    import time

    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)
    return result


def status_json(host, name: str) -> dict:
    return json.loads(host.pymachine("status", name, "--json", check=False).stdout)


HEALTH = ("--health-cmd", "echo checked; test -e /run/ok", "--health-interval", "0.5")


def test_health_state_shows_in_status_list_and_the_api(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, *HEALTH, "--health-retries", "2")
    health = wait_until(
        lambda: (
            (status_json(systemd_host, name).get("health") or {}).get("status") == "unhealthy"
            and status_json(systemd_host, name)["health"]
        ),
        "unhealthy",
    )
    assert health["failing_streak"] >= 2 and health["last_output"] == "checked"
    assert status_json(systemd_host, name)["state"] == "running"  # HealthOnFailure=none
    listed = {m["name"]: m for m in json.loads(systemd_host.pymachine("list", "--json").stdout)}
    assert listed[name]["health"]["status"] == "unhealthy"
    assert "Health: unhealthy" in systemd_host.pymachine("status", name, check=False).stdout
    row = next(r for r in systemd_host.pymachine("list").stdout.splitlines() if r.startswith(name))
    assert "running (unhealthy)" in row
    systemd_host.pymachine("exec", name, "--", "touch", "/run/ok")
    wait_until(lambda: status_json(systemd_host, name)["health"]["status"] == "healthy", "healthy")
    assert status_json(systemd_host, name)["health"]["failing_streak"] == 0


def test_a_failing_health_check_restarts_the_machine(systemd_host, make_machine, machine_name):
    name = make_machine(
        machine_name, *HEALTH, "--health-retries", "2", "--health-on-failure", "restart"
    )
    unit = f"pymachine-{name}.service"
    systemd_host.wait_for_journal(
        unit, "health check failed 2 times in a row: restarting the machine (last output: checked)",
        timeout=60,
    )  # fmt: skip
    wait_until(lambda: int(show(systemd_host, unit, "NRestarts")["NRestarts"]) >= 1, "restarted")
    wait_until(lambda: show(systemd_host, unit, "ActiveState")["ActiveState"] == "active", "active")


def test_a_failing_health_check_with_kill_stops_the_machine(
    systemd_host, make_machine, machine_name
):
    name = make_machine(
        machine_name, *HEALTH, "--health-retries", "1", "--health-on-failure", "kill"
    )
    wait_until(lambda: status_json(systemd_host, name)["state"] == "failed", "failed")
    assert status_json(systemd_host, name)["exit_status"] == 137
    journal = systemd_host.journal(f"pymachine-{name}.service")
    assert "health check failed 1 times in a row: killing the machine" in journal


def test_notify_healthy_gates_a_dependent_machine(systemd_host, make_machine, machine_name):
    """db is ready at its first passing check (after it wrote /run/ok, 2 s in),
    and web, which requires it, starts only then."""
    db = make_machine(
        f"{machine_name}-db", "--notify-healthy", *HEALTH,
        command=("/bin/sh", "-c", "sleep 2; touch /run/ok; while :; do sleep 1; done"),
        start=False,
    )  # fmt: skip
    web = make_machine(f"{machine_name}-web", "--requires", db, start=False)
    systemd_host.pymachine("start", web)
    assert systemd_host.pymachine("exec", db, "--", "test", "-e", "/run/ok").returncode == 0
    assert status_json(systemd_host, db)["health"]["status"] == "healthy"
    db_ready = int(
        show(systemd_host, f"pymachine-{db}.service", "ActiveEnterTimestampMonotonic").popitem()[1]
    )
    web_began = int(
        show(systemd_host, f"pymachine-{web}.service", "InactiveExitTimestampMonotonic").popitem()[
            1
        ]
    )
    assert 0 < db_ready <= web_began


def test_a_silent_payload_is_ended_by_systemds_watchdog(
    systemd_host, make_machine, machine_name, notify_tool
):
    """WatchdogSec=2: the payload's WATCHDOG=1 (relayed by the init) keeps the
    unit alive for 4 s; once it stops, systemd's watchdog fires ("Watchdog
    timeout" in the journal), its SIGABRT reaches the payload, and the unit
    fails with result watchdog."""
    script = (
        f"for i in 1 2 3 4 5 6 7 8; do {NOTIFY} WATCHDOG=1; sleep 0.5; done; "
        "while :; do sleep 1; done"
    )
    name = make_machine(
        machine_name, "--watchdog-sec", "2", "--bind", notify_tool,
        command=("/bin/sh", "-c", script),
    )  # fmt: skip
    unit = f"pymachine-{name}.service"
    assert show(systemd_host, unit, "WatchdogUSec")["WatchdogUSec"] == "2s"
    systemd_host.wait_for_journal(unit, "Watchdog timeout", timeout=60)
    wait_until(lambda: status_json(systemd_host, name)["state"] == "failed", "failed")
    assert show(systemd_host, unit, "Result")["Result"] == "watchdog"
    # the init passed systemd's SIGABRT on: the payload ended of it (128+6), as a
    # plain service's process would, not SIGKILLed after TimeoutAbortSec=
    assert "Main process exited, code=exited, status=134" in systemd_host.journal(unit)


def test_a_payload_that_keeps_pinging_keeps_its_watchdog_fed_and_restart_on_watchdog(
    systemd_host, make_machine, machine_name, notify_tool
):
    """A payload that keeps sending WATCHDOG=1 outlives many WatchdogSec=
    periods (WATCHDOG_USEC tells it how often); one that stops is restarted
    by systemd with Restart=on-watchdog."""
    fed = (
        "echo $WATCHDOG_USEC > /run/usec; "
        f"i=0; while :; do {NOTIFY} WATCHDOG=1; i=$((i+1)); echo $i > /run/pings; sleep 0.3; done"
    )
    alive = make_machine(
        f"{machine_name}-fed", "--watchdog-sec", "1", "--bind", notify_tool,
        command=("/bin/sh", "-c", fed),
    )  # fmt: skip
    silent = make_machine(
        f"{machine_name}-silent", "--watchdog-sec", "1", "--restart", "on-watchdog",
        "--bind", notify_tool, command=("/bin/sh", "-c", "while :; do sleep 1; done"),
    )  # fmt: skip
    assert wait_until(
        lambda: inside(systemd_host, alive, "cat /run/usec", check=False), "usec"
    ) == ("1000000")
    unit = f"pymachine-{silent}.service"
    systemd_host.wait_for_journal(unit, "Watchdog timeout", timeout=60)
    wait_until(lambda: int(show(systemd_host, unit, "NRestarts")["NRestarts"]) >= 1, "restarted")
    # 20 pings at 0.3 s: the fed machine lived through 6 of its 1 s periods
    wait_until(
        lambda: int(inside(systemd_host, alive, "cat /run/pings", check=False) or 0) >= 20,
        "20 pings",
    )
    alive_unit = f"pymachine-{alive}.service"
    assert show(systemd_host, alive_unit, "ActiveState", "NRestarts") == {
        "ActiveState": "active",
        "NRestarts": "0",
    }
    assert "Watchdog timeout" not in systemd_host.journal(alive_unit, lines=1000)


def test_a_booted_guest_is_started_once_its_systemd_is_ready(
    systemd_host, debian_image, machine_name
):
    """Notify=yes in boot mode (systemd-nspawn --notify-ready): start returns
    once the guest's systemd finished starting up, not while it boots."""
    name = machine_name
    systemd_host.pymachine(
        "create", name, "--image", debian_image, "--boot", "--notify", "--network", "none",
        "--stop-timeout", "30",
    )  # fmt: skip
    try:
        systemd_host.pymachine("start", name, timeout=180)
        state = systemd_host.pymachine(
            "exec", name, "--", "systemctl", "is-system-running", check=False
        ).stdout.strip()
        assert state in ("running", "degraded"), state
    finally:
        systemd_host.pymachine("stop", name, check=False, timeout=120)
        systemd_host.pymachine("remove", name, check=False)


@pytest.mark.parametrize("action", ["restart", "kill"])
def test_a_degraded_guest_takes_the_health_action(systemd_host, debian_image, machine_name, action):
    """Guest health: a booted machine whose systemd is degraded (a unit of it
    failed) is restarted, or killed, as HealthOnFailure= says; the journal
    says why."""
    name = machine_name
    systemd_host.pymachine(
        "create", name, "--image", debian_image, "--boot", "--network", "none",
        "--stop-timeout", "30",
        "--health-interval", "1", "--health-retries", "2", "--health-on-failure", action,
    )  # fmt: skip
    unit = f"pymachine-{name}.service"
    try:
        systemd_host.pymachine("start", name, timeout=180)
        first = show(systemd_host, unit, "InvocationID")["InvocationID"]
        wait_until(lambda: status_json(systemd_host, name)["health"]["status"] == "healthy", "up")
        # a unit of the guest fails: its systemd is degraded
        systemd_host.pymachine(
            "exec", name, "--", "systemd-run", "--wait", "-q", "--unit=pymtest-fail", "/bin/false",
            check=False,
        )  # fmt: skip
        verb = {"restart": "restarting", "kill": "killing"}[action]
        systemd_host.wait_for_journal(
            unit,
            f"guest health check failed 2 times in a row: {verb} the machine "
            "(is-system-running: degraded)",
            timeout=120,
        )
        if action == "restart":
            wait_until(
                lambda: (
                    show(systemd_host, unit, "InvocationID")["InvocationID"] not in ("", first)
                    and show(systemd_host, unit, "ActiveState")["ActiveState"] == "active"
                ),
                "restarted",
                timeout=120,
            )
        else:
            wait_until(lambda: status_json(systemd_host, name)["state"] == "failed", "failed")
    finally:
        systemd_host.pymachine("stop", name, check=False, timeout=120)
        systemd_host.pymachine("remove", name, check=False)


def test_a_booted_guests_health_command_is_run_inside_and_acted_on(
    systemd_host, debian_image, machine_name
):
    """HealthCmd= in boot mode: run in the guest (as pymachine exec would) by
    the runtime's monitor; healthy while it passes, and at HealthRetries=
    failures the machine is killed (HealthOnFailure=kill: the unit fails),
    the journal giving the check's last output."""
    name = machine_name
    systemd_host.pymachine(
        "create", name, "--image", debian_image, "--boot", "--network", "none",
        "--stop-timeout", "30", "--health-cmd", "echo probed; test ! -e /run/broken",
        "--health-interval", "1", "--health-retries", "2", "--health-on-failure", "kill",
    )  # fmt: skip
    unit = f"pymachine-{name}.service"
    try:
        systemd_host.pymachine("start", name, timeout=180)
        health = wait_until(
            lambda: (
                status_json(systemd_host, name).get("health", {}).get("status") == "healthy"
                and status_json(systemd_host, name)["health"]
            ),
            "healthy",
            timeout=120,
        )
        assert health["last_output"] == "probed", health
        # the guest's checks are the runtime's: no notify socket for its systemd
        no_socket = systemd_host.pymachine(
            "exec", name, "--", "test", "-e", "/run/host/notify", check=False
        )
        assert no_socket.returncode == 1, no_socket
        systemd_host.pymachine("exec", name, "--", "touch", "/run/broken")
        systemd_host.wait_for_journal(
            unit,
            "guest health check failed 2 times in a row: killing the machine (last output: probed)",
            timeout=120,
        )
        wait_until(lambda: status_json(systemd_host, name)["state"] == "failed", "failed")
    finally:
        systemd_host.pymachine("stop", name, check=False, timeout=120)
        systemd_host.pymachine("remove", name, check=False)
