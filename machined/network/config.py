"""The ``[Network]`` section of a machine definition: pure data, import-light.

Imported by :mod:`machined.definition`; nothing here touches the kernel.

``Mode=``   ``none`` (only ``lo`` inside), ``host`` (share the host's network
            namespace), ``bridge`` (a veth pair on a pymachine bridge; default).
``Bridge=`` the bridge's name (created on demand), at most 15 characters.
``Address=`` ``auto`` or a fixed IPv4 address inside the bridge's subnet.
``Port=``   ``[tcp|udp:]HOST[:CONTAINER]``, repeatable, like systemd-nspawn's
            ``--port=``; the container port defaults to the host port.
"""

from __future__ import annotations

import ipaddress
import re
from collections import namedtuple
from enum import StrEnum

from machined.errors import Conflict, InvalidInput
from machined.records import Record

DEFAULT_BRIDGE = "pymachine0"
IFNAMSIZ = 16  # including the terminating NUL: at most 15 characters
PROTOCOLS = ("tcp", "udp")
# Prefixes of the host-side veth names pymachine makes; a bridge must not look like one.
VETH_PREFIXES = ("vm-", "vh-")

_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class NetworkMode(StrEnum):
    NONE = "none"
    HOST = "host"
    BRIDGE = "bridge"


def _port(text: str, what: str, spec: str) -> int:
    if not (text.isascii() and text.isdigit()):  # str.isdigit() alone takes '²' and '٣'
        raise InvalidInput(f"invalid port forward {spec!r}: {what} port {text!r} is not a number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise InvalidInput(f"invalid port forward {spec!r}: {what} port {value} is not in 1…65535")
    return value


# A namedtuple and a plain class, no dataclasses: every start reads a
# definition (see machined.definition).


class PortForward(namedtuple("PortForward", "protocol host_port container_port")):
    """A ``Port=`` line: protocol, host port, container port."""

    __slots__ = ()

    def __new__(cls, protocol: str, host_port: int, container_port: int) -> PortForward:
        if protocol not in PROTOCOLS:
            raise InvalidInput(f"invalid port forward protocol {protocol!r}: tcp or udp")
        for what, value in (("host", host_port), ("container", container_port)):
            if not isinstance(value, int) or not 1 <= value <= 65535:
                raise InvalidInput(f"invalid {what} port {value!r}: not in 1…65535")
        return super().__new__(cls, protocol, host_port, container_port)

    @classmethod
    def parse(cls, text: str) -> PortForward:
        """``[tcp|udp:]HOST[:CONTAINER]``: ``8080:80``, ``udp:53:5353``, ``tcp:22``."""
        spec = text.strip(" \t")
        parts = spec.split(":")
        protocol = "tcp"
        if parts and parts[0].lower() in PROTOCOLS:
            protocol = parts.pop(0).lower()
        elif parts and parts[0] and not parts[0].isdigit():
            raise InvalidInput(
                f"invalid port forward {text!r}: protocol {parts[0]!r} is neither tcp nor udp"
            )
        if len(parts) not in (1, 2) or not all(parts):
            raise InvalidInput(
                f"invalid port forward {text!r}: expected [tcp|udp:]HOST_PORT[:CONTAINER_PORT], "
                "e.g. tcp:8080:80"
            )
        host_port = _port(parts[0], "host", text)
        container_port = _port(parts[1], "container", text) if len(parts) == 2 else host_port
        return cls(protocol, host_port, container_port)

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_port}:{self.container_port}"


def validate_ifname(name: str, what: str = "bridge") -> str:
    """A Linux interface name: 1…15 characters, no '/', ':', whitespace, not '.'/'..'."""
    if not name:
        raise InvalidInput(f"invalid {what} name '': must not be empty")
    if len(name) >= IFNAMSIZ:
        raise InvalidInput(
            f"invalid {what} name {name!r}: {len(name)} characters, at most {IFNAMSIZ - 1} (IFNAMSIZ)"
        )
    if not name.isascii() or not _IFNAME_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use letters, digits, '-', '_' and '.', "
            "not starting with '-' or '.'"
        )
    return name


class NetworkConfig(Record):
    """A definition's ``[Network]`` section (mutable; equal when every attribute is)."""

    def __init__(
        self,
        mode: NetworkMode = NetworkMode.BRIDGE,
        bridge: str = DEFAULT_BRIDGE,
        address: str = "auto",
        ports: list[PortForward] | None = None,
    ) -> None:
        self.mode = mode
        self.bridge = bridge
        self.address = address
        self.ports = ports if ports is not None else []

    def validate(self) -> None:
        try:
            self.mode = NetworkMode(self.mode)
        except ValueError:
            raise InvalidInput(
                f"invalid network mode {self.mode!r}: expected none, host or bridge"
            ) from None
        if self.mode != NetworkMode.BRIDGE:
            if self.ports:
                raise InvalidInput(
                    f"Port= needs Mode=bridge (the machine has Mode={self.mode}): "
                    "there is no private network to forward to"
                )
            if self.address not in ("", "auto"):
                raise InvalidInput(f"Address= needs Mode=bridge (the machine has Mode={self.mode})")
            return
        validate_ifname(self.bridge)
        if self.bridge.startswith(VETH_PREFIXES):
            raise InvalidInput(
                f"invalid bridge name {self.bridge!r}: names starting with "
                f"{' or '.join(VETH_PREFIXES)} are pymachine's veth names"
            )
        if self.bridge in ("lo", "host0"):
            raise InvalidInput(f"invalid bridge name {self.bridge!r}: reserved")
        if self.address not in ("", "auto"):
            self.fixed_address()  # raises InvalidInput
        seen: dict[tuple[str, int], PortForward] = {}
        for port in self.ports:
            key = (port.protocol, port.host_port)
            if key in seen:
                raise InvalidInput(
                    f"duplicate host port {port.protocol}:{port.host_port} "
                    f"(Port={seen[key]} and Port={port})"
                )
            seen[key] = port

    def fixed_address(self) -> ipaddress.IPv4Address | None:
        """The fixed IPv4 address (``Address=10.219.0.5``), or None for ``auto``."""
        if self.address in ("", "auto"):
            return None
        text = self.address.split("/", 1)[0]
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            raise InvalidInput(
                f"invalid address {self.address!r}: expected 'auto' or an IPv4 address "
                "inside the bridge's subnet"
            ) from None
        if address.is_loopback or address.is_multicast or address.is_unspecified:
            raise InvalidInput(f"invalid address {self.address!r}: not a unicast host address")
        return address


def check_ports_free(machine: str, ports, forwarded) -> None:
    """A :class:`Conflict` if a host port of PORTS is one of FORWARDED's
    ``(machine, PortForward)`` of another machine: the first DNAT rule would win
    silently. ``start`` asks the runtime records (:func:`.state.forwarded_ports`)
    before anything starts; the runtime asks the nft table under the network
    lock (:func:`.nft.install_machine`), as the last line of defence."""
    taken = {(p.protocol, p.host_port): owner for owner, p in forwarded if owner != machine}
    for port in ports:
        owner = taken.get((port.protocol, port.host_port))
        if owner is not None:
            raise Conflict(
                f"host port {port.protocol}:{port.host_port} is already forwarded to machine {owner!r}"
            )
