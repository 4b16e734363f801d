"""Network pieces that need no root: config parsing, IPAM, names, nft batches, /etc files."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

import machined.network as network
from machined.errors import Conflict, InvalidInput
from machined.network import addresses, dns, etc, nft, state
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths

# --- config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", ("tcp", 8080, 80)),
        ("tcp:8080:80", ("tcp", 8080, 80)),
        ("UDP:53:5353", ("udp", 53, 5353)),
        ("22", ("tcp", 22, 22)),
        ("udp:5000", ("udp", 5000, 5000)),
    ],
)
def test_port_forward_parse(text: str, expected: tuple) -> None:
    port = PortForward.parse(text)
    assert (port.protocol, port.host_port, port.container_port) == expected
    assert PortForward.parse(str(port)) == port


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sctp:1:2", "neither tcp nor udp"),
        ("0:80", "not in 1…65535"),
        ("8080:70000", "not in 1…65535"),
        ("1:2:3", "expected [tcp|udp:]HOST_PORT"),
        ("tcp:", "expected"),
        ("", "expected"),
        ("tcp:http:80", "not a number"),
    ],
)
def test_port_forward_parse_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("|", r"\|")):
        PortForward.parse(text)


def test_port_forward_str() -> None:
    assert str(PortForward("tcp", 8080, 80)) == "tcp:8080:80"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (NetworkConfig(bridge="a-very-long-bridge"), "at most 15"),
        (NetworkConfig(bridge="bad/name"), "invalid bridge name"),
        (NetworkConfig(bridge=""), "must not be empty"),
        (NetworkConfig(bridge="vm-foo"), "veth names"),
        (NetworkConfig(address="10.1.2"), "invalid address"),
        (NetworkConfig(address="127.0.0.5"), "not a unicast"),
        (
            NetworkConfig(ports=[PortForward.parse("8080:80"), PortForward.parse("tcp:8080:81")]),
            "duplicate host port tcp:8080",
        ),
        (
            NetworkConfig(mode=NetworkMode.HOST, ports=[PortForward.parse("80")]),
            "needs Mode=bridge",
        ),
        (NetworkConfig(mode=NetworkMode.NONE, address="10.0.0.2"), "needs Mode=bridge"),
        (NetworkConfig(mode="bogus"), "invalid network mode"),
    ],
)
def test_network_config_validate_errors(config: NetworkConfig, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        config.validate()


def test_network_config_valid() -> None:
    NetworkConfig().validate()
    NetworkConfig(mode=NetworkMode.NONE).validate()
    cfg = NetworkConfig(
        bridge="br-lab.1",
        address="10.219.0.9",
        ports=[PortForward.parse("80"), PortForward.parse("udp:80")],
    )
    cfg.validate()
    assert cfg.fixed_address() == ipaddress.IPv4Address("10.219.0.9")


def test_config_module_is_light() -> None:
    """The definition imports ``machined.network.config`` for every CLI call and
    start: the package's lazy ``__getattr__`` must keep the lifecycle (leases,
    dataclasses) and the kernel-facing modules out of it."""
    heavy = [
        "machined.network.lifecycle",
        "machined.network.addresses",
        "machined.network.links",
        "machined.network.rtnl",
        "machined.network.nft",
        "machined.network.sysctl",
        "jinja2",
    ]
    code = (
        "import sys, machined.network.config, machined.network; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.strip() == "[]"


# --- names ----------------------------------------------------------------------


def test_host_ifname() -> None:
    assert state.host_ifname("web") == "vm-web"
    assert state.host_ifname("a" * 12) == "vm-" + "a" * 12
    long1, long2 = state.host_ifname("a" * 13), state.host_ifname("a" * 12 + "b")
    assert long1.startswith("vh-") and len(long1) == 15 and long1 != long2


def test_mac_address_is_stable_local_unicast() -> None:
    mac = state.mac_address("machine:web")
    assert mac == state.mac_address("machine:web") != state.mac_address("machine:db")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01


def test_names_and_macs_are_those_of_earlier_releases() -> None:
    """The hash is CPython's SHA-256, not OpenSSL's: the same values, so a
    machine keeps its MAC and veth name across the change (values of 0.1.0)."""
    assert state.mac_address("web") == "ce:31:a7:d9:02:2f"
    assert state.host_ifname("a" * 20) == "vh-42492da06234"


# --- IPAM -----------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path)


def test_default_bridge_subnet_avoids_host_routes(paths: Paths) -> None:
    with addresses.locked(paths):
        net = addresses.bridge_network(
            paths, "pymachine0", avoid=lambda: [ipaddress.IPv4Network("10.219.0.0/23")]
        )
    assert net.subnet == ipaddress.IPv4Network("10.219.2.0/24")
    assert net.gateway == ipaddress.IPv4Address("10.219.2.1")
    assert net.subnet6 is not None and net.subnet6.prefixlen == 64
    assert net.subnet6.network_address.packed[0] == 0xFD
    # recorded: the same answer next time, without asking what to avoid
    with addresses.locked(paths):
        again = addresses.bridge_network(paths, "pymachine0", avoid=lambda: 1 / 0)
    assert again == net
    # a second bridge gets another /24 and another /64
    with addresses.locked(paths):
        other = addresses.bridge_network(paths, "lab0")
    assert not other.subnet.overlaps(net.subnet) and other.subnet6 != net.subnet6


def test_bridges_json_configures_subnets(paths: Paths) -> None:
    netdir = addresses.network_dir(paths)
    netdir.mkdir(parents=True)
    (netdir / "bridges.json").write_text(
        json.dumps(
            {
                "pool": "172.30.100.0/22",
                "prefix": 26,
                "bridges": {"fixed0": {"subnet": "192.168.240.0/24", "ipv6": False}},
            }
        )
    )
    with addresses.locked(paths):
        fixed = addresses.bridge_network(paths, "fixed0")
        pooled = addresses.bridge_network(paths, "pooled0")
    assert fixed.subnet == ipaddress.IPv4Network("192.168.240.0/24") and fixed.subnet6 is None
    assert pooled.subnet == ipaddress.IPv4Network("172.30.100.0/26")


def test_bad_bridges_json_is_a_clear_error(paths: Paths) -> None:
    netdir = addresses.network_dir(paths)
    netdir.mkdir(parents=True)
    (netdir / "bridges.json").write_text(json.dumps({"bridges": {"b0": {"subnet": "10.1.2.3/24"}}}))
    with addresses.locked(paths), pytest.raises(InvalidInput, match="invalid IPv4 subnet"):
        addresses.bridge_network(paths, "b0")


def _net(paths: Paths) -> addresses.BridgeNet:
    return addresses.BridgeNet(
        "b0", ipaddress.IPv4Network("10.5.0.0/29"), ipaddress.IPv6Network("fd00:1::/64")
    )


def test_allocate_keeps_and_releases(paths: Paths) -> None:
    net = _net(paths)
    with addresses.locked(paths):
        a, new_a = addresses.allocate(paths, "a", net)
        b, _ = addresses.allocate(paths, "b", net)
        again, new_again = addresses.allocate(paths, "a", net)
    assert (a.address, a.address6, new_a) == ("10.5.0.2/29", "fd00:1::2/64", True)
    assert b.address == "10.5.0.3/29"
    assert again == a and not new_again
    assert network.address_of("a", paths) == "10.5.0.2"
    network.release("a", paths)
    assert network.address_of("a", paths) is None
    with addresses.locked(paths):
        c, _ = addresses.allocate(paths, "c", net)
    assert c.address == "10.5.0.2/29"  # the freed address is reused


def test_allocate_fixed_and_exhaustion(paths: Paths) -> None:
    net = _net(paths)
    with addresses.locked(paths):
        fixed, _ = addresses.allocate(paths, "f", net, ipaddress.IPv4Address("10.5.0.6"))
        assert fixed.address == "10.5.0.6/29"
        with pytest.raises(Conflict, match="already leased to machine 'f'"):
            addresses.allocate(paths, "g", net, ipaddress.IPv4Address("10.5.0.6"))
        with pytest.raises(InvalidInput, match="not a free host address"):
            addresses.allocate(paths, "g", net, ipaddress.IPv4Address("10.5.0.1"))
        with pytest.raises(InvalidInput, match="not a free host address"):
            addresses.allocate(paths, "g", net, ipaddress.IPv4Address("10.6.0.2"))
        for name in "abcd":  # .2 .3 .4 .5
            addresses.allocate(paths, name, net)
        with pytest.raises(Conflict, match="no free address"):
            addresses.allocate(paths, "e", net)


def _allocate_in_process(root: str, name: str, queue) -> None:
    p = Paths(Path(root))
    net = _net(p)
    net = addresses.BridgeNet("b0", ipaddress.IPv4Network("10.5.0.0/24"), net.subnet6)
    with addresses.locked(p):
        lease, _ = addresses.allocate(p, name, net)
    queue.put(lease.address)


def test_concurrent_allocations_are_distinct(paths: Paths) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_allocate_in_process, args=(str(paths.root), f"m{i}", queue))
        for i in range(10)
    ]
    for p in procs:
        p.start()
    got = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert len(set(got)) == 10
    assert len(addresses.load_leases(paths)) == 10


# --- nft batches ----------------------------------------------------------------


def test_port_rules_are_tagged_per_machine() -> None:
    cmds = nft.port_rules("web", [PortForward.parse("8080:80")], "10.0.0.2", "fd00::2")
    rules = [c["add"]["rule"] for c in cmds]
    assert [r["comment"] for r in rules] == ["pymachine:web:tcp:8080:80"] * 2
    assert rules[0]["expr"][-1] == {"dnat": {"family": "ip", "addr": "10.0.0.2", "port": 80}}
    assert rules[1]["expr"][-1] == {"dnat": {"family": "ip6", "addr": "fd00::2", "port": 80}}
    assert len(nft.port_rules("web", [PortForward.parse("80")], "10.0.0.2", None)) == 1


def test_machine_rules_found_by_comment() -> None:
    listing = [
        {"table": {"name": "pymachine"}},
        {"rule": {"chain": "ports", "handle": 7, "comment": "pymachine:web:tcp:8080:80"}},
        {"rule": {"chain": "ports", "handle": 8, "comment": "pymachine:db:udp:53:53"}},
        {"rule": {"chain": "ports", "handle": 9, "comment": "pymachine:odd"}},
        {"rule": {"chain": "postrouting", "handle": 3}},
    ]
    found = nft.machine_rules(listing)
    assert [(r.machine, r.handle, str(r.port)) for r in found] == [
        ("web", 7, "tcp:8080:80"),
        ("db", 8, "udp:53:53"),
        ("odd", 9, "None"),
    ]


def test_skeleton_rewrites_base_chains_atomically() -> None:
    cmds = nft.skeleton()
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "pymachine"}}}
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert flushed == ["prerouting", "output", "postrouting", "forward", "input"]
    json.dumps(cmds)  # serialisable as is


# --- /etc files -----------------------------------------------------------------


def test_render_etc_files(paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolv = tmp_path / "host-resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch example.org\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    monkeypatch.setattr(etc, "HOST_RESOLV_CONF", resolv)
    monkeypatch.setattr(etc, "RESOLVED_UPSTREAM", upstream)
    net = _net(paths)
    with addresses.locked(paths):
        lease, _ = addresses.allocate(paths, "web", net)
        addresses.allocate(paths, "db", net)
    st = network.NetworkState(
        "vm-web", 5, lease.address, "10.5.0.1", lease.address6, "fd00:1::1", "b0", ("tcp:80:80",)
    )
    dest = tmp_path / "etc"
    network.render_etc_files("web", st, paths, dest)
    hosts = (dest / "hosts").read_text()
    assert "10.5.0.2\tweb\n" in hosts and "10.5.0.3\tdb\n" in hosts
    assert "fd00:1::3\tdb\n" in hosts and "10.5.0.1\t_gateway\n" in hosts
    assert "127.0.0.1\tlocalhost\n" in hosts
    text = (dest / "resolv.conf").read_text()
    if dns.dnsmasq() is not None:  # the bridge's dnsmasq, searching .machine first
        assert "nameserver 10.5.0.1\n" in text and "search machine example.org\n" in text
        assert "192.0.2.53" not in text and "127.0.0.53" not in text
    monkeypatch.setattr(dns, "dnsmasq", lambda: None)  # without it: the host's resolvers
    network.render_etc_files("web", st, paths, dest)
    text = (dest / "resolv.conf").read_text()
    assert "nameserver 192.0.2.53\n" in text and "127.0.0.53" not in text
    assert "10.5.0.1" not in text
    # no network: the host's resolvers as they are, the name on 127.0.1.1
    network.render_etc_files("lonely", None, paths, tmp_path / "etc2")
    assert "127.0.1.1\tlonely\n" in (tmp_path / "etc2" / "hosts").read_text()
    assert "nameserver 127.0.0.53" in (tmp_path / "etc2" / "resolv.conf").read_text()


def test_loopback_proxies() -> None:
    st = network.NetworkState(
        "vm-web", 5, "10.5.0.2/24", "10.5.0.1", None, None, "b0", ("tcp:8080:80", "udp:53:53")
    )
    assert network.loopback_proxies(st) == [
        network.LoopbackProxy("tcp", "[::1]:8080", "10.5.0.2:80")
    ]
    assert network.loopback_proxies(None) == []


# --- the bridge's dnsmasq ---------------------------------------------------------


def test_resolv_names_the_bridges_dnsmasq(paths: Paths, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(dns, "dnsmasq", lambda: "/usr/sbin/dnsmasq")
    resolv = tmp_path / "host-resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\nsearch machine lab.test\noptions edns0\n")
    monkeypatch.setattr(etc, "HOST_RESOLV_CONF", resolv)
    st = network.NetworkState("vm-web", 5, "10.5.0.2/24", "10.5.0.1", None, None, "b0", ())
    text = etc.render_resolv("web", etc.resolvers(st))
    assert text.splitlines()[2:] == [
        "nameserver 10.5.0.1",
        "search machine lab.test",  # .machine once
        "options edns0",
    ]
    assert "pymachine-dns@b0.service" in text
    # the runtime's fallback when dnsmasq could not start: the host's own
    assert "nameserver 192.0.2.53" in etc.render_resolv("web", etc.resolvers(st, dns=False))


def test_bridge_hosts_file_follows_the_leases(paths: Paths) -> None:
    net = _net(paths)
    with addresses.locked(paths):
        addresses.allocate(paths, "web", net)
        addresses.allocate(paths, "db", net)
        dns.write_hosts(paths, "b0")
    hosts = dns.hosts_dir(paths, "b0") / dns.HOSTS
    lines = [line for line in hosts.read_text().splitlines() if not line.startswith("#")]
    assert lines == [
        "10.5.0.3\tdb\tdb.machine",
        "fd00:1::3\tdb\tdb.machine",
        "10.5.0.2\tweb\tweb.machine",
        "fd00:1::2\tweb\tweb.machine",
    ]
    assert hosts.stat().st_mode & 0o777 == 0o644  # dnsmasq reads it as nobody
    assert [p.name for p in dns.directory(paths).iterdir()] == ["b0"]  # no temporary left
    network.release("web", paths)  # removed: its name goes
    assert "web" not in hosts.read_text()


def test_dnsmasq_listens_on_its_bridge_only_and_reads_no_configuration(paths: Paths) -> None:
    argv = dns.command("/usr/sbin/dnsmasq", paths, "b0")
    assert "--conf-file=/dev/null" in argv and "--interface=b0" in argv
    assert "--bind-dynamic" in argv and "--except-interface=lo" in argv  # never a wildcard
    assert "--user=nobody" in argv and "--local=/machine/" in argv
    assert not [a for a in argv if a.startswith(("--dhcp", "--enable-tftp", "--port"))]
    assert dns.unit_name("b0") == "pymachine-dns@b0.service"  # "@": no machine's unit


def test_dns_running_reads_its_pid_file(paths: Paths) -> None:
    assert not dns.running(paths, "b0")
    dns.directory(paths).mkdir(parents=True)
    dns.pid_file(paths, "b0").write_text(f"{os.getpid()}\n")  # alive, but not dnsmasq of b0
    assert not dns.running(paths, "b0")
    dns.pid_file(paths, "b0").write_text("garbage")
    assert not dns.running(paths, "b0")


def test_dns_ensure_joins_a_concurrent_start(paths: Paths, monkeypatch) -> None:
    """Two machines starting at once on a new bridge: the second one's
    StartTransientUnit finds the unit made, and waits for its start instead."""
    from machined.dbus import BusError

    monkeypatch.setattr(dns, "dnsmasq", lambda: "/usr/sbin/dnsmasq")
    calls = []

    class Systemd:
        def reset_failed(self, unit):
            calls.append(("reset", unit))

        def start_transient(self, unit, properties):
            calls.append(("transient", unit))
            raise BusError(f"Unit {unit} already exists.")

        def start_unit(self, unit):
            calls.append(("start", unit))

    assert dns.ensure(Systemd(), paths, "b0")
    unit = "pymachine-dns@b0.service"
    assert calls == [("reset", unit), ("transient", unit), ("start", unit)]
    assert (dns.hosts_dir(paths, "b0") / dns.HOSTS).exists()  # there before dnsmasq reads it

    class Broken(Systemd):
        def start_transient(self, unit, properties):
            raise BusError("Access denied")

    with pytest.raises(BusError):
        dns.ensure(Broken(), paths, "b0")
    monkeypatch.setattr(dns, "dnsmasq", lambda: None)
    assert not dns.ensure(Broken(), paths, "b0")  # not installed: nothing asked
