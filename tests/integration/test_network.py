"""Machines' networking for real: veth, bridge, nftables, in throwaway namespaces.

Root only, no systemd. Every test runs in a *fake host*: the test thread
unshares a network namespace of its own, so bridges, nft tables and sysctls
(``ip_forward``…) never touch the real host's, and everything disappears with
the namespace. "Machines" are ``unshare --net sleep`` processes; the outside
world and the upstream router are more namespaces joined to the fake host by
veths the test makes. Traffic goes only to addresses inside these namespaces.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined import network
from machined.network import addresses
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths
from tests.harness import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
BRIDGE = "pmtest0"
SUBNET = "10.219.250.0/24"
SUBNET6 = "fd00:5eed:250::/64"
_libc = ctypes.CDLL(None, use_errno=True)


# --- fixtures -----------------------------------------------------------------


@pytest.fixture
def fake_host() -> Iterator[None]:
    """Move the test thread into a new network namespace, and back afterwards."""
    if os.geteuid() != 0:
        skip_or_fail("network tests need root")
    for tool in ("nft", "ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            skip_or_fail(f"network tests need {tool}")
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if _libc.unshare(CLONE_NEWNET) != 0:
        os.close(saved)
        skip_or_fail(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
    try:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        if _libc.setns(saved, CLONE_NEWNET) != 0:  # pragma: no cover
            raise OSError(ctypes.get_errno(), "setns back to the original netns failed")
        os.close(saved)


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_host: None) -> Paths:
    root = tmp_path / "root"
    monkeypatch.setenv("PYMACHINE_ROOT", str(root))
    p = Paths(root)
    netdir = addresses.network_dir(p)
    netdir.mkdir(parents=True)
    (netdir / "bridges.json").write_text(
        json.dumps({"bridges": {BRIDGE: {"subnet": SUBNET, "subnet6": SUBNET6}}})
    )
    return p


class Namespace:
    """A process alone in a new network namespace (a machine, or the outside world)."""

    def __init__(self) -> None:
        own = os.stat("/proc/thread-self/ns/net").st_ino
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        self.pid = self.proc.pid
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{self.pid}/ns/net").st_ino == own:
            if time.monotonic() > deadline:
                raise TimeoutError("unshare did not make a network namespace")
            time.sleep(0.005)
        self.servers: list[subprocess.Popen] = []

    def cmd(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 20) -> str:
        proc = subprocess.run(
            self.cmd(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc.stdout

    def links(self) -> list[str]:
        return [link["ifname"] for link in json.loads(self.run("ip", "-j", "link"))]

    def serve(self, port: int, name: str, udp: bool = False) -> None:
        """A dual-stack server answering each client with 'NAME PEER-ADDRESS'."""
        code = SERVER_UDP if udp else SERVER_TCP
        proc = subprocess.Popen(
            self.cmd(sys.executable, "-c", code, str(port), name),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.servers.append(proc)

    def connect(self, host: str, port: int) -> str:
        return self.run(sys.executable, "-c", CLIENT, host, str(port)).strip()

    def close(self) -> None:
        for proc in [*self.servers, self.proc]:
            proc.kill()
            proc.wait()


SERVER_TCP = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[1])))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(f"{sys.argv[2]} {peer[0].removeprefix('::ffff:')}".encode())
        c.close()
    """
)
SERVER_UDP = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", int(sys.argv[1])))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(f"{sys.argv[2]} {peer[0].removeprefix('::ffff:')}".encode(), peer)
    """
)
PING = textwrap.dedent(
    """
    import socket, struct, sys
    def checksum(b):
        s = sum(struct.unpack(f"!{len(b) // 2}H", b))
        s = (s >> 16) + (s & 0xFFFF)
        return ~(s + (s >> 16)) & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(3)
    hdr = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"pymachine"
    hdr = hdr[:2] + struct.pack("!H", checksum(hdr + b"\\0")) + hdr[4:]
    s.sendto(hdr, (sys.argv[1], 0))
    while True:
        data, peer = s.recvfrom(200)
        if peer[0] == sys.argv[1] and data[20] == 0:
            print("pong", peer[0])
            break
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.recv(200).decode())
    """
)


def connect(host: str, port: int, udp: bool = False) -> str:
    """A client in the fake host itself (this thread's namespace)."""
    if udp:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"hello", (host, port))
            return s.recv(200).decode()
    with socket.create_connection((host, port), timeout=5) as c:
        return c.recv(200).decode()


@pytest.fixture
def namespaces() -> Iterator[list[Namespace]]:
    made: list[Namespace] = []
    yield made
    for ns in made:
        ns.close()


@pytest.fixture
def machine(paths: Paths, namespaces: list[Namespace]):
    """A factory: machine(name, **NetworkConfig fields) → (Namespace, NetworkState)."""

    def make(name: str, **kw):
        kw.setdefault("bridge", BRIDGE)
        ns = Namespace()
        namespaces.append(ns)
        return ns, network.setup(name, NetworkConfig(**kw), ns.pid, paths)

    return make


def link_to(ns: Namespace, host_if: str, host_addrs: list[str], ns_addrs: list[str]) -> None:
    """A veth between the fake host and ``ns`` with the given addresses (made by the test)."""
    peer = f"{host_if}-p"
    subprocess.run(
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer, "netns", str(ns.pid)],
        check=True,
    )
    for addr in host_addrs:
        subprocess.run(["ip", "addr", "add", addr, "dev", host_if, "nodad"], check=True)
    subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
    ns.run("ip", "link", "set", "lo", "up")
    for addr in ns_addrs:
        ns.run("ip", "addr", "add", addr, "dev", peer, "nodad")
    ns.run("ip", "link", "set", peer, "up")


def host_links() -> list[dict]:
    return json.loads(subprocess.check_output(["ip", "-j", "-d", "link"]))


def table_rules() -> list[dict]:
    proc = subprocess.run(
        ["nft", "-j", "list", "table", "inet", "pymachine"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return []
    return [o["rule"] for o in json.loads(proc.stdout)["nftables"] if "rule" in o]


def machine_rules() -> list[dict]:
    return [r for r in table_rules() if r.get("comment", "").startswith("pymachine:")]


def ip(state: network.NetworkState) -> str:
    return state.address.split("/")[0]


def ip6(state: network.NetworkState) -> str:
    assert state.address6 is not None
    return state.address6.split("/")[0]


# --- tests --------------------------------------------------------------------


def test_machines_reach_each_other_and_the_host_reaches_them(machine, paths: Paths) -> None:
    a, sa = machine("alpha")
    b, sb = machine("beta")
    assert sa.host_ifname == "vm-alpha" and sb.host_ifname == "vm-beta"
    assert ipaddress.ip_interface(sa.address).network == ipaddress.ip_network(SUBNET)
    assert sa.gateway == "10.219.250.1"
    assert ip(sa) != ip(sb)
    assert a.links() == ["lo", "host0"]

    assert a.run(sys.executable, "-c", PING, ip(sb)).strip() == f"pong {ip(sb)}"
    b.serve(80, "beta")
    assert a.connect(ip(sb), 80) == f"beta {ip(sa)}"
    assert a.connect(ip6(sb), 80) == f"beta {ip6(sa)}"
    # the host reaches the machine directly, from the gateway address
    assert connect(ip(sb), 80) == f"beta {sb.gateway}"
    assert connect(ip6(sb), 80) == f"beta {sb.gateway6}"


def test_hosts_file_names_the_machines_on_the_bridge(machine, paths: Paths, tmp_path: Path) -> None:
    _, sa = machine("alpha")
    network.render_etc_files("alpha", sa, paths, tmp_path / "alpha-etc")
    hosts = tmp_path / "alpha-etc" / "hosts"
    inode = hosts.stat().st_ino
    assert f"{ip(sa)}\talpha" in hosts.read_text()
    _, sb = machine("beta")  # a new machine on the bridge: alpha's hosts is rewritten in place
    assert f"{ip(sb)}\tbeta" in hosts.read_text()
    assert hosts.stat().st_ino == inode
    assert (tmp_path / "alpha-etc" / "resolv.conf").exists()


def test_port_forward_from_outside_namespace(machine, namespaces, paths: Paths) -> None:
    web, sw = machine(
        "web", ports=[PortForward.parse("tcp:8080:80"), PortForward.parse("udp:5353:53")]
    )
    web.serve(80, "web")
    web.serve(53, "web-udp", udp=True)
    outside = Namespace()
    namespaces.append(outside)
    link_to(
        outside,
        "pmt-out",
        ["192.0.2.1/24", "2001:db8:2::1/64"],
        ["192.0.2.2/24", "2001:db8:2::2/64"],
    )
    # the client's own address arrives at the machine (no masquerade for forwards)
    assert outside.connect("192.0.2.1", 8080) == "web 192.0.2.2"
    assert outside.connect("2001:db8:2::1", 8080) == "web 2001:db8:2::2"
    # without a Port=, the outside cannot reach the machine even with a route to it
    outside.run("ip", "route", "add", SUBNET, "via", "192.0.2.1")
    out = outside.run(sys.executable, "-c", CLIENT, ip(sw), "80", check=False)
    assert out.strip() == ""


def test_port_forward_from_the_hosts_localhost(machine, paths: Paths) -> None:
    web, sw = machine(
        "web", ports=[PortForward.parse("tcp:8080:80"), PortForward.parse("udp:5353:53")]
    )
    web.serve(80, "web")
    web.serve(53, "web-udp", udp=True)
    assert connect("127.0.0.1", 8080) == f"web {sw.gateway}"
    assert connect("127.0.0.1", 5353, udp=True) == f"web-udp {sw.gateway}"
    # and through the host's own addresses on the bridge, v4 and v6
    assert connect(sw.gateway, 8080) == f"web {sw.gateway}"
    assert connect(sw.gateway6, 8080) == f"web {sw.gateway6}"
    # [::1] is left alone by nft (no route_localnet in IPv6): refused, not black-holed
    with pytest.raises(ConnectionRefusedError):
        connect("::1", 8080)


def test_port_forward_from_ipv6_localhost_through_socket_proxyd(machine, paths: Paths) -> None:
    proxyd = shutil.which("systemd-socket-proxyd", path="/lib/systemd:/usr/lib/systemd")
    if proxyd is None:
        skip_or_fail("systemd-socket-proxyd is not installed")
    web, sw = machine("web", ports=[PortForward.parse("tcp:8080:80")])
    web.serve(80, "web")
    [proxy] = network.loopback_proxies(sw)
    assert (proxy.protocol, proxy.listen, proxy.target) == ("tcp", "[::1]:8080", f"{ip(sw)}:80")
    # what a socket unit does: listen, then hand the socket to systemd-socket-proxyd as fd 3
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind(("::1", 8080))
    listener.listen()

    def activate() -> None:  # in the child, before fds not in pass_fds are closed
        os.dup2(listener.fileno(), 3)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))

    proc = subprocess.Popen(
        [proxyd, proxy.target], preexec_fn=activate, pass_fds=(3, listener.fileno())
    )
    try:
        assert connect("::1", 8080) == f"web {sw.gateway}"
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def test_hairpin_machine_to_host_port_to_machine(machine, paths: Paths) -> None:
    web, sw = machine("web", ports=[PortForward.parse("8080:80")])
    client, _ = machine("client")
    web.serve(80, "web")
    assert client.connect(sw.gateway, 8080) == f"web {sw.gateway}"


def test_outbound_nat_through_an_upstream_router(machine, namespaces, paths: Paths) -> None:
    m, sm = machine("out")
    upstream = Namespace()
    namespaces.append(upstream)
    link_to(
        upstream,
        "pmt-up",
        ["198.51.100.1/24", "2001:db8:1::1/64"],
        ["198.51.100.2/24", "2001:db8:1::2/64"],
    )
    # the fake host's default routes lead to the upstream router, which "is the internet"
    subprocess.run(["ip", "route", "add", "default", "via", "198.51.100.2"], check=True)
    subprocess.run(["ip", "-6", "route", "add", "default", "via", "2001:db8:1::2"], check=True)
    upstream.run("ip", "addr", "add", "203.0.113.5/32", "dev", "lo")
    upstream.serve(9000, "upstream")
    assert m.connect("203.0.113.5", 9000) == "upstream 198.51.100.1"
    assert m.connect("2001:db8:1::2", 9000) == "upstream 2001:db8:1::1"


def test_mode_none_has_only_loopback(paths: Paths, namespaces) -> None:
    ns = Namespace()
    namespaces.append(ns)
    from machined.runtime.loopback import loopback_up

    none = NetworkConfig(mode=NetworkMode.NONE)
    assert network.attach("lonely", none, ns.pid, paths, None) is None  # nothing of the host's
    loopback_up(ns.pid)  # the runtime's own
    links = json.loads(ns.run("ip", "-j", "addr"))
    assert [link["ifname"] for link in links] == ["lo"]
    assert "UP" in links[0]["flags"]
    assert ns.run(sys.executable, "-c", PING, "127.0.0.1").strip() == "pong 127.0.0.1"
    assert network.address_of("lonely", paths) is None


def test_mode_host_does_nothing(paths: Paths) -> None:
    before = host_links()
    host_mode = NetworkConfig(mode=NetworkMode.HOST)
    assert network.attach("hosty", host_mode, os.getpid(), paths, None) is None
    assert host_links() == before
    assert table_rules() == []


def test_ten_concurrent_setups_get_distinct_addresses(paths: Paths, namespaces) -> None:
    nss = [Namespace() for _ in range(10)]
    namespaces.extend(nss)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from machined import network
        from machined.network.config import NetworkConfig, PortForward
        from machined.paths import Paths
        i, pid = int(sys.argv[1]), int(sys.argv[2])
        cfg = NetworkConfig(bridge={BRIDGE!r}, ports=[PortForward("tcp", 9000 + i, 80)])
        s = network.setup(f"m{{i}}", cfg, pid, Paths.from_env())
        print(s.address)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(ns.pid)], stdout=subprocess.PIPE, text=True
        )
        for i, ns in enumerate(nss)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(set(outs)) == 10, outs
    assert {network.address_of(f"m{i}", paths) for i in range(10)} == {
        o.split("/")[0] for o in outs
    }
    for ns in nss:
        assert ns.links() == ["lo", "host0"]
    assert len(machine_rules()) == 20  # one DNAT rule per IP family each
    nss[3].serve(80, "m3")
    assert connect("127.0.0.1", 9003) == "m3 10.219.250.1"


def test_teardown_removes_links_and_rules_but_keeps_the_lease(machine, paths: Paths) -> None:
    ns, s = machine("web", ports=[PortForward.parse("8080:80")])
    assert len(machine_rules()) == 2
    network.teardown("web", paths)
    assert not [link for link in host_links() if link["ifname"] == s.host_ifname]
    assert machine_rules() == []
    assert ns.links() == ["lo"]  # host0 went with its peer
    assert network.address_of("web", paths) == ip(s)
    network.teardown("web", paths)  # idempotent: nothing to do, no error
    # a restart in a new namespace keeps the address
    ns2 = Namespace()
    try:
        s2 = network.setup(
            "web",
            NetworkConfig(bridge=BRIDGE, ports=[PortForward.parse("8080:80")]),
            ns2.pid,
            paths,
        )
        assert s2.address == s.address
    finally:
        network.teardown("web", paths)
        ns2.close()
    network.release("web", paths)
    assert network.address_of("web", paths) is None


def test_teardown_after_sigkill_from_a_fresh_process(paths: Paths, namespaces) -> None:
    ns = Namespace()
    namespaces.append(ns)
    runtime = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from machined import network
        from machined.network.config import NetworkConfig, PortForward
        from machined.paths import Paths
        network.setup("killed", NetworkConfig(bridge={BRIDGE!r}, ports=[PortForward.parse("8080:80")]),
                      int(sys.argv[1]), Paths.from_env())
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", runtime, str(ns.pid)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert "vm-killed" in [link["ifname"] for link in host_links()]
    assert len(machine_rules()) == 2
    cleanup = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from machined import network
        from machined.paths import Paths
        network.teardown("killed", Paths.from_env())
        """
    )
    subprocess.run([sys.executable, "-c", cleanup], check=True)
    assert "vm-killed" not in [link["ifname"] for link in host_links()]
    assert machine_rules() == []
    assert ns.links() == ["lo"]


def test_setup_cleans_a_leftover_of_a_killed_run(machine, paths: Paths) -> None:
    ns, s = machine("web", ports=[PortForward.parse("8080:80")])
    # the runtime was killed, the machine restarts in a new namespace, the old one lives on
    ns2, s2 = machine("web", ports=[PortForward.parse("8080:80")])
    assert s2.address == s.address
    assert ns.links() == ["lo"] and ns2.links() == ["lo", "host0"]
    assert len(machine_rules()) == 2


def test_gc_cleans_machines_that_are_not_running(machine, paths: Paths) -> None:
    machine("keep", ports=[PortForward.parse("8081:80")])
    machine("gone", ports=[PortForward.parse("8082:80")])
    assert network.gc(paths, running={"keep"}) == ["gone"]
    names = [link["ifname"] for link in host_links()]
    assert "vm-keep" in names and "vm-gone" not in names
    assert {r["comment"].split(":")[1] for r in machine_rules()} == {"keep"}
    assert network.gc(paths, running={"keep"}) == []


def test_a_host_port_forwarded_twice_is_a_conflict(machine, paths: Paths) -> None:
    from machined.errors import Conflict

    machine("first", ports=[PortForward.parse("8080:80")])
    with pytest.raises(Conflict, match="already forwarded to machine 'first'"):
        machine("second", ports=[PortForward.parse("8080:8080")])
    # the failed setup left nothing behind
    assert "vm-second" not in [link["ifname"] for link in host_links()]
    assert network.state_of("second", paths) is None


def test_fixed_address_and_long_machine_names(machine, paths: Paths) -> None:
    name = "a-rather-long-machine-name"
    ns, s = machine(name, address="10.219.250.77")
    assert ip(s) == "10.219.250.77"
    assert s.host_ifname.startswith("vh-") and len(s.host_ifname) == 15
    assert ns.links() == ["lo", "host0"]
    network.teardown(name, paths)
    assert s.host_ifname not in [link["ifname"] for link in host_links()]


def test_remove_bridge_only_when_unused(machine, paths: Paths) -> None:
    machine("web")
    assert network.remove_bridge(BRIDGE, paths) is False  # vm-web is still a port
    network.teardown("web", paths)
    assert network.remove_bridge(BRIDGE, paths) is True
    assert BRIDGE not in [link["ifname"] for link in host_links()]
    listing = json.loads(
        subprocess.check_output(["nft", "-j", "list", "set", "inet", "pymachine", "bridges"])
    )
    [the_set] = [o["set"] for o in listing["nftables"] if "set" in o]
    assert "elem" not in the_set
    assert network.remove_bridge(BRIDGE, paths) is True  # idempotent
