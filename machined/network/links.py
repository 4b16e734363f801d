"""Links, addresses and routes through rtnetlink (:mod:`.rtnl`; no ``ip`` commands).

Imported only by the functions of :mod:`machined.network` that touch the
kernel. :mod:`.rtnl` is ``socket`` + ``struct``: pyroute2, used here before,
cost ~93 ms of import on every bridged start.

Inside a machine's network namespace, a netlink socket is opened by a
short-lived thread that ``setns()``\\ es into ``/proc/PID/ns/net`` (``setns``
acts on the calling thread only; the thread and its namespace go away when it
ends): the socket stays in the namespace it was made in, wherever it is used
from. A thread costs ~3 ms where a forked helper process (pyroute2's
``IPRoute(netns=…)``) cost ~15 ms; it cannot create a namespace by mistake and
does not fork a process that may hold threads and locks. It is a bare
``_thread`` and the sockets are ``_socket``'s: ``threading`` and ``socket``
(its enums) cost a bridged start ~2 and ~3 ms of imports, for nothing used here.
"""

from __future__ import annotations

import _socket as socket
import _thread
import contextlib
import ctypes
import errno
import ipaddress
import os
from collections.abc import Callable, Iterator

from machined.errors import Conflict, PymachineError
from machined.network.addresses import BridgeNet, Lease
from machined.network.leftover import delete_link  # noqa: F401 - gc's too (light: leftover)
from machined.network.rtnl import IFA_F_NODAD, RT_TABLE_MAIN, Link, Rtnl, make_socket, veth_peer
from machined.network.state import ALIAS_PREFIX, CONTAINER_IFNAME, mac_address

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~2 ms in the runtime)
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def host() -> Iterator[Rtnl]:
    """An rtnetlink handle in the caller's own network namespace."""
    with Rtnl() as ipr:
        yield ipr


def _netns_socket(pid: int) -> socket.socket:
    result: dict[str, Any] = {}
    done = _thread.allocate_lock()
    done.acquire()

    def enter() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result["sock"] = make_socket()
        except BaseException as e:  # reported by the caller, not lost in the thread
            result["error"] = e
        finally:
            done.release()

    _thread.start_new_thread(enter, ())
    done.acquire()  # the socket is made; the thread ends (setns changed its namespace only)
    if "sock" not in result:
        e = result.get("error")
        raise PymachineError(f"cannot enter the network namespace of PID {pid}: {e}")
    return result["sock"]


@contextlib.contextmanager
def netns(pid: int) -> Iterator[Rtnl]:
    """An rtnetlink handle inside the network namespace of process ``pid``."""
    with Rtnl(_netns_socket(pid)) as ipr:
        yield ipr


def _ignore(codes: tuple[int, ...], call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Run a netlink call; False (instead of raising) for the given errno codes."""
    try:
        call(*args, **kwargs)
    except OSError as e:
        if e.errno in codes:
            return False
        raise
    return True


def _link(ipr: Rtnl, index: int = 0, ifname: str | None = None) -> Link | None:
    """One link by index or name (RTM_GETLINK, not a dump); None if there is none."""
    try:
        return ipr.get_link(index, ifname)
    except OSError as e:
        if e.errno == errno.ENODEV:
            return None
        raise


def index_of(ipr: Rtnl, ifname: str) -> int | None:
    """The interface's index in ``ipr``'s namespace (RTM_GETLINK by name, not a dump)."""
    link = _link(ipr, ifname=ifname)
    return link.index if link is not None else None


# --- host side -------------------------------------------------------------------


def ensure_bridge(ipr: Rtnl, net: BridgeNet, ipv6: bool) -> tuple[int, bool]:
    """The bridge, created if missing, with its gateway addresses, up: (ifindex, has IPv6)."""
    link = _link(ipr, ifname=net.name)
    if link is None:
        # EEXIST: created by someone else meanwhile
        _ignore(
            (errno.EEXIST,), ipr.add_link, net.name, "bridge", mac_address("bridge:" + net.name)
        )
        link = _link(ipr, ifname=net.name)
        if link is None:
            raise PymachineError(f"bridge {net.name!r} vanished while being created")
    if link.kind != "bridge":
        raise Conflict(f"interface {net.name!r} exists and is not a bridge ({link.kind})")
    _ignore((errno.EEXIST,), ipr.add_address, link.index, str(net.gateway), net.subnet.prefixlen)
    has6 = (
        ipv6
        and net.subnet6 is not None
        and _add_ipv6(ipr, link.index, str(net.gateway6), net.subnet6.prefixlen)
    )
    ipr.set_link(link.index, up=True)
    return link.index, has6


def _add_ipv6(ipr: Rtnl, index: int, address: str, prefixlen: int) -> bool:
    """Add an IPv6 address without duplicate detection; False where IPv6 is
    disabled on this host or interface."""
    try:
        _ignore((errno.EEXIST,), ipr.add_address, index, address, prefixlen, IFA_F_NODAD)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            raise
        return False
    return True


def create_veth(ipr: Rtnl, machine: str, ifname: str, bridge_index: int, netns_pid: int) -> int:
    """A veth pair: ``ifname`` on the bridge, its peer ``host0`` straight in the machine's netns."""
    peer = veth_peer(CONTAINER_IFNAME, mac_address("machine:" + machine), netns_pid)
    ipr.add_link(ifname, "veth", mac_address("host:" + machine), peer)
    index = index_of(ipr, ifname)
    if index is None:
        raise PymachineError(f"veth {ifname!r} vanished right after being created")
    ipr.set_link(index, up=True, master=bridge_index, alias=ALIAS_PREFIX + machine)
    return index


def pymachine_links(ipr: Rtnl) -> dict[str, str]:
    """Host-side veths pymachine made: ifname → machine (from their alias)."""
    found = {}
    for link in ipr.links():
        alias = link.alias
        if alias and alias.startswith(ALIAS_PREFIX) and link.kind == "veth" and link.ifname:
            found[link.ifname] = alias[len(ALIAS_PREFIX) :]
    return found


def delete_bridge(ipr: Rtnl, name: str) -> bool:
    index = index_of(ipr, name)
    if index is None:
        return False
    return _ignore((errno.ENODEV,), ipr.del_link, index)


def bridge_ports(ipr: Rtnl, bridge_index: int) -> list[str]:
    return [link.ifname for link in ipr.links() if link.master == bridge_index and link.ifname]


def host_networks(ipr: Rtnl, exclude_ifname: str | None = None) -> list[ipaddress.IPv4Network]:
    """IPv4 networks the host already routes or sits in (what a new bridge must avoid):
    the routes of table main (not the default ones) and the interfaces' addresses."""
    exclude = index_of(ipr, exclude_ifname) if exclude_ifname else None
    nets = []
    for route in ipr.routes(socket.AF_INET):
        if route.table != RT_TABLE_MAIN or route.dst is None or route.dst_len == 0:
            continue
        if exclude is not None and route.oif == exclude:
            continue
        nets.append(ipaddress.IPv4Network(f"{route.dst}/{route.dst_len}", strict=False))
    for addr in ipr.addresses(socket.AF_INET):
        if addr.index == exclude or addr.address is None:
            continue
        nets.append(ipaddress.IPv4Network(f"{addr.address}/{addr.prefixlen}", strict=False))
    return [n for n in nets if not n.is_loopback]


# --- machine side ----------------------------------------------------------------


def loopback_up(netns_pid: int) -> None:
    with netns(netns_pid) as ipr:
        index = index_of(ipr, "lo")
        if index is not None:
            ipr.set_link(index, up=True)


def configure_inside(netns_pid: int, lease: Lease, net: BridgeNet, ipv6: bool) -> None:
    """``lo`` and ``host0`` up, the lease's addresses on ``host0``, default routes via the bridge."""
    address = ipaddress.IPv4Interface(lease.address)
    with netns(netns_pid) as ipr:
        lo = index_of(ipr, "lo")
        if lo is not None:
            ipr.set_link(lo, up=True)
        index = index_of(ipr, CONTAINER_IFNAME)
        if index is None:
            raise PymachineError(f"{CONTAINER_IFNAME} is missing in the machine's namespace")
        _ignore((errno.EEXIST,), ipr.add_address, index, str(address.ip), address.network.prefixlen)
        use6 = ipv6 and lease.address6 is not None and net.gateway6 is not None
        if use6:
            address6 = ipaddress.IPv6Interface(lease.address6)
            use6 = _add_ipv6(ipr, index, str(address6.ip), address6.network.prefixlen)
        ipr.set_link(index, up=True)
        _ignore((errno.EEXIST,), ipr.add_default_route, str(net.gateway), index)
        if use6:
            _ignore((errno.EEXIST,), ipr.add_default_route, str(net.gateway6), index)
