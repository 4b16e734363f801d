"""pymachined in a throwaway systemd host with the real D-Bus broker and a
real polkitd: activation, the API, polkit rules for a group, a user outside
it, a killed daemon, two clients at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.systemd_host import SystemdHost, default_binds

pytestmark = pytest.mark.tier1

RULES = Path(__file__).parents[2] / "docs/polkit/50-pymachine.rules"
PYMACHINE = [sys.executable, "-m", "machined"]
#: The group may manage images too (not in the example rule).
IMAGES_RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.pymachine.machine1.manage-images" && subject.isInGroup("pymachine"))
        return polkit.Result.YES;
});
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):
    """A host of the module's own (it installs pymachined, adds users and a
    polkit rule): alice is in the group "pymachine", bob is not."""
    from tests.harness import require_tier1

    require_tier1()
    base = tmp_path_factory.mktemp("daemon-host")
    h = SystemdHost(base / "host", binds=default_binds(base))
    h.start()
    try:
        h.run(
            "set -e; groupadd pymachine; useradd -m -G pymachine alice; useradd -m bob; "
            # the test run's interpreter may live under /root (in this host's overlay only)
            "chmod 711 /root; mkdir -p /etc/polkit-1/rules.d"
        )
        h.run(
            ["cp", "/dev/stdin", "/etc/polkit-1/rules.d/50-pymachine.rules"],
            input=RULES.read_text(),
        )
        h.run(["cp", "/dev/stdin", "/etc/polkit-1/rules.d/51-images.rules"], input=IMAGES_RULE)
        h.run(
            [
                "chmod",
                "644",
                "/etc/polkit-1/rules.d/50-pymachine.rules",
                "/etc/polkit-1/rules.d/51-images.rules",
            ]
        )  # polkitd reads them
        h.pymachine("install-units")
        h.pymachine("bootstrap", "--distro", "busybox", "tiny")
        yield h
    finally:
        h.stop()


def as_user(host: SystemdHost, user: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return host.run(["runuser", "-u", user, "--", *PYMACHINE, *args], check=False, **kw)


def make(host: SystemdHost, name: str, start: bool = True) -> str:
    host.pymachine(
        "create", name, "--image", "tiny", "--network", "none", "--",
        "/bin/sh", "-c", "while :; do sleep 1; done",
    )  # fmt: skip
    if start:
        host.pymachine("start", name)
    return name


def active(host: SystemdHost, unit: str) -> str:
    return host.run(["systemctl", "is-active", unit], check=False).stdout.strip()


def test_first_call_activates_pymachined_and_busctl_sees_the_api(host):
    host.run(["systemctl", "stop", "pymachined.service"], check=False)
    assert active(host, "pymachined.service") != "active"
    host.pymachine("list")
    assert active(host, "pymachined.service") == "active"
    out = host.run(
        ["busctl", "introspect", "org.pymachine.machine1", "/org/pymachine/machine1"]
    ).stdout
    for member in (".StartMachines", ".ListMachines", ".ExecMachine", ".MachineNew"):
        assert member in out
    make(host, "api1")
    out = host.run(
        ["busctl", "get-property", "org.pymachine.machine1", "/org/pymachine/machine1/machine/api1",
         "org.pymachine.machine1.Machine", "State"]
    ).stdout  # fmt: skip
    assert out.strip() == 's "running"'


def test_a_user_of_the_allowed_group_lists_starts_execs_shells_and_stops(host):
    name = make(host, "alice1", start=False)
    assert as_user(host, "alice", "start", name).returncode == 0
    assert active(host, f"pymachine-{name}.service") == "active"
    listed = as_user(host, "alice", "list")
    assert listed.returncode == 0 and name in listed.stdout
    status = as_user(host, "alice", "status", name)
    assert status.returncode == 0 and "State: running" in status.stdout
    out = as_user(host, "alice", "exec", name, "--", "hostname")
    assert (out.returncode, out.stdout.strip()) == (0, name), out
    code = as_user(host, "alice", "exec", name, "--", "/bin/sh", "-c", "exit 7")
    assert code.returncode == 7
    shell = as_user(host, "alice", "shell", name, "--", "/bin/sh", "-c", "echo in-$(hostname)")
    assert shell.returncode == 0 and f"in-{name}" in shell.stdout
    assert as_user(host, "alice", "stop", name).returncode == 0
    assert active(host, f"pymachine-{name}.service") != "active"


def test_a_user_outside_it_is_refused_in_one_line_and_nothing_changes(host):
    name = make(host, "bob1")
    for args in (["stop", name], ["exec", name, "--", "true"], ["remove", name]):
        out = as_user(host, "bob", *args)
        assert out.returncode == 6, out
        assert out.stderr.startswith("pymachine: access denied") and out.stderr.count("\n") == 1
    assert active(host, f"pymachine-{name}.service") == "active"
    assert host.run(["test", "-f", f"/etc/pymachine/{name}.machine"], check=False).returncode == 0
    assert name in as_user(host, "bob", "list").stdout  # reading is open, as machined's


def test_the_group_may_not_create_what_reaches_into_the_host(host):
    out = as_user(
        host, "alice", "create", "priv1", "--image", "tiny", "--bind", "/etc:/hostetc",
        "--", "/bin/true",
    )  # fmt: skip
    assert out.returncode == 6 and "Bind=" in out.stderr, out
    for flags in (
        ["--private-users", "no"],
        ["--network", "host"],
        ["--capability", "CAP_SYS_ADMIN"],
    ):
        out = as_user(
            host, "alice", "create", "priv1", "--image", "tiny", *flags, "--", "/bin/true"
        )
        assert out.returncode == 6, (flags, out)
    assert host.run(["test", "-e", "/etc/pymachine/priv1.machine"], check=False).returncode != 0
    out = as_user(host, "alice", "create", "plain1", "--image", "tiny", "--network", "none")
    assert out.returncode == 0, out
    assert as_user(host, "alice", "remove", "plain1").returncode == 0


def test_killing_pymachined_leaves_machines_running_and_the_next_call_restarts_it(host):
    name = make(host, "kill1")
    host.run(["systemctl", "kill", "-s", "KILL", "pymachined.service"])
    host.run("while systemctl -q is-active pymachined.service; do sleep 0.1; done", timeout=30)
    assert active(host, f"pymachine-{name}.service") == "active"
    out = host.pymachine("status", name)
    assert "State: running" in out.stdout
    assert active(host, "pymachined.service") == "active"


def test_two_clients_starting_one_machine_end_consistent(host):
    name = make(host, "twice1", start=False)
    clients = [
        host.popen(
            [*PYMACHINE, "start", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    codes = sorted(c.wait(timeout=120) for c in clients)
    assert codes in ([0, 0], [0, 5]), [c.stderr.read() for c in clients]
    assert active(host, f"pymachine-{name}.service") == "active"
    assert host.pymachine("stop", name).returncode == 0


def test_ctrl_c_of_a_non_root_exec_reaches_the_command(host):
    name = make(host, "sigint1")
    script = (
        f"setpriv --reuid alice --regid alice --init-groups {' '.join(PYMACHINE)} exec {name} -- "
        "/bin/sh -c 'trap \"exit 42\" INT; touch /ready; while :; do sleep 0.1; done' & "
        f"until {' '.join(PYMACHINE)} exec {name} -- test -e /ready; do sleep 0.1; done; "
        "kill -INT $!; wait $!; echo status=$?"
    )
    out = host.run(["/bin/bash", "-c", script], timeout=60)
    assert "status=42" in out.stdout, out


ASYNC_CLIENT = """
import asyncio, sys
from machined.client import Client
from machined.errors import NotRunning

async def main(name):
    async with await Client.connect() as pm:
        await pm.start(name)
        states = {m["Name"]: m["State"] for m in await pm.list_machines()}
        code = await pm.exec(name, ["/bin/sh", "-c", "hostname; exit 3"])
        leader = (await pm.status(name))["Leader"]
        await pm.stop(name)
        try:
            await pm.stop(name)
        except NotRunning as exc:
            error = type(exc).__name__
        print(states[name], code, leader > 0, error)

asyncio.run(main(sys.argv[1]))
"""


def test_the_async_python_api_as_a_user_of_the_group(host):
    name = make(host, "async1", start=False)
    out = host.run(["runuser", "-u", "alice", "--", sys.executable, "-c", ASYNC_CLIENT, name])
    assert out.stdout.split() == [name, "running", "3", "True", "NotRunning"], out


SSH_STUB = """#!/bin/sh
# ssh's stand-in in the test host: 'ssh [OPTIONS] -- HOST COMMAND…' runs COMMAND here,
# through a shell as sshd would (no network, no sshd: the transport is what is tested)
echo "$@" >> /run/ssh-stub.log
while [ "$1" != "--" ]; do shift; done
shift 2
exec /bin/sh -c "$*"
"""


def test_dash_h_reaches_pymachined_over_the_ssh_stdio_bridge(host):
    name = make(host, "remote1")
    host.run(
        ["sh", "-c", "cat > /usr/local/bin/ssh && chmod 755 /usr/local/bin/ssh"], input=SSH_STUB
    )
    try:
        listed = host.pymachine("-H", "root@other", "list")
        assert name in listed.stdout
        assert "root@other systemd-stdio-bridge" in host.run(["cat", "/run/ssh-stub.log"]).stdout
        assert host.pymachine("-H", "root@other", "stop", name).returncode == 0
        assert active(host, f"pymachine-{name}.service") != "active"
        host.pymachine("-H", "other", "start", name)
        out = host.pymachine("-H", "other", "exec", name, "--", "hostname")
        assert out.stdout.strip() == name  # exec: the other host's pymachine under ssh
        bad = host.pymachine("-H", "-oProxyCommand=touch /pwned", "list", check=False)
        assert bad.returncode == 2 and "invalid host" in bad.stderr
        assert host.run(["test", "-e", "/pwned"], check=False).returncode != 0
    finally:
        host.run(["rm", "-f", "/usr/local/bin/ssh"])


def test_the_group_enables_sets_limits_and_disables_through_pymachined(host):
    name = make(host, "enable1")
    out = as_user(host, "alice", "enable", name)
    assert out.returncode == 0 and "starts it at boot" in out.stdout, out
    wants = f"/etc/systemd/system/machines.target.wants/pymachine-{name}.service"
    assert host.run(["test", "-L", wants], check=False).returncode == 0
    out = as_user(host, "alice", "set", name, "-p", "TasksMax=77")
    assert out.returncode == 0 and "Saved TasksMax=77" in out.stdout, out
    assert "TasksMax=77" in host.run(["cat", f"/etc/pymachine/{name}.machine"]).stdout
    bad = as_user(host, "alice", "set", name, "-p", "ExecStart=/bin/evil")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad
    denied = as_user(host, "bob", "disable", name)
    assert denied.returncode == 6, denied
    out = as_user(host, "alice", "disable", "--now", name)
    assert out.returncode == 0 and "Stopped machine" in out.stdout, out
    assert host.run(
        ["test", "-e", f"/etc/systemd/system/pymachine-{name}.service"], check=False
    ).returncode


def test_set_of_definition_keys_through_pymachined_is_checked_as_create_is(host):
    """alice may set the definition keys of issue 20 on a group machine, which
    apply at the next start; a cycle is refused with create's error; Device=
    and LoadCredential= (host devices and paths) need the privileged action,
    which the group's rule does not grant: nothing changes."""
    db = make(host, "setdb", start=False)
    web = make(host, "setweb", start=False)
    out = as_user(host, "alice", "set", web, "-p", "WatchdogSec=30", "-p", f"Requires={db}")
    assert (
        out.returncode == 0
        and "Requires=, WatchdogSec= take effect at the next start" in out.stdout
    ), out
    text = host.run(["cat", f"/etc/pymachine/{web}.machine"]).stdout
    assert f"Requires={db}\n" in text and "WatchdogSec=30\n" in text
    cycle = as_user(host, "alice", "set", db, "-p", f"Wants={web}")
    assert cycle.returncode == 2 and "dependency cycle" in cycle.stderr, cycle
    for assignment in ("Device=/dev/fuse", "LoadCredential=key:/etc/shadow"):
        denied = as_user(host, "alice", "set", web, "-p", assignment)
        assert denied.returncode == 6, denied
    assert host.run(["cat", f"/etc/pymachine/{web}.machine"]).stdout == text
    assert "Wants" not in host.run(["cat", f"/etc/pymachine/{db}.machine"]).stdout
    host.pymachine("start", web)  # starts db first, as create's Requires= would
    assert active(host, f"pymachine-{db}.service") == "active"
    assert (
        host.run(
            ["systemctl", "show", "-p", "WatchdogUSec", f"pymachine-{web}.service"]
        ).stdout.strip()
        == "WatchdogUSec=30s"
    )
    host.pymachine("stop", web, db)


def test_image_jobs_bootstrap_and_import_for_the_group_with_progress(host):
    try:
        out = as_user(host, "alice", "bootstrap", "--distro", "busybox", "alicebox")
        assert out.returncode == 0, out
        assert "ready" in out.stderr  # the builder's own progress lines, relayed by the job
        assert host.run(["test", "-x", "/var/lib/machines/alicebox/bin/busybox"]).returncode == 0
        again = as_user(host, "alice", "bootstrap", "--distro", "busybox", "alicebox")
        assert again.returncode == 5 and "pymachine:" in again.stderr, again
        host.run(
            "tar -C /var/lib/machines/alicebox -cf /home/alice/box.tar . && chown alice /home/alice/box.tar"
        )
        out = as_user(host, "alice", "import-tar", "/home/alice/box.tar", "alicebox2")
        assert out.returncode == 0, out
        assert host.run(["test", "-x", "/var/lib/machines/alicebox2/bin/busybox"]).returncode == 0
        denied = as_user(host, "bob", "image", "remove", "alicebox2")
        assert denied.returncode == 6, denied
        assert as_user(host, "alice", "image", "remove", "alicebox", "alicebox2").returncode == 0
        assert host.run(["test", "-e", "/var/lib/machines/alicebox"], check=False).returncode
    finally:
        host.run(["rm", "-rf", "/var/lib/machines/alicebox", "/var/lib/machines/alicebox2"])


WATCH = """
import asyncio, subprocess, sys
from dbus_next import BusType, Message
from dbus_next.aio import MessageBus

async def main(name):
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    reply = await bus.call(Message(destination="org.pymachine.machine1", path="/org/pymachine/machine1",
        interface="org.pymachine.machine1.Manager", member="GetMachine", signature="s", body=[name]))
    path = reply.body[0]
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=[f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'"]))
    changed = asyncio.get_running_loop().create_future()
    def handler(msg):
        if msg.path == path and msg.member == "PropertiesChanged" and not changed.done():
            changed.set_result(msg.body[2])
    bus.add_message_handler(handler)
    subprocess.run(["systemctl", "stop", f"pymachine-{name}.service"], check=True)
    print(" ".join(await asyncio.wait_for(changed, 60)))

asyncio.run(main(sys.argv[1]))
"""


def test_a_stop_by_systemctl_is_a_propertieschanged_of_the_machine(host):
    name = make(host, "watch1")
    out = host.run([sys.executable, "-c", WATCH, name], timeout=90)
    assert "State" in out.stdout.split(), out
    assert 's "stopped"' in host.run(
        ["busctl", "get-property", "org.pymachine.machine1", f"/org/pymachine/machine1/machine/{name}",
         "org.pymachine.machine1.Machine", "State"]
    ).stdout  # fmt: skip


def test_verbs_outside_the_api_refuse_a_user_in_one_line(host):
    name = make(host, "outside1")
    for args in (["run", name], ["copy-to", name, "/etc", "/x"], ["install-units"]):
        out = as_user(host, "alice", *args)
        assert out.returncode in (1, 6) and out.stderr.count("\n") == 1, (args, out)
        assert "Traceback" not in out.stderr and "root" in out.stderr, (args, out)


def test_an_image_is_an_object_with_properties(host):
    out = host.run(
        ["busctl", "call", "org.pymachine.machine1", "/org/pymachine/machine1",
         "org.pymachine.machine1.Manager", "GetImage", "s", "tiny"]
    ).stdout  # fmt: skip
    assert out.strip() == 'o "/org/pymachine/machine1/image/tiny"'
    size = host.run(
        ["busctl", "get-property", "org.pymachine.machine1", "/org/pymachine/machine1/image/tiny",
         "org.pymachine.machine1.Image", "Size"]
    ).stdout.split()  # fmt: skip
    assert size[0] == "t" and int(size[1]) > 0
    missing = host.run(
        ["busctl", "call", "org.pymachine.machine1", "/org/pymachine/machine1",
         "org.pymachine.machine1.Manager", "GetImage", "s", "nope"], check=False
    )  # fmt: skip
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_a_stop_longer_than_sd_bus_default_timeout_is_waited_for(host):
    """StopTimeoutSec=40 and a payload that ignores SIGTERM: the stop takes ~40 s,
    beyond sd-bus's default 25 s for a call's answer."""
    name = "slowstop1"
    host.pymachine(
        "create", name, "--image", "tiny", "--network", "none", "--stop-timeout", "40",
        "--", "/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done",
    )  # fmt: skip
    host.pymachine("start", name)
    out = host.pymachine("stop", name, check=False, timeout=120)
    assert out.returncode == 0, out
    assert active(host, f"pymachine-{name}.service") != "active"


def _job_script(then: str) -> str:
    """import-tar from a pipe that stays open (the job waits), THEN once it runs."""
    return (
        "rm -f /run/tarpipe; mkfifo /run/tarpipe; exec 3<>/run/tarpipe; "
        f"{' '.join(PYMACHINE)} import-tar - pipeimg < /run/tarpipe 2>/run/job.err & pid=$!; "
        "until busctl call org.pymachine.machine1 /org/pymachine/machine1 "
        "org.pymachine.machine1.Manager ListJobs 2>/dev/null | grep -q pipeimg; do sleep 0.1; done; "
        f"{then}; wait $pid; echo rc=$?; exec 3>&-; cat /run/job.err"
    )


def test_a_signal_to_the_client_cancels_its_job_and_nothing_is_left(host):
    out = host.run(["bash", "-c", _job_script("kill -TERM $pid")], timeout=60).stdout
    assert "rc=0" not in out and "rc=" in out, out
    leftovers = host.run("ls -A /var/lib/machines | grep pipeimg || true").stdout
    assert leftovers == "", leftovers
    assert "pipeimg" not in host.run(["busctl", "call", "org.pymachine.machine1",
        "/org/pymachine/machine1", "org.pymachine.machine1.Manager", "ListJobs"]).stdout  # fmt: skip


def test_a_client_says_so_when_pymachined_goes_away_during_its_job(host):
    out = host.run(
        ["bash", "-c", _job_script("systemctl kill -s KILL pymachined.service")], timeout=60
    ).stdout
    assert "rc=1" in out and "pymachined went away" in out, out


def test_the_group_copies_its_own_files_in_and_out_and_nothing_else(host):
    name = make(host, "copy1")
    host.run(
        "echo alice-data > /home/alice/note && chown alice /home/alice/note && chmod 4755 /home/alice/note"
    )
    out = as_user(host, "alice", "copy-to", name, "/home/alice/note", "/note")
    assert out.returncode == 0, out
    inside = host.pymachine("exec", name, "--", "/bin/sh", "-c", "cat /note; stat -c '%u %a' /note")
    assert inside.stdout.split() == ["alice-data", "0", "755"]  # the machine's root's; no set-ID
    host.pymachine("exec", name, "--", "/bin/sh", "-c", "echo from-inside > /out")
    out = as_user(host, "alice", "copy-from", name, "/out", "/home/alice/out")
    assert out.returncode == 0, out
    copied = host.run("cat /home/alice/out; stat -c %U /home/alice/out").stdout.split()
    assert copied == ["from-inside", "alice"]
    # what alice may not read stays out; what does not exist leaves her file as it was
    secret = as_user(host, "alice", "copy-to", name, "/etc/shadow", "/shadow")
    assert secret.returncode != 0 and secret.stderr.count("\n") == 1, secret
    assert host.pymachine("exec", name, "--", "test", "-e", "/shadow", check=False).returncode
    missing = as_user(host, "alice", "copy-from", name, "/nope", "/home/alice/out")
    assert missing.returncode == 4 and missing.stderr.count("\n") == 1, missing
    assert host.run(["cat", "/home/alice/out"]).stdout.strip() == "from-inside"
    assert as_user(host, "bob", "copy-from", name, "/out", "/tmp/bob-out").returncode == 6
