"""Links, addresses and routes through pyroute2's ``IPRoute`` (netlink; no ``ip`` commands).

Imported only by the functions of :mod:`machined.network` that touch the
kernel: ``import pyroute2`` costs ~0.2 s.

Inside a machine's network namespace, a netlink socket is opened by a
short-lived thread that ``setns()``\\ es into ``/proc/PID/ns/net`` (``setns``
acts on the calling thread only; the thread and its namespace go away when it
ends) and handed to ``IPRoute(use_socket=…)`` (a SOCK_DGRAM netlink socket: pyroute2 wants one). That is what pyroute2's own
``IPRoute(netns=…)`` achieves with a forked helper process; the thread costs
~3 ms instead of ~15 ms, cannot create a namespace by mistake (the
``flags=O_CREAT`` pitfall) and does not fork a process that may hold threads
and locks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from machined.errors import Conflict, PymachineError
from machined.network.addresses import BridgeNet, Lease
from machined.network.state import ALIAS_PREFIX, CONTAINER_IFNAME, mac_address

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def host() -> Iterator[IPRoute]:
    """An rtnetlink handle in the caller's own network namespace."""
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _netns_socket(pid: int) -> socket.socket:
    result: dict[str, Any] = {}

    def enter() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            result["error"] = e
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = OSError(err, os.strerror(err))
                return
        finally:
            os.close(fd)
        result["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)

    thread = threading.Thread(target=enter, name=f"netns-{pid}")
    thread.start()
    thread.join()
    if "sock" not in result:
        e = result.get("error")
        raise PymachineError(f"cannot enter the network namespace of PID {pid}: {e}")
    return result["sock"]


@contextlib.contextmanager
def netns(pid: int) -> Iterator[IPRoute]:
    """An rtnetlink handle inside the network namespace of process ``pid``."""
    ipr = IPRoute(use_socket=_netns_socket(pid))
    try:
        yield ipr
    finally:
        ipr.close()


def _ignore(codes: tuple[int, ...], call: Any, *args: Any, **kwargs: Any) -> bool:
    """Run a netlink call; False (instead of raising) for the given errno codes."""
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        if e.code in codes:
            return False
        raise
    return True


def index_of(ipr: IPRoute, ifname: str) -> int | None:
    """The interface's index in ``ipr``'s namespace (RTM_GETLINK by name, not a dump)."""
    try:
        links = ipr.get_links(ifname=ifname)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return links[0]["index"] if links else None


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


# --- host side -------------------------------------------------------------------


def ensure_bridge(ipr: IPRoute, net: BridgeNet, ipv6: bool) -> tuple[int, bool]:
    """The bridge, created if missing, with its gateway addresses, up: (ifindex, has IPv6)."""
    index = index_of(ipr, net.name)
    if index is None:
        if not _ignore(
            (errno.EEXIST,),
            ipr.link,
            "add",
            ifname=net.name,
            kind="bridge",
            address=mac_address("bridge:" + net.name),
        ):
            pass  # created by someone else meanwhile
        index = index_of(ipr, net.name)
        if index is None:
            raise PymachineError(f"bridge {net.name!r} vanished while being created")
    link = ipr.get_links(index)[0]
    if _kind(link) != "bridge":
        raise Conflict(f"interface {net.name!r} exists and is not a bridge ({_kind(link)})")
    _ignore(
        (errno.EEXIST,),
        ipr.addr,
        "add",
        index=index,
        address=str(net.gateway),
        prefixlen=net.subnet.prefixlen,
    )
    has6 = (
        ipv6
        and net.subnet6 is not None
        and _add_ipv6(ipr, index, str(net.gateway6), net.subnet6.prefixlen)
    )
    ipr.link("set", index=index, state="up")
    return index, has6


def _add_ipv6(ipr: IPRoute, index: int, address: str, prefixlen: int) -> bool:
    """Add an IPv6 address without duplicate detection; False where IPv6 is
    disabled on this host or interface."""
    try:
        _ignore(
            (errno.EEXIST,),
            ipr.addr,
            "add",
            index=index,
            address=address,
            prefixlen=prefixlen,
            flags=IFA_F_NODAD,
        )
    except NetlinkError as e:
        if e.code not in (errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            raise
        return False
    return True


def create_veth(ipr: IPRoute, machine: str, ifname: str, bridge_index: int, netns_pid: int) -> int:
    """A veth pair: ``ifname`` on the bridge, its peer ``host0`` straight in the machine's netns."""
    ipr.link(
        "add",
        ifname=ifname,
        kind="veth",
        address=mac_address("host:" + machine),
        peer={
            "ifname": CONTAINER_IFNAME,
            "address": mac_address("machine:" + machine),
            "net_ns_pid": netns_pid,
        },
    )
    index = index_of(ipr, ifname)
    if index is None:
        raise PymachineError(f"veth {ifname!r} vanished right after being created")
    ipr.link("set", index=index, master=bridge_index, ifalias=ALIAS_PREFIX + machine, state="up")
    return index


def delete_link(ipr: IPRoute, ifname: str, machine: str) -> bool:
    """Delete the machine's host-side veth if it is there (and is ours); True if deleted."""
    index = index_of(ipr, ifname)
    if index is None:
        return False
    links = ipr.get_links(index)
    if not links:
        return False
    alias = links[0].get("IFLA_IFALIAS")
    if alias not in (None, ALIAS_PREFIX + machine) or _kind(links[0]) != "veth":
        return False  # someone else's interface that happens to have this name
    return _ignore((errno.ENODEV,), ipr.link, "del", index=index)


def pymachine_links(ipr: IPRoute) -> dict[str, str]:
    """Host-side veths pymachine made: ifname → machine (from their alias)."""
    found = {}
    for link in ipr.get_links():
        alias = link.get("IFLA_IFALIAS")
        if alias and alias.startswith(ALIAS_PREFIX) and _kind(link) == "veth":
            found[link.get("IFLA_IFNAME")] = alias[len(ALIAS_PREFIX) :]
    return found


def delete_bridge(ipr: IPRoute, name: str) -> bool:
    index = index_of(ipr, name)
    if index is None:
        return False
    return _ignore((errno.ENODEV,), ipr.link, "del", index=index)


def bridge_ports(ipr: IPRoute, bridge_index: int) -> list[str]:
    return [
        link.get("IFLA_IFNAME")
        for link in ipr.get_links()
        if link.get("IFLA_MASTER") == bridge_index
    ]


def host_networks(ipr: IPRoute, exclude_ifname: str | None = None) -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host already routes or sits in (what a new bridge must avoid)."""
    exclude = index_of(ipr, exclude_ifname) if exclude_ifname else None
    nets = []
    for route in ipr.get_routes(family=socket.AF_INET, table=254):
        dst = route.get("RTA_DST")
        if dst is None or route["dst_len"] == 0 or route.get("RTA_OIF") == exclude:
            continue
        nets.append(ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
    for addr in ipr.get_addr(family=socket.AF_INET):
        if addr["index"] == exclude:
            continue
        nets.append(
            ipaddress.IPv4Network(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
        )
    return [n for n in nets if not n.is_loopback]


# --- machine side ----------------------------------------------------------------


def loopback_up(netns_pid: int) -> None:
    with netns(netns_pid) as ipr:
        ipr.link("set", index=index_of(ipr, "lo"), state="up")


def configure_inside(netns_pid: int, lease: Lease, net: BridgeNet, ipv6: bool) -> None:
    """``lo`` and ``host0`` up, the lease's addresses on ``host0``, default routes via the bridge."""
    address = ipaddress.IPv4Interface(lease.address)
    with netns(netns_pid) as ipr:
        lo = index_of(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        index = index_of(ipr, CONTAINER_IFNAME)
        if index is None:
            raise PymachineError(f"{CONTAINER_IFNAME} is missing in the machine's namespace")
        _ignore(
            (errno.EEXIST,),
            ipr.addr,
            "add",
            index=index,
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
        )
        use6 = ipv6 and lease.address6 is not None and net.gateway6 is not None
        if use6:
            address6 = ipaddress.IPv6Interface(lease.address6)
            use6 = _add_ipv6(ipr, index, str(address6.ip), address6.network.prefixlen)
        ipr.link("set", index=index, state="up")
        _ignore(
            (errno.EEXIST,), ipr.route, "add", dst="0.0.0.0/0", gateway=str(net.gateway), oif=index
        )
        if use6:
            _ignore(
                (errno.EEXIST,),
                ipr.route,
                "add",
                family=socket.AF_INET6,
                dst="::/0",
                gateway=str(net.gateway6),
                oif=index,
            )
