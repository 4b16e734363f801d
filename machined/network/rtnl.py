"""A small rtnetlink client (``NETLINK_ROUTE``) with ``_socket`` and ``struct`` only.

Why not pyroute2: ``import pyroute2`` (0.9.7; any submodule import pulls in the
whole package) cost ~93 ms of a ~230 ms bridged start in the tier-1 host, where
nspawn starts in ~55 ms. pymachine needs a handful of messages — links (bridge,
veth with its peer made in another netns), addresses, default routes, and dumps
of links, addresses and routes — which fit in this module, as
:mod:`machined.network.loopback` brings ``lo`` up with one ioctl.

Wire format (``linux/netlink.h``, ``linux/rtnetlink.h``): a message is a 16-byte
``nlmsghdr``, a fixed family header (``ifinfomsg``, ``ifaddrmsg``, ``rtmsg``) and
attributes (``rtattr``: length, type, payload, padded to 4 bytes; a nested
attribute's payload is attributes). Requests carry ``NLM_F_ACK``: the kernel
answers each with an ``NLMSG_ERROR`` whose code is 0 or ``-errno``, raised here
as :class:`OSError` (with the kernel's extended-ack text when it gives one).
Dumps (``NLM_F_DUMP``) are read until ``NLMSG_DONE``.

Policy (names, MAC addresses, aliases, which errors to ignore) stays in
:mod:`machined.network.links`.

``_socket`` (the C module behind ``socket``) and no ``contextlib`` or
``collections.abc`` at run time: a stop's clean-up that finds the machine's
veth still there (the kernel removes a dead netns' veth asynchronously)
deletes it through this module, and ``socket`` (with ``selectors``, ``enum``,
``array``) alone costs ~3 ms there.
"""

from __future__ import annotations

import _socket as socket
import errno
import os
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator

# linux/netlink.h
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: the request's payload is not echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ack attributes follow
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11

# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what `ip route add` sets
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15

# linux/if_link.h, linux/if_addr.h, linux/veth.h, linux/if.h
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER = 1, 3, 10
IFLA_LINKINFO, IFLA_NET_NS_PID, IFLA_IFALIAS = 18, 19, 20
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
IFF_UP = 0x1

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
RTATTR = struct.Struct("=HH")  # length, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
ERRCODE = struct.Struct("=i")

RECV_SIZE = 1 << 16  # the kernel fills a dump's datagram up to 32 KiB


def _align(length: int) -> int:
    return (length + 3) & ~3


# --- encoding ---------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the length field excludes the padding)."""
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def attr_str(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING both take it)."""
    return attr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def nested(kind: int, *attrs: bytes) -> bytes:
    """An attribute whose payload is attributes (without NLA_F_NESTED, as iproute2 sends)."""
    return attr(kind, b"".join(attrs))


def pack_message(kind: int, flags: int, seq: int, body: bytes, port: int = 0) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, port) + body


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def ifaddrmsg(family: int, prefixlen: int = 0, flags: int = 0, index: int = 0) -> bytes:
    return IFADDRMSG.pack(family, prefixlen, flags, RT_SCOPE_UNIVERSE, index)


def rtmsg(family: int, dst_len: int = 0, table: int = RT_TABLE_MAIN) -> bytes:
    """A unicast route's header as ``ip route add`` makes it (protocol boot, scope universe)."""
    return RTMSG.pack(family, dst_len, 0, 0, table, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)


def mac_bytes(mac: str) -> bytes:
    """``"02:ab:…"`` → 6 bytes."""
    return bytes.fromhex(mac.replace(":", ""))


def link_body(
    ifname: str, kind: str | None = None, address: str | None = None, data: bytes = b""
) -> bytes:
    """An ``ifinfomsg`` with a name, a MAC address and ``IFLA_LINKINFO`` (kind, kind's data)."""
    body = ifinfomsg() + attr_str(IFLA_IFNAME, ifname)
    if address is not None:
        body += attr(IFLA_ADDRESS, mac_bytes(address))
    if kind is not None:
        info = attr_str(IFLA_INFO_KIND, kind)
        if data:
            info += attr(IFLA_INFO_DATA, data)
        body += nested(IFLA_LINKINFO, info)
    return body


def veth_peer(ifname: str, address: str, netns_pid: int) -> bytes:
    """``IFLA_INFO_DATA`` of a veth: its peer (an ``ifinfomsg`` and attributes, as
    for a link of its own), made straight in the network namespace of ``netns_pid``."""
    peer = link_body(ifname, address=address) + attr_u32(IFLA_NET_NS_PID, netns_pid)
    return attr(VETH_INFO_PEER, peer)


# --- decoding ---------------------------------------------------------------------


class Message:
    """One netlink message: header fields and the payload after the header."""

    __slots__ = ("kind", "flags", "seq", "port", "body")

    def __init__(self, kind: int, flags: int, seq: int, port: int, body: bytes) -> None:
        self.kind, self.flags, self.seq, self.port, self.body = kind, flags, seq, port, body

    def __repr__(self) -> str:
        return f"Message(kind={self.kind}, flags={self.flags:#x}, seq={self.seq}, {len(self.body)} bytes)"


def parse_messages(data: bytes) -> list[Message]:
    """The messages of one datagram (a dump packs several)."""
    messages, offset = [], 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"truncated netlink message ({length} bytes at {offset})")
        body = data[offset + NLMSGHDR.size : offset + length]
        messages.append(Message(kind, flags, seq, port, body))
        offset += _align(length)
    return messages


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attributes from ``offset`` on: type (flags masked off) → payload; the last one wins."""
    attrs = {}
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            raise ValueError(f"truncated attribute ({length} bytes at {offset})")
        attrs[kind & NLA_TYPE_MASK] = data[offset + RTATTR.size : offset + length]
        offset += _align(length)
    return attrs


def decode_str(payload: bytes | None) -> str | None:
    return None if payload is None else payload.split(b"\0", 1)[0].decode(errors="replace")


def decode_u32(payload: bytes | None) -> int | None:
    return None if payload is None else struct.unpack_from("=I", payload)[0]


class Link:
    """An ``RTM_NEWLINK`` message: index, flags and the attributes pymachine reads."""

    __slots__ = ("index", "flags", "attrs")

    def __init__(self, body: bytes) -> None:
        _family, _type, self.index, self.flags, _change = IFINFOMSG.unpack_from(body)
        self.attrs = parse_attrs(body, IFINFOMSG.size)

    @property
    def ifname(self) -> str | None:
        return decode_str(self.attrs.get(IFLA_IFNAME))

    @property
    def alias(self) -> str | None:
        return decode_str(self.attrs.get(IFLA_IFALIAS))

    @property
    def master(self) -> int | None:
        return decode_u32(self.attrs.get(IFLA_MASTER))

    @property
    def kind(self) -> str | None:
        info = self.attrs.get(IFLA_LINKINFO)
        return None if info is None else decode_str(parse_attrs(info).get(IFLA_INFO_KIND))

    def __repr__(self) -> str:
        return f"Link({self.index}, {self.ifname!r}, kind={self.kind!r})"


class Address:
    """An ``RTM_NEWADDR`` message: family, prefix length, interface and ``IFA_ADDRESS``."""

    __slots__ = ("family", "prefixlen", "flags", "index", "address")

    def __init__(self, body: bytes) -> None:
        self.family, self.prefixlen, self.flags, _scope, self.index = IFADDRMSG.unpack_from(body)
        raw = parse_attrs(body, IFADDRMSG.size).get(IFA_ADDRESS)
        self.address = None if raw is None else socket.inet_ntop(self.family, raw)


class Route:
    """An ``RTM_NEWROUTE`` message: destination, table, output interface."""

    __slots__ = ("family", "dst_len", "table", "dst", "oif")

    def __init__(self, body: bytes) -> None:
        self.family, self.dst_len, _src, _tos, table, *_rest = RTMSG.unpack_from(body)
        attrs = parse_attrs(body, RTMSG.size)
        self.table = decode_u32(attrs.get(RTA_TABLE)) or table  # RTA_TABLE: tables > 255
        dst = attrs.get(RTA_DST)
        self.dst = None if dst is None else socket.inet_ntop(self.family, dst)
        self.oif = decode_u32(attrs.get(RTA_OIF))


def error_of(message: Message) -> OSError | None:
    """An ``NLMSG_ERROR`` (or ``NLMSG_DONE``) as an OSError; None for an ack (code 0)."""
    if len(message.body) < ERRCODE.size:
        return None
    code = -ERRCODE.unpack_from(message.body)[0]
    if code <= 0:
        return None
    text = os.strerror(code)
    if message.kind == NLMSG_ERROR and message.flags & NLM_F_ACK_TLVS:
        echoed = NLMSGHDR.size
        if not message.flags & NLM_F_CAPPED and len(message.body) >= ERRCODE.size + echoed:
            echoed = NLMSGHDR.unpack_from(message.body, ERRCODE.size)[0]
        with_attrs = parse_attrs(message.body, ERRCODE.size + _align(echoed))
        detail = decode_str(with_attrs.get(NLMSGERR_ATTR_MSG))
        if detail:
            text = f"{text} ({detail})"
    return OSError(code, text)


# --- the socket -------------------------------------------------------------------


def make_socket() -> socket.socket:
    """A NETLINK_ROUTE socket in the calling thread's network namespace (it keeps
    that namespace wherever it is used from)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:  # noqa: SIM105 - contextlib costs ~2 ms of imports here
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    except OSError:  # kernels before 4.12: no error texts, same codes
        pass
    return sock


class Rtnl:
    """A handle on one NETLINK_ROUTE socket (the caller's netns unless ``sock`` is given)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else make_socket()
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(pack_message(kind, NLM_F_REQUEST | flags, self.seq, body))
        return self.seq

    def _replies(self, seq: int) -> Iterator[Message]:
        """Messages answering ``seq``, datagram after datagram (the caller stops)."""
        while True:
            data, _ancdata, flags, _addr = self.sock.recvmsg(RECV_SIZE)
            if flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, f"netlink reply larger than {RECV_SIZE} bytes")
            for message in parse_messages(data):
                if message.seq == seq:
                    yield message

    def request(self, kind: int, body: bytes, flags: int = 0) -> list[Message]:
        """Send one request with NLM_F_ACK; its replies (a GET's answer) before the ack.
        Raises OSError(errno) if the kernel refused it."""
        seq = self._send(kind, NLM_F_ACK | flags, body)
        replies = []
        for message in self._replies(seq):
            if message.kind == NLMSG_ERROR:
                error = error_of(message)
                if error is not None:
                    raise error
                return replies
            replies.append(message)
        raise AssertionError("unreachable")  # pragma: no cover

    def dump(self, kind: int, body: bytes) -> list[Message]:
        """An NLM_F_DUMP request: every message until NLMSG_DONE."""
        seq = self._send(kind, NLM_F_DUMP, body)
        replies = []
        for message in self._replies(seq):
            if message.kind in (NLMSG_DONE, NLMSG_ERROR):
                error = error_of(message)
                if error is not None:
                    raise error
                if message.kind == NLMSG_DONE:
                    return replies
            elif message.kind != NLMSG_NOOP:
                replies.append(message)
        raise AssertionError("unreachable")  # pragma: no cover

    # --- links

    def get_link(self, index: int = 0, ifname: str | None = None) -> Link:
        """One link by index or by name (ENODEV if there is none)."""
        body = ifinfomsg(index=index)
        if ifname is not None:
            body += attr_str(IFLA_IFNAME, ifname)
        for message in self.request(RTM_GETLINK, body):
            if message.kind == RTM_NEWLINK:
                return Link(message.body)
        raise OSError(
            errno.ENODEV, f"no RTM_NEWLINK in the answer to RTM_GETLINK {ifname or index}"
        )

    def links(self) -> list[Link]:
        return [Link(m.body) for m in self.dump(RTM_GETLINK, ifinfomsg()) if m.kind == RTM_NEWLINK]

    def add_link(
        self, ifname: str, kind: str, address: str | None = None, data: bytes = b""
    ) -> None:
        """Create a link (EEXIST if the name is taken)."""
        self.request(RTM_NEWLINK, link_body(ifname, kind, address, data), NLM_F_CREATE | NLM_F_EXCL)

    def set_link(
        self, index: int, up: bool = False, master: int | None = None, alias: str | None = None
    ) -> None:
        """Change a link in one message: its master, its alias, IFF_UP."""
        body = ifinfomsg(index=index, flags=IFF_UP if up else 0, change=IFF_UP if up else 0)
        if master is not None:
            body += attr_u32(IFLA_MASTER, master)
        if alias is not None:
            body += attr(IFLA_IFALIAS, alias.encode())  # as iproute2 sends it: no NUL
        self.request(RTM_SETLINK, body)

    def del_link(self, index: int) -> None:
        self.request(RTM_DELLINK, ifinfomsg(index=index))

    # --- addresses and routes

    def add_address(self, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        """Add an address (EEXIST if it is there); IPv4 gets IFA_LOCAL too, as from ``ip``."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        raw = socket.inet_pton(family, address)
        body = ifaddrmsg(family, prefixlen, flags, index) + attr(IFA_ADDRESS, raw)
        if family == socket.AF_INET:
            body += attr(IFA_LOCAL, raw)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)

    def addresses(self, family: int) -> list[Address]:
        messages = self.dump(RTM_GETADDR, ifaddrmsg(family))
        return [Address(m.body) for m in messages if m.kind == RTM_NEWADDR]

    def add_default_route(self, gateway: str, oif: int) -> None:
        """A default route via ``gateway`` on ``oif``, table main (EEXIST if there is one)."""
        family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
        body = (
            rtmsg(family)
            + attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
            + attr_u32(RTA_OIF, oif)
        )
        self.request(RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_EXCL)

    def routes(self, family: int) -> list[Route]:
        """The family's routes of every table (filter on :attr:`Route.table`)."""
        messages = self.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
        return [Route(m.body) for m in messages if m.kind == RTM_NEWROUTE]
