"""A machine's network from start to removal: :func:`attach` (the host side of a
start, which pymachined runs for the runtime), :func:`teardown`,
:func:`release`, :func:`gc`, the ``/etc`` files, ``[::1]`` proxies. See the
package's docstring (:mod:`machined.network`) for the design."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from machined.names import validate_machine_name
from machined.network import addresses, dns, etc, state
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths

log = logging.getLogger("pymachined")

__all__ = [
    "NetworkConfig",
    "NetworkMode",
    "NetworkState",
    "PortForward",
    "LoopbackProxy",
    "address_of",
    "attach",
    "gc",
    "loopback_proxies",
    "release",
    "render_etc_files",
    "setup",
    "teardown",
]


@dataclass(frozen=True)
class NetworkState:
    """A bridged machine's network as set up: its veth, addresses, bridge, ports."""

    host_ifname: str
    host_ifindex: int
    address: str  # with prefix: "10.219.0.2/24"
    gateway: str  # "10.219.0.1"
    address6: str | None = None  # "fdXX:…::2/64", None without IPv6
    gateway6: str | None = None
    bridge: str = ""
    ports: tuple[str, ...] = ()  # "tcp:8080:80", …

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

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["ports"] = list(self.ports)
        return record


# --- the host side of a start ------------------------------------------------------


def attach(
    machine: str, config: NetworkConfig, netns_pid: int, paths: Paths, machine_unit: str | None
) -> NetworkState | None:
    """Everything the host does for a starting bridged machine whose network
    namespace ``netns_pid`` is in: :func:`setup`, its ``/etc/hosts`` and
    ``/etc/resolv.conf`` (in ``RUN/etc``, which the runtime bind-mounts), the
    bridge's dnsmasq, the ``[::1]`` proxies (``BindsTo=`` MACHINE_UNIT).

    pymachined runs it when the runtime asks (``SetUpNetwork``); a runtime on a
    host without pymachined runs it itself. Returns None for ``Mode=none`` and
    ``Mode=host`` (the runtime's own: nothing of the host's).
    """
    if config.mode != NetworkMode.BRIDGE:
        return None
    net_state = setup(machine, config, netns_pid, paths)
    etc_dir = paths.machine_runtime(machine) / "etc"
    try:
        dns_ok = _ensure_dns(paths, net_state.bridge)
        render_etc_files(machine, net_state, paths, etc_dir, dns=dns_ok)
        proxies = loopback_proxies(net_state)
        if proxies and machine_unit is not None:
            from machined import proxies as proxy_units
            from machined.dbus import Bus
            from machined.systemd import Systemd

            try:
                with Bus() as bus:
                    proxy_units.start(Systemd(bus), machine, machine_unit, proxies)
            except Exception as exc:  # the IPv4 and other IPv6 forwards still work
                log.warning(
                    "machine %s: port forwards on [::1] are not available: %s", machine, exc
                )
    except BaseException:
        with contextlib.suppress(Exception):
            teardown(machine, paths)
        raise
    return net_state


def _ensure_dns(paths: Paths, bridge: str) -> bool:
    """The bridge's dnsmasq (:mod:`.dns`), started by the first machine on it;
    its job ends once it answers. False if it is not installed or cannot start
    (the machine's resolv.conf names the host's resolvers then)."""
    if dns.dnsmasq() is None:
        return False
    if dns.running(paths, bridge):
        return True
    from machined.dbus import Bus
    from machined.systemd import Systemd

    try:
        with Bus() as bus:
            return dns.ensure(Systemd(bus), paths, bridge)
    except Exception as exc:
        log.warning("names of machines on %s are not served (dnsmasq): %s", bridge, exc)
        return False


def setup(machine: str, config: NetworkConfig, netns_pid: int, paths: Paths) -> NetworkState:
    """Give the machine whose network namespace ``netns_pid`` is in its bridge,
    veth pair, addresses, routes and nft rules.

    On failure, whatever was made is removed again before the error is raised.
    """
    validate_machine_name(machine)
    config.validate()
    if config.mode != NetworkMode.BRIDGE:
        raise ValueError(f"setup is for Mode=bridge, not {config.mode}")
    from machined.network import links, nft, sysctl

    ifname = state.host_ifname(machine)
    netns_fd = links.open_netns(netns_pid)
    try:
        with addresses.locked(paths):
            # A previous run killed before it could clean up; or the veth of the
            # last run, which the kernel removes with its namespace, asynchronously.
            if state.read(paths, machine) is not None or _has_link(ifname):
                teardown_locked(machine, paths)
            try:
                net_state, changed = _set_up_locked(
                    machine, config, netns_fd, netns_pid, ifname, paths, links, nft, sysctl
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    teardown_locked(machine, paths)
                raise
    finally:
        os.close(netns_fd)
    if changed:
        _refresh_hosts(paths, net_state.bridge, skip=machine)
    return net_state


def _set_up_locked(
    machine: str,
    config: NetworkConfig,
    netns_fd: int,
    netns_pid: int,
    ifname: str,
    paths: Paths,
    links: Any,
    nft: Any,
    sysctl: Any,
) -> tuple[NetworkState, bool]:
    with links.host() as ipr:
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
            list(config.ports),
            lease.ip,
            address6.split("/", 1)[0] if address6 else None,
            nft.bridge_elements(net.name, net.subnet, net.subnet6 if has6 else None),
        )
        ifindex, peer_index = links.create_veth(ipr, machine, ifname, bridge_index, netns_fd)
    links.configure_inside(netns_fd, lease, net, ipv6=has6, index=peer_index)
    net_state = NetworkState(
        host_ifname=ifname,
        host_ifindex=ifindex,
        address=lease.address,
        gateway=str(net.gateway),
        address6=address6,
        gateway6=str(net.gateway6) if address6 else None,
        bridge=net.name,
        ports=tuple(str(p) for p in config.ports),
    )
    state.write(paths, machine, {**record, **net_state.to_record()})
    return net_state, changed


# --- teardown ----------------------------------------------------------------------


def teardown(machine: str, paths: Paths) -> None:
    """Remove the machine's nft rules, veth and record; keep its lease. Idempotent.

    Needs nothing but the machine's name: works after the runtime was killed
    with SIGKILL.
    """
    with addresses.locked(paths):
        teardown_locked(machine, paths)


def teardown_locked(machine: str, paths: Paths) -> tuple[int, bool]:
    """:func:`teardown` with the network lock held: (rules removed, veth deleted)."""
    from machined.network import nft

    record = state.read(paths, machine) or {}
    failed = None
    rules = 0
    if record.get("ports") != []:  # setup records the ports before it installs their rules
        try:
            rules = nft.remove_machine(machine)
        except Exception as exc:  # the veth still goes; the record stays for gc and the next start
            failed = exc
    veth = delete_lingering_veth(machine, record.get("host_ifname"))
    if failed is not None:
        raise failed
    state.remove(paths, machine)
    return rules, veth


def _has_link(ifname: str) -> bool:
    """Whether the caller's network namespace has an interface of that name (one ioctl)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def delete_lingering_veth(machine: str, ifname: str | None = None) -> bool:
    """Delete the machine's host-side veth if the kernel has not removed it with
    the machine's namespace yet (it does so asynchronously, a moment after the
    last process exited; a quick restart would find its name taken)."""
    ifname = ifname or state.host_ifname(machine)
    if not _has_link(ifname):
        return False
    from machined.network import links

    with links.host() as ipr:
        return links.delete_link(ipr, ifname, machine)


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

    Returns the names of the machines something was cleaned for. Hold no lock.
    """
    from machined.network import links, nft

    cleaned: set[str] = set()
    with addresses.locked(paths):
        for machine in state.machines(paths):
            if machine not in running:
                teardown_locked(machine, paths)
                cleaned.add(machine)
        with links.host() as ipr:
            for ifname, machine in links.pymachine_links(ipr).items():
                if machine not in running and links.delete_link(ipr, ifname, machine):
                    cleaned.add(machine)
        cleaned.update(nft.remove_machines_except(running))
    return sorted(cleaned)


def remove_bridge(bridge: str, paths: Paths, systemd: Any | None = None) -> bool:
    """Delete an unused bridge, take it out of the nft sets and stop its
    dnsmasq (through SYSTEMD, when given); False if machines still use it.

    Its subnet stays recorded in ``bridges.json`` (leases keep pointing into it).
    """
    from machined.network import links, nft

    with addresses.locked(paths), links.host() as ipr:
        index = links.index_of(ipr, bridge)
        if index is not None and links.bridge_ports(ipr, index):
            return False
        if systemd is not None:
            dns.stop(systemd, bridge)
        net = addresses.load_bridge(paths, bridge)
        if net is not None:
            nft.remove_bridge_elements(bridge, net.subnet, net.subnet6)
        if index is not None:
            links.delete_bridge(ipr, bridge)
    return True


@dataclass(frozen=True)
class LoopbackProxy:
    """One ``[::1]`` port forward: protocol, where it listens, where it goes."""

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
    machine: str,
    net_state: NetworkState | None,
    paths: Paths,
    dest_dir: Path,
    *,
    dns: bool = True,
) -> None:
    """Write ``dest_dir/hosts`` and ``dest_dir/resolv.conf`` for the machine.

    ``hosts`` names the machine itself and every machine with a lease on the same
    bridge; when a machine joins or leaves the bridge later, the ``hosts`` files
    of the running machines there are rewritten in place, so bind mounts of them
    stay current. ``net_state`` None (``Mode=none``/``host``): the host's resolvers
    as they are. DNS false: the bridge's dnsmasq does not run, so ``resolv.conf``
    names the host's resolvers.
    """
    etc.write_etc_files(machine, net_state, paths, dest_dir, dns=dns)
    if net_state is not None:
        with addresses.locked(paths):
            record = state.read(paths, machine)
            if record:
                state.write(paths, machine, {**record, "etc_dir": str(dest_dir)})


def _refresh_hosts(paths: Paths, bridge: str, skip: str) -> None:
    """Rewrite the hosts files of the running machines on ``bridge`` (a lease
    came or went), from one reading of the leases."""
    leases = addresses.leases_on(paths, bridge)
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
                    Path(etc_dir) / "hosts", etc.render_hosts(paths, machine, net_state, leases)
                )
