"""pymachined owns a stopped machine's network (issue 19): with the daemon
installed, a bridged machine's unit has no ExecStopPost=, and whatever stops
it — systemctl, machinectl, a SIGKILLed PID 1 — its port-forward rules, veth
and [::1] proxies go; what machines left while the daemon was not running goes
at its next activation. In a systemd host with a network of its own."""

from __future__ import annotations

import json
import sys

import pytest

from tests.harness.systemd_host import SystemdHost, private_network_host
from tests.integration.test_machine_network import SLEEP, address, inside, wait_until

PM = [sys.executable, "-m", "machined"]


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> SystemdHost:
    from tests.harness import require_tier1

    require_tier1()
    with private_network_host(tmp_path_factory.mktemp("netd-host"), "pymnetd") as h:
        h.run("chmod 711 /root")  # the test run's interpreter may live under /root
        h.pymachine("install-units")
        h.pymachine("bootstrap", "--distro", "busybox", "tiny")
        yield h


def rules(host: SystemdHost) -> str:
    return host.run(["nft", "list", "table", "inet", "pymachine"], check=False).stdout


def links(host: SystemdHost) -> set[str]:
    """The host's interface names (``ip -o link`` shows a veth as ``vm-web@if2:``)."""
    lines = host.run(["ip", "-o", "link"]).stdout.splitlines()
    return {line.split(": ", 2)[1].split("@", 1)[0] for line in lines}


def proxies(host: SystemdHost, name: str) -> str:
    return host.run(
        ["systemctl", "list-units", "--all", "--no-legend", f"pymachine-{name}-port*"]
    ).stdout.strip()


def left_nothing(host: SystemdHost, name: str) -> bool:
    return (
        f"pymachine:{name}:" not in rules(host)
        and f"vm-{name}" not in links(host)
        and proxies(host, name) == ""
    )


def make(host: SystemdHost, name: str, port: int) -> None:
    host.pymachine(
        "create", name, "--image", "tiny", "--port", f"tcp:{port}:80",
        "--", "/bin/sh", "-c", SLEEP,
    )  # fmt: skip


def daemon_pid(host: SystemdHost) -> str:
    return host.run(["systemctl", "show", "-P", "MainPID", "pymachined.service"]).stdout.strip()


@pytest.mark.parametrize(
    "how",
    [
        ["systemctl", "stop", "pymachine-{name}.service"],
        ["machinectl", "terminate", "{name}"],
        ["systemctl", "kill", "-s", "KILL", "--kill-whom=main", "pymachine-{name}.service"],
    ],
    ids=["systemctl-stop", "machinectl-terminate", "kill-9-pid1"],
)
def test_whatever_stops_a_machine_the_daemon_removes_its_rules_veth_and_proxies(host, how):
    name = {"systemctl": "st", "machinectl": "mt"}.get(how[0], "k9") + "web"
    make(host, name, {"st": 8301, "mt": 8302, "k9": 8303}[name[:2]])
    try:
        host.pymachine("start", name)
        unit = f"pymachine-{name}.service"
        stop_post = host.run(["systemctl", "show", "-p", "ExecStopPost", unit]).stdout
        assert stop_post.strip() in ("", "ExecStopPost="), stop_post  # no clean-up process
        assert f"pymachine:{name}:tcp" in rules(host)
        assert proxies(host, name) != ""
        assert daemon_pid(host) not in ("", "0")  # the runtime activated the daemon
        host.run([part.format(name=name) for part in how])
        assert wait_until(lambda: left_nothing(host, name), timeout=5), (
            rules(host),
            host.journal("pymachined.service"),
        )
        host.pymachine("start", name)  # and it starts again with its address and its rule
        assert rules(host).count(f"pymachine:{name}:tcp") == 2  # IPv4 and IPv6, not doubled
    finally:
        host.pymachine("stop", name, check=False)
        host.pymachine("remove", name)


def test_the_daemon_reconciles_what_machines_left_while_it_was_not_running(host):
    names = [f"rec{i}" for i in range(10)]
    for i, name in enumerate(names):
        make(host, name, 8400 + i)
    script = " ".join(f"{' '.join(PM)} start {name} &" for name in names) + " wait"
    host.run(["/bin/sh", "-c", script], timeout=300)
    stopped, running = names[:5], names[5:]
    try:
        host.run(["systemctl", "kill", "-s", "KILL", "pymachined.service"])
        assert wait_until(lambda: daemon_pid(host) == "0")
        host.run(["systemctl", "stop", *(f"pymachine-{n}.service" for n in stopped)])
        # nobody was there to clean up: the stopped machines' rules are still there
        assert all(f"pymachine:{n}:tcp" in rules(host) for n in stopped), rules(host)
        host.run(  # a call re-activates the daemon, which reconciles at its start
            ["busctl", "call", "org.pymachine.machine1", "/org/pymachine/machine1",
             "org.pymachine.machine1.Manager", "ListMachines"]
        )  # fmt: skip
        assert wait_until(lambda: all(left_nothing(host, n) for n in stopped), timeout=10), (
            rules(host),
            host.journal("pymachined.service"),
        )
        table = rules(host)
        for name in running:
            assert table.count(f"pymachine:{name}:tcp") == 2, table
            assert f"vm-{name}" in links(host)
    finally:
        host.pymachine("stop", *running)
        host.pymachine("remove", *names)


def test_twenty_machines_started_at_once_get_distinct_addresses_and_reach_each_other_by_name(host):
    names = [f"crowd{i}" for i in range(20)]
    for name in names:
        host.pymachine("create", name, "--image", "tiny", "--", "/bin/sh", "-c", SLEEP)
    script = " ".join(f"{' '.join(PM)} start {name} &" for name in names) + " wait"
    host.run(["/bin/sh", "-c", script], timeout=600)
    try:
        listed = {m["name"]: m for m in json.loads(host.pymachine("list", "--json").stdout)}
        addresses = [listed[name]["address"] for name in names]
        assert all(addresses) and len(set(addresses)) == 20, addresses
        for name in names:  # every machine finds every other by name, and reaches it
            others = " ".join(f"{other}.machine" for other in names if other != name)
            script = (
                f"for n in {others}; do ping -c1 -W2 $n >/dev/null || echo unreachable $n; done"
            )
            assert inside(host, name, script).stdout == "", name
        assert address(host, "crowd0") == addresses[0]
    finally:
        host.pymachine("stop", *names)
        host.pymachine("remove", *names)


def test_a_dotted_machine_name_resolves_with_the_machine_domain_too(host):
    """dnsmasq's --expand-hosts adds the domain to names without a dot only:
    web.prod must still answer as web.prod.machine (the hosts file spells it)."""
    host.pymachine("create", "web.prod", "--image", "tiny", "--", "/bin/sh", "-c", SLEEP)
    host.pymachine("create", "asker", "--image", "tiny", "--", "/bin/sh", "-c", SLEEP)
    host.pymachine("start", "web.prod", "asker")
    try:
        for name in ("web.prod", "web.prod.machine"):
            answer = inside(host, "asker", f"nslookup {name}", check=False)
            assert address(host, "web.prod") in answer.stdout, (name, answer)
    finally:
        host.pymachine("stop", "web.prod", "asker")
        host.pymachine("remove", "web.prod", "asker")


def setup_call(host: SystemdHost, name: str, pid: str, *, user: str | None = None):
    argv = ["busctl", "call", "org.pymachine.machine1", "/org/pymachine/machine1",
            "org.pymachine.machine1.Manager", "SetUpNetwork", "su", name, pid]  # fmt: skip
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", *argv]
    return host.run(argv, check=False)


def test_only_a_machines_own_runtime_can_have_its_network_set_up(host):
    """SetUpNetwork configures the network namespace of the PID it is given:
    a user that is not root is refused, and root is refused a PID outside the
    machine's unit (the host's PID 1, another machine's PID 1); nothing is made."""
    make(host, "victim", 8501)
    make(host, "other", 8502)
    host.pymachine("start", "other")
    try:
        table, before = rules(host), links(host)
        refused = setup_call(host, "victim", "1", user="nobody")
        assert refused.returncode != 0 and "access denied" in refused.stderr, refused.stderr
        for pid in ("1", daemon_pid(host)):  # the host's own network namespace
            refused = setup_call(host, "victim", pid)
            assert refused.returncode != 0, refused
            assert "not in the unit of machine 'victim'" in refused.stderr, refused.stderr
        status = json.loads(host.pymachine("status", "other", "--json").stdout)
        other_pid = (status[0] if isinstance(status, list) else status)["leader"]
        refused = setup_call(host, "victim", str(other_pid))  # another machine's namespace
        assert "not in the unit of machine 'victim'" in refused.stderr, refused.stderr
        assert rules(host) == table and links(host) == before
        assert "vm-victim" not in links(host)
    finally:
        host.pymachine("stop", "other")
        host.pymachine("remove", "victim", "other")
