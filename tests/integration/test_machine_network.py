"""Machines on a bridge, through pymachine, in a systemd host with a network of
its own (issue 5, issue 9 items 1–2). Traffic stays inside namespaces these tests
made: the host's private netns, the machines', and an "outside" netns."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.harness.systemd_host import SystemdHost, private_network_host

PM = [sys.executable, "-m", "machined"]
WEB = "echo hi-from-$(hostname) > /index.html; exec httpd -f -p 80 -h /"
SLEEP = "while :; do sleep 1; done"


@pytest.fixture(scope="module", params=["pymachined", "no-daemon"])
def net_host(request, tmp_path_factory) -> SystemdHost:
    """Every test twice: with pymachined installed (it sets up and removes the
    machines' network) and without it (the runtime does it itself)."""
    from tests.harness import require_tier1

    require_tier1()
    with private_network_host(tmp_path_factory.mktemp("net-host"), "pymnet") as host:
        if request.param == "pymachined":
            host.run("chmod 711 /root")  # the test run's interpreter may live under /root
            host.pymachine("install-units")
        host.pymachine("bootstrap", "--distro", "busybox", "tiny")
        # The "outside world": a namespace on a veth of its own, documentation addresses.
        host.run(
            "ip netns add outside && ip link add uplink type veth peer name eth0 netns outside && "
            "ip addr add 192.0.2.1/24 dev uplink && ip link set uplink up && "
            "ip -n outside addr add 192.0.2.2/24 dev eth0 && ip -n outside link set eth0 up && "
            "ip -n outside link set lo up && ip -n outside route add default via 192.0.2.1"
        )
        yield host


def create(host, name: str, script: str, *flags: str) -> None:
    host.pymachine("create", name, "--image", "tiny", *flags, "--", "/bin/sh", "-c", script)


def inside(host, name: str, script: str, check: bool = True):
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script, check=check)


def fetch(host, url: str, netns: str | None = None, check: bool = True):
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return host.run([*prefix, "timeout", "10", "busybox", "wget", "-qO-", url], check=check)


def address(host, name: str) -> str:
    machines = {m["name"]: m for m in json.loads(host.pymachine("list", "--json").stdout)}
    return machines[name]["address"]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_machines_reach_each_other_and_the_host_reaches_them(net_host):
    create(net_host, "web1", WEB)
    create(net_host, "cli1", SLEEP)
    net_host.pymachine("start", "web1", "cli1")
    try:
        web_address = address(net_host, "web1")
        assert web_address.startswith("10.")
        assert inside(net_host, "cli1", f"ping -c1 -W2 {web_address}").returncode == 0
        page = inside(net_host, "cli1", f"wget -qO- http://{web_address}/index.html").stdout
        assert page == "hi-from-web1\n"
        assert fetch(net_host, f"http://{web_address}/index.html").stdout == "hi-from-web1\n"
        assert inside(net_host, "cli1", "ip -o addr show host0").stdout.count("inet") >= 1
        # By name through /etc/hosts (busybox-static cannot resolve names itself: no NSS)
        assert f"{web_address}\tweb1" in inside(net_host, "cli1", "cat /etc/hosts").stdout.split(
            "\n"
        )
        status = net_host.run(["machinectl", "status", "web1"]).stdout
        assert web_address in status  # RegisterMachineWithNetwork: machined sees the address
    finally:
        net_host.pymachine("stop", "web1", "cli1")


def test_port_forward_from_outside_and_from_the_hosts_localhost(net_host):
    create(net_host, "web2", WEB, "--port", "tcp:8080:80")
    net_host.pymachine("start", "web2")
    try:
        # `start` returns once the machine runs, not once its httpd listens
        # (readiness is Notify='s job): wait for the server, then test the ways in.
        assert wait_until(
            lambda: fetch(net_host, f"http://{address(net_host, 'web2')}/index.html",
                          check=False).returncode == 0
        )  # fmt: skip
        assert (
            fetch(net_host, "http://192.0.2.1:8080/index.html", netns="outside").stdout
            == "hi-from-web2\n"
        )
        assert fetch(net_host, "http://127.0.0.1:8080/index.html").stdout == "hi-from-web2\n"
        # [::1] through the socket-activated proxy (nftables cannot DNAT it)
        proxy = net_host.run(
            ["systemctl", "is-active", "pymachine-web2-port8080.socket"], check=False
        )
        assert proxy.stdout.strip() == "active", net_host.journal("pymachine-web2.service")
        assert fetch(net_host, "http://[::1]:8080/index.html").stdout == "hi-from-web2\n"
        rules = net_host.run(["nft", "list", "table", "inet", "pymachine"]).stdout
        assert "pymachine:web2:tcp:8080:80" in rules
        # its proxy's units (pymachine-web2-port8080.*) are not a machine of their own
        listed = [m["name"] for m in json.loads(net_host.pymachine("list", "--json").stdout)]
        assert "web2" in listed and not [n for n in listed if n.startswith("web2-port")], listed
    finally:
        net_host.pymachine("stop", "web2")
    rules = net_host.run(["nft", "list", "table", "inet", "pymachine"]).stdout
    assert "pymachine:web2" not in rules, net_host.journal("pymachine-web2.service")
    assert (
        fetch(net_host, "http://192.0.2.1:8080/index.html", netns="outside", check=False).returncode
        != 0
    )
    assert fetch(net_host, "http://[::1]:8080/index.html", check=False).returncode != 0
    units = net_host.run(
        ["systemctl", "list-units", "--all", "--no-legend", "pymachine-web2-*"]
    ).stdout
    assert units.strip() == ""  # the [::1] proxy went with the machine


def test_outbound_traffic_is_masqueraded(net_host):
    create(net_host, "out1", SLEEP)
    net_host.pymachine("start", "out1")
    accept_once = (
        "import socket; s = socket.socket(); s.bind(('192.0.2.2', 9000)); s.listen(); "
        "c, peer = s.accept(); print(peer[0], c.recv(100).decode().strip())"
    )
    server = net_host.popen(
        ["ip", "netns", "exec", "outside", sys.executable, "-c", accept_once], stdout=-1, text=True
    )
    try:
        time.sleep(0.5)
        inside(net_host, "out1", "echo hello-outside | nc 192.0.2.2 9000", check=False)
        out, _ = server.communicate(timeout=10)
        # The outside world sees the host's address on its link, not the machine's.
        assert out.split() == ["192.0.2.1", "hello-outside"]
    finally:
        server.kill()
        net_host.pymachine("stop", "out1")


def test_host_mode_shares_the_hosts_links(net_host):
    create(net_host, "hostnet", SLEEP, "--network", "host")
    net_host.pymachine("start", "hostnet")
    try:
        host_links = sorted(net_host.run("ls /sys/class/net").stdout.split())
        assert sorted(inside(net_host, "hostnet", "ls /sys/class/net").stdout.split()) == host_links
        assert address(net_host, "hostnet") is None
    finally:
        net_host.pymachine("stop", "hostnet")


def test_ten_machines_started_at_once_get_distinct_addresses(net_host):
    names = [f"many{i}" for i in range(10)]
    for name in names:
        create(net_host, name, SLEEP)
    script = " ".join(f"{' '.join(PM)} start {name} &" for name in names) + " wait"
    net_host.run(["/bin/sh", "-c", script], timeout=300)
    try:
        addresses = [address(net_host, name) for name in names]
        assert all(addresses) and len(set(addresses)) == 10
        before = addresses[0]
        net_host.pymachine("restart", names[0])
        assert address(net_host, names[0]) == before  # a machine keeps its address
    finally:
        net_host.pymachine("stop", *names)
    links = net_host.run(["ip", "-o", "link"]).stdout
    assert "vm-many" not in links
    assert (
        "pymachine:many" not in net_host.run(["nft", "list", "table", "inet", "pymachine"]).stdout
    )


def test_sigkilled_runtime_leaves_nothing_after_gc_and_restarts(net_host):
    create(net_host, "crash1", SLEEP, "--port", "tcp:8181:80")
    net_host.pymachine("start", "crash1")
    main_pid = net_host.run(
        ["systemctl", "show", "-P", "MainPID", "pymachine-crash1.service"]
    ).stdout.strip()
    net_host.run(["kill", "-9", main_pid])
    assert wait_until(
        lambda: (
            net_host.run(
                ["systemctl", "is-active", "pymachine-crash1.service"], check=False
            ).stdout.strip()
            in ("failed", "inactive")
        )
    )
    net_host.pymachine("gc")
    assert (
        "pymachine:crash1" not in net_host.run(["nft", "list", "table", "inet", "pymachine"]).stdout
    )
    assert "crash1" not in net_host.run(["ip", "-o", "link"]).stdout
    assert "crash1" not in net_host.run(["machinectl", "list", "--no-legend"]).stdout
    net_host.pymachine("start", "crash1")
    rules = net_host.run(["nft", "list", "table", "inet", "pymachine"]).stdout
    assert (
        rules.count("pymachine:crash1:tcp:8181:80") == 2
    )  # one IPv4 and one IPv6 rule, not doubled
    net_host.pymachine("stop", "crash1")


def test_a_bridged_machine_without_ports_stops_with_no_clean_up_and_restarts_at_once(net_host):
    """No port forwards: no nft rules of its own, so no ExecStopPost= (a control
    process) at stop. systemd removes the record with the runtime directory, the
    kernel the veth with the namespace (asynchronously: a start right after a
    stop deletes the old one first) and the next start gets its address back."""
    name = "noports"
    create(net_host, name, SLEEP)
    try:
        net_host.pymachine("start", name)
        first = address(net_host, name)
        unit = f"pymachine-{name}.service"
        stop_post = net_host.run(["systemctl", "show", "-p", "ExecStopPost", unit]).stdout
        assert stop_post.strip() in ("", "ExecStopPost="), stop_post  # none (shown as nothing)
        for _ in range(5):
            net_host.pymachine("stop", name)
            gone = net_host.run(["test", "-e", f"/run/pymachine/{name}"], check=False)
            assert gone.returncode != 0  # the record too: RuntimeDirectory=
            net_host.pymachine("start", name)  # the old veth may still be there
            assert address(net_host, name) == first
            assert inside(net_host, name, "ip -4 addr show host0").stdout.count(first) == 1
    finally:
        net_host.pymachine("stop", name, check=False)
        net_host.pymachine("remove", name)
    assert wait_until(lambda: "vm-noports" not in net_host.run(["ip", "-o", "link"]).stdout)


def test_machines_resolve_each_other_by_name_through_the_bridges_dnsmasq(net_host):
    """busybox-static has no NSS: its nslookup asks the name server in
    resolv.conf, the bridge's dnsmasq, which answers NAME and NAME.machine for
    every machine on the bridge, one started later included (inotify)."""
    from tests.harness import skip_or_fail

    if net_host.run(["test", "-x", "/usr/sbin/dnsmasq"], check=False).returncode:
        skip_or_fail("dnsmasq is not installed (apt-get install dnsmasq-base)")
    create(net_host, "dns1", SLEEP)
    create(net_host, "dns2", SLEEP)
    create(net_host, "dns3", SLEEP)
    net_host.pymachine("start", "dns1", "dns2")
    try:
        gateway = address(net_host, "dns1").rsplit(".", 1)[0] + ".1"
        resolv = inside(net_host, "dns1", "cat /etc/resolv.conf").stdout
        assert f"nameserver {gateway}" in resolv.split("\n"), resolv
        unit = net_host.run(["systemctl", "is-active", "pymachine-dns@pymachine0.service"])
        assert unit.stdout.strip() == "active"
        for name in ("dns2", "dns2.machine"):
            answer = inside(net_host, "dns1", f"nslookup {name}", check=False)
            assert address(net_host, "dns2") in answer.stdout, (
                answer,
                net_host.journal("pymachine-dns@pymachine0.service"),
            )
        net_host.pymachine("start", "dns3")  # a new lease: dnsmasq re-reads its hosts file
        assert wait_until(
            lambda: (
                address(net_host, "dns3")
                in inside(net_host, "dns1", "nslookup dns3.machine", check=False).stdout
            )
        )
        # Not in /etc/hosts (which lists plain names): the answer came from dnsmasq
        assert "dns3.machine" not in inside(net_host, "dns1", "cat /etc/hosts").stdout
        # An unknown .machine name is not forwarded: NXDOMAIN at once
        assert inside(net_host, "dns1", "nslookup nosuch.machine", check=False).returncode != 0
        # Not reachable from the outside world: dnsmasq listens on the bridge only
        listening = net_host.run(["ss", "-ulnp"]).stdout
        assert "0.0.0.0:53 " not in listening and "*:53 " not in listening, listening
        assert f"{gateway}:53 " in listening, listening
        users = net_host.run(["ps", "-o", "user=", "-C", "dnsmasq"]).stdout.split()
        assert users and set(users) == {"nobody"}, users  # root dropped once bound
    finally:
        net_host.pymachine("stop", "dns1", "dns2", "dns3")
    net_host.pymachine("remove", "dns3")  # its lease goes, and its name with it
    net_host.pymachine("start", "dns1")
    try:
        assert wait_until(
            lambda: inside(net_host, "dns1", "nslookup dns3.machine", check=False).returncode != 0
        )
    finally:
        net_host.pymachine("stop", "dns1")


def test_a_debian_machine_resolves_the_others_through_nss(net_host, systemd_host, debian_image):
    """glibc's resolver (getent: nsswitch's files, then dns) finds NAME.machine,
    which only the bridge's dnsmasq knows, and a busybox machine finds the
    Debian machine back."""
    import shutil
    import subprocess

    from tests.harness import skip_or_fail

    if net_host.run(["test", "-x", "/usr/sbin/dnsmasq"], check=False).returncode:
        skip_or_fail("dnsmasq is not installed (apt-get install dnsmasq-base)")
    source = systemd_host.binds["/var/lib/machines"] / debian_image
    copy = net_host.binds["/var/lib/machines"] / debian_image
    if not copy.exists():
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(copy)], check=True)
    net_host.pymachine(
        "create", "deb1", "--image", debian_image, "--", "/bin/sh", "-c", "exec sleep infinity"
    )
    create(net_host, "bb1", SLEEP)
    net_host.pymachine("start", "deb1", "bb1")
    try:
        answer = inside(net_host, "deb1", "getent ahostsv4 bb1.machine", check=False)
        assert answer.stdout.split()[0] == address(net_host, "bb1"), answer
        answer = inside(net_host, "deb1", "getent hosts bb1.machine", check=False)
        assert answer.stdout.split()[1:] == ["bb1.machine"], answer  # IPv6 first (ULA)
        answer = inside(net_host, "bb1", "nslookup deb1", check=False)
        assert address(net_host, "deb1") in answer.stdout, answer
    finally:
        net_host.pymachine("stop", "deb1", "bb1")
        net_host.pymachine("remove", "deb1", "bb1")
        shutil.rmtree(copy, ignore_errors=True)


def test_the_bridges_dnsmasq_forwards_other_names_to_the_hosts_resolvers(net_host):
    """A name that is no machine's goes to the host's resolver: here a dnsmasq
    in the "outside" namespace that knows example.test, named by the test
    host's /etc/resolv.conf (a bind mount in the test host's mount namespace)."""
    from tests.harness import skip_or_fail

    if net_host.run(["test", "-x", "/usr/sbin/dnsmasq"], check=False).returncode:
        skip_or_fail("dnsmasq is not installed (apt-get install dnsmasq-base)")
    net_host.run(
        "ip netns exec outside /usr/sbin/dnsmasq --conf-file=/dev/null --no-resolv --no-hosts "
        "--listen-address=192.0.2.2 --bind-interfaces --address=/example.test/192.0.2.77 "
        "--pid-file=/run/upstream-dns.pid --user=nobody"
    )
    net_host.run(
        "echo nameserver 192.0.2.2 > /run/resolv.test && mount --bind /run/resolv.test /etc/resolv.conf"
    )
    # dnsmasq follows its resolv.conf through inotify, which a bind mount does
    # not trigger: stopped here, it is started again by the next machine's start
    net_host.run(["systemctl", "stop", "pymachine-dns@pymachine0.service"])
    create(net_host, "fwd1", SLEEP)
    try:
        net_host.pymachine("start", "fwd1")
        answer = inside(net_host, "fwd1", "nslookup www.example.test", check=False)
        assert "192.0.2.77" in answer.stdout, (
            answer,
            net_host.journal("pymachine-dns@pymachine0.service"),
        )
        assert "192.0.2.2" not in inside(net_host, "fwd1", "cat /etc/resolv.conf").stdout
    finally:
        net_host.pymachine("stop", "fwd1", check=False)
        net_host.run("umount /etc/resolv.conf", check=False)
        net_host.run("kill $(cat /run/upstream-dns.pid)", check=False)
