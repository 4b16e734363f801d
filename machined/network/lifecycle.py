"""A machine's network from start to removal: :func:`setup`, :func:`teardown`,
:func:`release`, :func:`gc`, the ``/etc`` files, ``[::1]`` proxies. See the
package's docstring (:mod:`machined.network`) for the design."""

from __future__ import annotations

import contextlib
from collections import namedtuple
from pathlib import Path

from machined.names import validate_machine_name
from machined.network import addresses, dns, etc, state
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~2 ms in the runtime)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "NetworkConfig",
    "NetworkMode",
    "NetworkState",
    "PortForward",
    "LoopbackProxy",
    "address_of",
    "gc",
    "loopback_proxies",
    "release",
    "render_etc_files",
    "setup",
    "teardown",
]


_NETWORK_STATE = (
    "host_ifname",
    "host_ifindex",
    "address",
    "gateway",
    "address6",
    "gateway6",
    "bridge",
    "ports",
)


class NetworkState(namedtuple("NetworkState", _NETWORK_STATE, defaults=(None, None, "", ()))):
    """A bridged machine's network as set up: its veth, addresses, bridge, ports.
    (A namedtuple: a dataclass costs ~0.3 ms to create, paid by every bridged start.)"""

    __slots__ = ()

    host_ifname: str
    host_ifindex: int
    address: str  # with prefix: "10.219.0.2/24"
    gateway: str  # "10.219.0.1"
    address6: str | None  # "fdXX:…::2/64", None without IPv6
    gateway6: str | None
    bridge: str
    ports: tuple[str, ...]  # "tcp:8080:80", …

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> NetworkState | None:
        try:
            return cls(
                host_ifname=data["host_ifname"],
                host_ifindex=int(data["host_ifindex"]),
                address=data["address"],
                gateway=data["gateway"],
                address6=data.get("address6"),
                gateway6=data.get("gateway6"),
                bridge=data.get("bridge", ""),
                ports=tuple(data.get("ports", ())),
            )
        except (KeyError, TypeError, ValueError):
            return None


# --- setup / teardown ------------------------------------------------------------


def setup(machine: str, config: NetworkConfig, netns_pid: int, paths: Paths) -> NetworkState | None:
    """Give the machine whose network namespace ``netns_pid`` is in its network.

    Returns None for ``Mode=none`` and ``Mode=host``. On failure, whatever was
    made is removed again before the error is raised.
    """
    validate_machine_name(machine)
    config.validate()
    if config.mode == NetworkMode.HOST:
        return None
    if config.mode == NetworkMode.NONE:
        from machined.network.loopback import loopback_up

        loopback_up(netns_pid)  # one ioctl: no links/rtnl for a runtime that needs nothing else
        return None

    from machined.network import links, nft, sysctl
    from machined.network.leftover import link_exists

    ifname = state.host_ifname(machine)
    # A previous run killed before it could clean up; or the veth of the last
    # run, which the kernel removes with its namespace, asynchronously.
    if state.read(paths, machine) is not None or link_exists(ifname):
        teardown(machine, paths)
    try:
        with addresses.locked(paths), links.host() as ipr:
            net = addresses.bridge_network(
                paths, config.bridge, avoid=lambda: links.host_networks(ipr, config.bridge)
            )
            lease, changed = addresses.allocate(paths, machine, net, config.fixed_address())
            if changed or not (dns.hosts_dir(paths, net.name) / dns.HOSTS).exists():
                dns.write_hosts(paths, net.name)  # dnsmasq sees it through inotify
            record: dict[str, Any] = {
                "machine": machine,
                "bridge": net.name,
                "host_ifname": ifname,
                "host_ifindex": 0,
                "netns_pid": netns_pid,
                "ports": [str(p) for p in config.ports],
            }
            state.write(paths, machine, record)  # before anything exists: teardown finds it
            bridge_index, has6 = links.ensure_bridge(ipr, net, ipv6=sysctl.ipv6_available())
            sysctl.enable_bridge(net.name, ipv6=has6)
            address6 = lease.address6 if has6 else None
            nft.install_machine(
                machine,
                config.ports,
                lease.ip,
                address6.split("/", 1)[0] if address6 else None,
                nft.bridge_elements(net.name, net.subnet, net.subnet6 if has6 else None),
            )
            ifindex = links.create_veth(ipr, machine, ifname, bridge_index, netns_pid)
        links.configure_inside(netns_pid, lease, net, ipv6=has6)
        result = NetworkState(
            host_ifname=ifname,
            host_ifindex=ifindex,
            address=lease.address,
            gateway=str(net.gateway),
            address6=address6,
            gateway6=str(net.gateway6) if address6 else None,
            bridge=net.name,
            ports=tuple(str(p) for p in config.ports),
        )
        record.update(result._asdict())
        record["ports"] = list(result.ports)
        state.write(paths, machine, record)
    except BaseException:
        with contextlib.suppress(Exception):
            teardown(machine, paths)
        raise
    if changed:
        _refresh_hosts(paths, net.name, skip=machine)
    return result


def teardown(machine: str, paths: Paths) -> None:
    """Remove the machine's veth and nft rules; keep its lease. Idempotent.

    Needs nothing but the runtime record (or, without one, the machine's name):
    works after the runtime was killed with SIGKILL. (:mod:`.leftover`, light
    for the clean-up after every stop.)
    """
    from machined.errors import PymachineError
    from machined.network import leftover, nftlib

    try:
        leftover.teardown(machine, str(state.state_file(paths, machine)))
    except nftlib.NftError as exc:
        raise PymachineError(str(exc)) from None


def release(machine: str, paths: Paths) -> None:
    """Forget the machine's address lease (the machine was removed)."""
    lease = addresses.release(paths, machine)
    if lease is not None:
        with addresses.locked(paths):
            dns.write_hosts(paths, lease.bridge)
        _refresh_hosts(paths, lease.bridge, skip=machine)


def address_of(machine: str, paths: Paths) -> str | None:
    """The machine's IPv4 address (no prefix), from its lease; None if it has none."""
    lease = addresses.lease_of(paths, machine)
    return lease.ip if lease is not None else None


def state_of(machine: str, paths: Paths) -> NetworkState | None:
    """The running machine's network, from its runtime record (no netlink)."""
    record = state.read(paths, machine)
    return NetworkState.from_record(record) if record else None


def gc(paths: Paths, running: set[str]) -> list[str]:
    """Clean what machines that are not running left (links, nft rules, records).

    Returns the names of the machines something was cleaned for.
    """
    from machined.network import links, nft

    cleaned: set[str] = set()
    for machine in state.machines(paths):
        if machine not in running:
            teardown(machine, paths)
            cleaned.add(machine)
    with links.host() as ipr:
        for ifname, machine in links.pymachine_links(ipr).items():
            if machine not in running and links.delete_link(ipr, ifname, machine):
                cleaned.add(machine)
    cleaned.update(nft.remove_machines_except(running))
    return sorted(cleaned)


def remove_bridge(bridge: str, paths: Paths) -> bool:
    """Delete an unused bridge and take it out of the nft sets; False if machines still use it.

    Its subnet stays recorded in ``bridges.json`` (leases keep pointing into it).
    """
    from machined.network import links, nft

    with addresses.locked(paths), links.host() as ipr:
        index = links.index_of(ipr, bridge)
        if index is not None and links.bridge_ports(ipr, index):
            return False
        net = addresses.load_bridge(paths, bridge)
        if net is not None:
            nft.remove_bridge_elements(bridge, net.subnet, net.subnet6)
        if index is not None:
            links.delete_bridge(ipr, bridge)
    return True


class LoopbackProxy(namedtuple("LoopbackProxy", ("protocol", "listen", "target"))):
    """One ``[::1]`` port forward: protocol, where it listens, where it goes.
    (A namedtuple: a dataclass costs ~0.3 ms to create, paid by every bridged start.)"""

    __slots__ = ()

    protocol: str  # "tcp"
    listen: str  # "[::1]:8080"
    target: str  # "10.219.0.2:80"


def loopback_proxies(net_state: NetworkState | None) -> list[LoopbackProxy]:
    """The ``Port=`` forwards nftables cannot do: TCP on the host's ``[::1]``.

    IPv6 has no ``route_localnet``: a reply whose destination conntrack restores
    to ``::1`` arrives on the bridge and the kernel drops it, so DNAT cannot serve
    ``[::1]`` (127.0.0.1 and every other local address are served by nft). A
    userspace proxy can; on a systemd host the runtime makes, per entry, a socket
    unit with ``ListenStream=<listen>``, ``BindIPv6Only=ipv6-only`` and
    ``FreeBind=yes`` and a service running ``systemd-socket-proxyd <target>``
    (TCP only: systemd-socket-proxyd does not relay UDP).
    """
    if net_state is None:
        return []
    ip = net_state.address.split("/", 1)[0]
    proxies = []
    for text in net_state.ports:
        port = PortForward.parse(text)
        if port.protocol == "tcp":
            proxies.append(
                LoopbackProxy("tcp", f"[::1]:{port.host_port}", f"{ip}:{port.container_port}")
            )
    return proxies


# --- /etc/hosts, /etc/resolv.conf ------------------------------------------------


def render_etc_files(
    machine: str, net_state: NetworkState | None, paths: Paths, dest_dir: Path
) -> None:
    """Write ``dest_dir/hosts`` and ``dest_dir/resolv.conf`` for the machine.

    ``hosts`` names the machine itself and every machine with a lease on the same
    bridge; when a machine joins or leaves the bridge later, the ``hosts`` files
    of the running machines there are rewritten in place, so bind mounts of them
    stay current. ``net_state`` None (``Mode=none``/``host``): the host's resolvers
    as they are.
    """
    etc.write_etc_files(machine, net_state, paths, dest_dir)
    if net_state is not None and state.read(paths, machine):
        state.update(paths, machine, etc_dir=str(dest_dir))


def _refresh_hosts(paths: Paths, bridge: str, skip: str) -> None:
    """Rewrite the hosts files of the running machines on ``bridge`` (a lease came or went)."""
    for machine in state.machines(paths):
        if machine == skip:
            continue
        record = state.read(paths, machine) or {}
        etc_dir = record.get("etc_dir")
        net_state = NetworkState.from_record(record)
        if not etc_dir or net_state is None or net_state.bridge != bridge:
            continue
        with contextlib.suppress(OSError):
            if (Path(etc_dir) / "hosts").exists():
                etc.write_in_place(
                    Path(etc_dir) / "hosts", etc.render_hosts(paths, machine, net_state)
                )
