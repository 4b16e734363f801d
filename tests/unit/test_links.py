"""machined.network.links on pyroute2 — as root — in network namespaces the
test makes itself, observed with ``ip -j`` as a user would see them."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from machined.errors import Conflict
from machined.network import links
from machined.network.addresses import BridgeNet, Lease
from machined.network.state import mac_address
from tests.harness import skip_or_fail


@contextmanager
def netns_fd(pid: int) -> Iterator[int]:
    fd = links.open_netns(pid)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def needs_root() -> None:
    """Skip outside CI, fail in CI (the project's rule: no silent skips there)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        skip_or_fail("needs root, unshare and ip")


@pytest.fixture
def namespaces() -> Iterator[tuple[int, int]]:
    """Two fresh network namespaces, a "host" and a "machine": PIDs of processes in them."""
    procs = [subprocess.Popen(["unshare", "--net", "sleep", "120"]) for _ in range(2)]
    try:
        for proc in procs:  # wait until unshare has exec'd sleep in its namespace
            own = os.readlink("/proc/self/ns/net")
            while os.readlink(f"/proc/{proc.pid}/ns/net") == own or _comm(proc.pid) != "sleep":
                time.sleep(0.001)
        yield procs[0].pid, procs[1].pid
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def ip(pid: int, *args: str) -> list[dict]:
    out = subprocess.check_output(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "-d", *args], text=True
    )
    return json.loads(out) if out.strip() else []


def _by_name(pid: int) -> dict[str, dict]:
    return {link["ifname"]: link for link in ip(pid, "link", "show")}


@pytest.mark.usefixtures("needs_root")
def test_a_socket_made_in_a_namespace_acts_there(namespaces: tuple[int, int]) -> None:
    pid, _ = namespaces
    with netns_fd(pid) as fd, links.netns(fd) as handle:
        handle.link("add", ifname="tv0", kind="veth", peer={"ifname": "tv1"})
        assert {"tv0", "tv1"} <= set(_by_name(pid))
        assert links.index_of(handle, "tv0") is not None
    with links.host() as own:
        assert links.index_of(own, "tv0") is None  # not in the test's own namespace


@pytest.mark.usefixtures("needs_root")
def test_bridge_veth_and_machine_side(namespaces: tuple[int, int]) -> None:
    host, machine = namespaces
    net = BridgeNet(
        "br-rtnl", ipaddress.IPv4Network("10.250.7.0/24"), ipaddress.IPv6Network("fd00:7::/64")
    )
    lease = Lease("web", net.name, "10.250.7.2/24", "fd00:7::2/64")
    with netns_fd(host) as host_fd, netns_fd(machine) as machine_fd, links.netns(host_fd) as handle:
        bridge, has6 = links.ensure_bridge(handle, net, ipv6=True)
        assert has6 or not os.path.exists("/proc/sys/net/ipv6")
        assert links.ensure_bridge(handle, net, ipv6=True) == (bridge, has6)  # EEXIST ignored
        index, peer = links.create_veth(handle, "web", "vm-web", bridge, machine_fd)
        links.configure_inside(machine_fd, lease, net, ipv6=has6, index=peer)
        links.configure_inside(machine_fd, lease, net, ipv6=has6)  # again: EEXIST ignored

        seen = _by_name(host)
        assert seen["br-rtnl"]["linkinfo"]["info_kind"] == "bridge"
        assert seen["br-rtnl"]["address"] == mac_address("bridge:br-rtnl")
        assert "UP" in seen["br-rtnl"]["flags"]
        veth = seen["vm-web"]
        assert (veth["ifindex"], veth["master"], veth["ifalias"]) == (
            index,
            "br-rtnl",
            "pymachine:web",
        )
        assert veth["address"] == mac_address("host:web") and "UP" in veth["flags"]
        inside = _by_name(machine)
        assert set(inside) == {"lo", "host0"} and inside["host0"]["ifindex"] == peer
        assert inside["host0"]["address"] == mac_address("machine:web")
        assert "UP" in inside["host0"]["flags"] and "UP" in inside["lo"]["flags"]

        (host0,) = ip(machine, "addr", "show", "host0")
        addrs = {(a["local"], a["prefixlen"]) for a in host0["addr_info"]}
        assert ("10.250.7.2", 24) in addrs
        (route,) = ip(machine, "route", "show", "default")
        assert (route["gateway"], route["dev"]) == ("10.250.7.1", "host0")
        (bridge_addr,) = ip(host, "-4", "addr", "show", "br-rtnl")
        assert [(a["local"], a["prefixlen"]) for a in bridge_addr["addr_info"]] == [
            ("10.250.7.1", 24)
        ]
        if has6:
            v6 = [
                a for a in host0["addr_info"] if a["family"] == "inet6" and a["scope"] == "global"
            ]
            assert [(a["local"], a["prefixlen"], a.get("nodad")) for a in v6] == [
                ("fd00:7::2", 64, True)
            ]
            (route6,) = ip(machine, "-6", "route", "show", "default")
            assert (route6["gateway"], route6["dev"]) == ("fd00:7::1", "host0")

        assert links.pymachine_links(handle) == {"vm-web": "web"}
        assert links.bridge_ports(handle, bridge) == ["vm-web"]
        assert ipaddress.IPv4Network("10.250.7.0/24") in links.host_networks(handle)
        assert ipaddress.IPv4Network("10.250.7.0/24") not in links.host_networks(handle, "br-rtnl")

        assert not links.delete_link(handle, "vm-web", "other")  # not that machine's
        assert links.delete_link(handle, "vm-web", "web")
        assert not links.delete_link(handle, "vm-web", "web")
        assert set(_by_name(machine)) == {"lo"}  # host0 went with its peer
        assert links.bridge_ports(handle, bridge) == []
        assert links.delete_bridge(handle, "br-rtnl")
        assert not links.delete_bridge(handle, "br-rtnl")
        assert set(_by_name(host)) == {"lo"}


@pytest.mark.usefixtures("needs_root")
def test_ensure_bridge_refuses_an_interface_that_is_not_a_bridge(
    namespaces: tuple[int, int],
) -> None:
    host, _ = namespaces
    with netns_fd(host) as fd, links.netns(fd) as handle:
        handle.link("add", ifname="br-taken", kind="veth", peer={"ifname": "br-peer"})
        with pytest.raises(Conflict):
            links.ensure_bridge(
                handle, BridgeNet("br-taken", ipaddress.IPv4Network("10.250.8.0/24")), True
            )
