"""Links, addresses and routes through rtnetlink, with pyroute2 (no ``ip`` commands).

pymachined imports it once; a process that only lists machines or writes
``/etc`` files never does (:mod:`machined.network` imports it inside the
functions that touch the kernel: pyroute2's import costs ~130 ms).

Inside a machine's network namespace, the netlink socket is made by a
short-lived thread that ``setns()``\\ es into the namespace of the machine's
PID 1 (``setns(CLONE_NEWNET)`` acts on the calling thread only, which then
ends): a socket stays in the namespace it was made in, wherever it is used
from, and pyroute2 takes it as ``IPRoute(use_socket=…)``. pyroute2's own
``IPRoute(netns=…)`` forks a helper process per socket (~15 ms, and a fork of
a process with threads); a thread costs a fraction of that.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns

from machined.errors import Conflict, PymachineError
from machined.network.addresses import BridgeNet, Lease
from machined.network.state import ALIAS_PREFIX, CONTAINER_IFNAME, mac_address

RT_TABLE_MAIN = 254
LOOPBACK_IFINDEX = 1  # the kernel's, in every network namespace (LOOPBACK_IFINDEX)


@contextmanager
def host() -> Iterator[IPRoute]:
    """An rtnetlink handle in the caller's own network namespace."""
    with IPRoute() as ipr:
        yield ipr


def netns_socket(netns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket in the network namespace NETNS_FD refers to."""
    result: dict[str, Any] = {}

    def enter() -> None:
        try:
            setns(netns_fd)  # this thread only; it ends right after
            result["sock"] = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
        except BaseException as exc:  # reported by the caller, not lost in the thread
            result["error"] = exc

    thread = threading.Thread(target=enter, name="pymachine-netns")
    thread.start()
    thread.join()
    if "sock" not in result:
        raise PymachineError(f"cannot enter the machine's network namespace: {result.get('error')}")
    return result["sock"]


@contextmanager
def netns(netns_fd: int) -> Iterator[IPRoute]:
    """An rtnetlink handle inside the network namespace NETNS_FD refers to."""
    with IPRoute(use_socket=netns_socket(netns_fd)) as ipr:
        yield ipr


def _ignore(codes: tuple[int, ...], call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run a netlink call; False (instead of raising) for the given errno codes."""
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code in codes:
            return False
        raise
    return True


def _link(ipr: IPRoute, ifname: str) -> Any | None:
    """One link by name (RTM_GETLINK with IFLA_IFNAME: pyroute2's
    ``get_links(ifname=…)`` dumps every link and filters); None if there is none."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def index_of(ipr: IPRoute, ifname: str) -> int | None:
    """The interface's index in ``ipr``'s namespace."""
    link = _link(ipr, ifname)
    return link["index"] if link is not None else None


#: Bridges this process has set up, by namespace and name. A bridge found again with
#: the same index is taken as set up (its addresses and state are the
#: administrator's to change after that): every start then asks for the
#: bridge once rather than four times (get, two addresses, up).
_bridges_set_up: dict[tuple[int, str], tuple[int, bool]] = {}  # → (ifindex, has IPv6)


def _bridge_key(name: str) -> tuple[int, str]:
    """The calling thread's network namespace and a bridge name (``host()``
    handles act in the caller's namespace; tests make many)."""
    return os.stat("/proc/thread-self/ns/net").st_ino, name


# --- host side -------------------------------------------------------------------


def ensure_bridge(ipr: IPRoute, net: BridgeNet, ipv6: bool) -> tuple[int, bool]:
    """The bridge, created if missing, with its gateway addresses, up: (ifindex, has IPv6)."""
    link = _link(ipr, net.name)
    known = _bridges_set_up.get(_bridge_key(net.name))
    if link is not None and known is not None and known[0] == link["index"]:
        return known[0], known[1] and ipv6
    if link is None:
        # EEXIST: created by someone else meanwhile
        _ignore(
            (errno.EEXIST,),
            ipr.link,
            "add",
            ifname=net.name,
            kind="bridge",
            address=mac_address("bridge:" + net.name),
        )
        link = _link(ipr, net.name)
        if link is None:
            raise PymachineError(f"bridge {net.name!r} vanished while being created")
    kind = _kind(link)
    if kind != "bridge":
        raise Conflict(f"interface {net.name!r} exists and is not a bridge ({kind})")
    index = link["index"]
    _add_address(ipr, index, str(net.gateway), net.subnet.prefixlen)
    has6 = (
        ipv6
        and net.subnet6 is not None
        and _add_ipv6(ipr, index, str(net.gateway6), net.subnet6.prefixlen)
    )
    ipr.link("set", index=index, state="up")
    _bridges_set_up[_bridge_key(net.name)] = (index, has6)
    return index, has6


#: IFA_F_NODAD: no duplicate address detection, so the address works at once
IFA_F_NODAD = 0x02


def _add_address(ipr: IPRoute, index: int, address: str, prefixlen: int, **extra: Any) -> None:
    """Add an address to the interface; one it already has is no error."""
    _ignore(
        (errno.EEXIST,),
        ipr.addr,
        "add",
        index=index,
        address=address,
        prefixlen=prefixlen,
        **extra,
    )


def _add_ipv6(ipr: IPRoute, index: int, address: str, prefixlen: int) -> bool:
    """Add an IPv6 address without duplicate detection; False where IPv6 is
    disabled on this host or interface."""
    try:
        _add_address(ipr, index, address, prefixlen, flags=IFA_F_NODAD)
    except NetlinkError as exc:
        if exc.code not in (errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            raise
        return False
    return True


def create_veth(
    ipr: IPRoute, machine: str, ifname: str, bridge_index: int, netns_fd: int
) -> tuple[int, int]:
    """A veth pair: ``ifname`` on the bridge and up (set in the creating
    request), its peer ``host0`` straight in the machine's netns: (the host
    side's index, the peer's index in the machine's namespace)."""
    ipr.link(
        "add",
        ifname=ifname,
        kind="veth",
        address=mac_address("host:" + machine),
        master=bridge_index,
        state="up",
        peer={
            "ifname": CONTAINER_IFNAME,
            "address": mac_address("machine:" + machine),
            "net_ns_fd": netns_fd,
        },
    )
    link = _link(ipr, ifname)
    if link is None:
        raise PymachineError(f"veth {ifname!r} vanished right after being created")
    ipr.link("set", index=link["index"], ifalias=ALIAS_PREFIX + machine)  # not taken at creation
    return link["index"], link.get("IFLA_LINK")  # a veth's link is its peer


def pymachine_links(ipr: IPRoute) -> dict[str, str]:
    """Host-side veths pymachine made: ifname → machine (from their alias)."""
    found = {}
    for link in ipr.get_links():
        alias = link.get("IFLA_IFALIAS")
        ifname = link.get("IFLA_IFNAME")
        if alias and alias.startswith(ALIAS_PREFIX) and _kind(link) == "veth" and ifname:
            found[ifname] = alias[len(ALIAS_PREFIX) :]
    return found


def delete_link(ipr: IPRoute, ifname: str, machine: str) -> bool:
    """Delete the machine's host-side veth if it is there (and is ours); True if deleted."""
    link = _link(ipr, ifname)
    if link is None:
        return False
    alias = link.get("IFLA_IFALIAS")
    if alias not in (None, ALIAS_PREFIX + machine) or _kind(link) != "veth":
        return False  # someone else's interface that happens to have this name
    return _ignore((errno.ENODEV,), ipr.link, "del", index=link["index"])


def delete_bridge(ipr: IPRoute, name: str) -> bool:
    index = index_of(ipr, name)
    if index is None:
        return False
    return _ignore((errno.ENODEV,), ipr.link, "del", index=index)


def bridge_ports(ipr: IPRoute, bridge_index: int) -> list[str]:
    return [
        link.get("IFLA_IFNAME")
        for link in ipr.get_links()
        if link.get("IFLA_MASTER") == bridge_index and link.get("IFLA_IFNAME")
    ]


def host_networks(ipr: IPRoute, exclude_ifname: str | None = None) -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host already routes or sits in (what a new bridge must avoid):
    the routes of table main (not the default ones) and the interfaces' addresses."""
    exclude = index_of(ipr, exclude_ifname) if exclude_ifname else None
    nets = []
    for route in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
        dst = route.get("RTA_DST")
        if dst is None or route["dst_len"] == 0:
            continue
        if exclude is not None and route.get("RTA_OIF") == exclude:
            continue
        nets.append(ipaddress.IPv4Network(f"{dst}/{route['dst_len']}", strict=False))
    for addr in ipr.get_addr(family=socket.AF_INET):
        address = addr.get("IFA_ADDRESS")
        if addr["index"] == exclude or address is None:
            continue
        nets.append(ipaddress.IPv4Network(f"{address}/{addr['prefixlen']}", strict=False))
    return [n for n in nets if not n.is_loopback]


# --- machine side ----------------------------------------------------------------


def configure_inside(
    netns_fd: int, lease: Lease, net: BridgeNet, ipv6: bool, index: int | None = None
) -> None:
    """``lo`` and ``host0`` (INDEX, when the caller knows it) up, the lease's
    addresses on ``host0``, default routes via the bridge."""
    address = ipaddress.IPv4Interface(lease.address)
    with netns(netns_fd) as ipr:
        ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
        if index is None:
            index = index_of(ipr, CONTAINER_IFNAME)
        if index is None:
            raise PymachineError(f"{CONTAINER_IFNAME} is missing in the machine's namespace")
        _add_address(ipr, index, str(address.ip), address.network.prefixlen)
        use6 = ipv6 and lease.address6 is not None and net.gateway6 is not None
        if use6:
            address6 = ipaddress.IPv6Interface(lease.address6)
            use6 = _add_ipv6(ipr, index, str(address6.ip), address6.network.prefixlen)
        ipr.link("set", index=index, state="up")
        _ignore((errno.EEXIST,), ipr.route, "add", gateway=str(net.gateway), oif=index)
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


def open_netns(pid: int) -> int:
    """A descriptor of the network namespace of process PID (close it)."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
