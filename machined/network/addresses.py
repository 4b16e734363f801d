"""Address management (IPAM): one subnet per bridge, one persisted lease per machine.

Everything lives under ``paths.state / "network"`` and is changed only while
holding an exclusive ``fcntl.flock`` on ``.lock`` there, so machines started at
the same moment (separate processes) get distinct addresses. Files are replaced
atomically (write + fsync + rename), so readers such as :func:`lease_of`
(``pymachine list``) need no lock.

``bridges.json`` is both the configuration and the record of what was chosen;
an administrator may create or edit it before a bridge is first used::

    {
      "pool": "10.219.0.0/16",          # where /24s for new bridges come from
      "prefix": 24,                     # size of those subnets
      "ula": "fdXX:XXXX:XXXX::/48",     # random RFC 4193 prefix, made once
      "bridges": {
        "pymachine0": {"subnet": "10.219.0.0/24", "subnet6": "fdXX:XXXX:XXXX::/64"},
        "lab0": {"subnet": "192.168.240.0/24", "ipv6": false}
      }
    }

Defaults: the pool is ``10.219.0.0/16`` (not used by docker — 172.17/16 and
up, 192.168/16 pools —, podman — 10.88/16, 10.89/16 —, libvirt — 192.168.122/24
—, LXC — 10.0.3/24 —, Kubernetes' usual 10.96/12 and 10.244/16, or Tailscale's
100.64/10). A new bridge gets the first /24 of the pool that overlaps neither
another pymachine bridge nor a route the host already has (the caller passes
those). Every bridge also gets a /64 of the ULA prefix unless ``"ipv6": false``.

The gateway (the bridge's own address) is the first host of each subnet;
machines get the lowest free host address from the second on, and the IPv6
address with the same host part (10.219.0.7 ↔ fdXX:XXXX:XXXX::7), so the two
are easy to relate. ``leases.json`` maps machine → lease; a lease is kept across
restarts and dropped by :func:`release` when the machine is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machined.errors import Conflict, InvalidInput, PymachineError
from machined.paths import Paths

DEFAULT_POOL = "10.219.0.0/16"
DEFAULT_PREFIX = 24
BRIDGES_FILE = "bridges.json"
LEASES_FILE = "leases.json"
LOCK_FILE = ".lock"

IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network


def network_dir(paths: Paths) -> Path:
    return paths.state / "network"


@dataclass(frozen=True)
class BridgeNet:
    """A bridge's subnets; the gateway is the first host address of each."""

    name: str
    subnet: IPv4Network
    subnet6: IPv6Network | None = None

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def gateway6(self) -> ipaddress.IPv6Address | None:
        return None if self.subnet6 is None else self.subnet6.network_address + 1

    def address6_for(self, address: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
        if self.subnet6 is None:
            return None
        return self.subnet6.network_address + (int(address) - int(self.subnet.network_address))


@dataclass(frozen=True)
class Lease:
    """A machine's persisted addresses on a bridge."""

    machine: str
    bridge: str
    address: str  # "10.219.0.2/24"
    address6: str | None = None  # "fd..::2/64"

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {"bridge": self.bridge, "address": self.address, "address6": self.address6}

    @classmethod
    def from_json(cls, machine: str, data: dict[str, Any]) -> Lease:
        return cls(machine, data["bridge"], data["address"], data.get("address6"))


# --- files ---------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise PymachineError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise PymachineError(f"cannot read {path}: not a JSON object")
    return data


def write_json_atomic(path: Path, data: Any, durable: bool = True) -> None:
    """Replace ``path`` atomically; ``durable`` also fsyncs (not needed on /run's tmpfs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    """Hold the network lock: allocation, bridge creation and nft changes go through it."""
    directory = network_dir(paths)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load_leases(paths: Paths) -> dict[str, Lease]:
    data = _read_json(network_dir(paths) / LEASES_FILE)
    leases = {}
    for machine, entry in data.items():
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            leases[machine] = Lease.from_json(machine, entry)
    return leases


def _save_leases(paths: Paths, leases: dict[str, Lease]) -> None:
    write_json_atomic(
        network_dir(paths) / LEASES_FILE, {m: lease.to_json() for m, lease in leases.items()}
    )


def lease_of(paths: Paths, machine: str) -> Lease | None:
    """A machine's lease, read without the lock (the file is replaced atomically)."""
    return load_leases(paths).get(machine)


def leases_on(paths: Paths, bridge: str) -> list[Lease]:
    return sorted(
        (lease for lease in load_leases(paths).values() if lease.bridge == bridge),
        key=lambda lease: ipaddress.IPv4Address(lease.ip),
    )


# --- bridges -------------------------------------------------------------------


def _parse_net4(text: Any, where: str) -> IPv4Network:
    try:
        return ipaddress.IPv4Network(str(text), strict=True)
    except ValueError as e:
        raise InvalidInput(f"{where}: invalid IPv4 subnet {text!r}: {e}") from None


def _parse_net6(text: Any, where: str) -> IPv6Network:
    try:
        return ipaddress.IPv6Network(str(text), strict=True)
    except ValueError as e:
        raise InvalidInput(f"{where}: invalid IPv6 subnet {text!r}: {e}") from None


def _random_ula() -> IPv6Network:
    """An RFC 4193 prefix: fd00::/8 + a 40-bit random global ID."""
    import secrets

    global_id = int.from_bytes(secrets.token_bytes(5), "big")
    return ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 48))


def load_bridge(paths: Paths, bridge: str) -> BridgeNet | None:
    """A bridge's recorded subnets, or None if it was never set up (no lock needed)."""
    entry = _read_json(network_dir(paths) / BRIDGES_FILE).get("bridges", {}).get(bridge)
    if not isinstance(entry, dict) or "subnet" not in entry:
        return None
    where = str(network_dir(paths) / BRIDGES_FILE)
    subnet6 = entry.get("subnet6")
    return BridgeNet(
        bridge,
        _parse_net4(entry["subnet"], where),
        _parse_net6(subnet6, where) if subnet6 and entry.get("ipv6", True) else None,
    )


def bridge_network(
    paths: Paths,
    bridge: str,
    avoid: Callable[[], Iterable[IPv4Network]] = tuple,
) -> BridgeNet:
    """The bridge's subnets, choosing and recording them on first use. Hold :func:`locked`.

    ``avoid`` is called only when a new IPv4 subnet must be chosen; it returns
    networks the host already routes (so a new bridge never shadows the LAN).
    """
    path = network_dir(paths) / BRIDGES_FILE
    where = str(path)
    data = _read_json(path)
    bridges = data.setdefault("bridges", {})
    if not isinstance(bridges, dict):
        raise InvalidInput(f"{where}: 'bridges' must be an object")
    entry = bridges.setdefault(bridge, {})
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: bridge {bridge!r} must be an object")
    changed = False

    others4 = [
        _parse_net4(e["subnet"], where)
        for name, e in bridges.items()
        if name != bridge and isinstance(e, dict) and "subnet" in e
    ]
    if "subnet" in entry:
        subnet = _parse_net4(entry["subnet"], where)
        if subnet.prefixlen > 30:
            raise InvalidInput(f"{where}: subnet {subnet} of bridge {bridge!r} is too small")
        for other in others4:
            if subnet.overlaps(other):
                raise InvalidInput(
                    f"{where}: subnet {subnet} of bridge {bridge!r} overlaps {other}"
                )
    else:
        pool = _parse_net4(data.get("pool", DEFAULT_POOL), where)
        prefix = int(data.get("prefix", DEFAULT_PREFIX))
        if not pool.prefixlen <= prefix <= 30:
            raise InvalidInput(f"{where}: prefix {prefix} does not fit pool {pool}")
        taken = others4 + list(avoid())
        for candidate in pool.subnets(new_prefix=prefix):
            if not any(candidate.overlaps(t) for t in taken):
                subnet = candidate
                break
        else:
            raise Conflict(
                f"no free /{prefix} left in {pool} for bridge {bridge!r}: "
                f"set a subnet for it in {where}"
            )
        entry["subnet"] = str(subnet)
        changed = True

    subnet6 = None
    if entry.get("ipv6", True):
        if "subnet6" in entry:
            subnet6 = _parse_net6(entry["subnet6"], where)
            if subnet6.prefixlen > 120:
                raise InvalidInput(f"{where}: subnet6 {subnet6} of bridge {bridge!r} is too small")
        else:
            if "ula" not in data:
                data["ula"] = str(_random_ula())
                changed = True
            ula = _parse_net6(data["ula"], where)
            others6 = [
                _parse_net6(e["subnet6"], where)
                for name, e in bridges.items()
                if name != bridge and isinstance(e, dict) and "subnet6" in e
            ]
            for candidate in ula.subnets(new_prefix=64):
                if not any(candidate.overlaps(o) for o in others6):
                    subnet6 = candidate
                    break
            else:
                raise Conflict(f"no free /64 left in {ula}: set subnet6 for {bridge!r} in {where}")
            entry["subnet6"] = str(subnet6)
            changed = True
        # the machine's v6 host part mirrors its v4 one: the /64 must hold the v4 range
        if subnet6.num_addresses < subnet.num_addresses:
            raise InvalidInput(f"{where}: subnet6 {subnet6} is smaller than subnet {subnet}")

    if changed:
        write_json_atomic(path, data)
    return BridgeNet(bridge, subnet, subnet6)


# --- leases --------------------------------------------------------------------


def allocate(
    paths: Paths,
    machine: str,
    net: BridgeNet,
    fixed: ipaddress.IPv4Address | None = None,
) -> tuple[Lease, bool]:
    """The machine's lease on ``net`` (kept if still valid): (lease, changed). Hold :func:`locked`."""
    leases = load_leases(paths)
    current = leases.get(machine)
    used = {
        ipaddress.IPv4Address(lease.ip)
        for m, lease in leases.items()
        if m != machine and lease.bridge == net.name
    }

    def make(address: ipaddress.IPv4Address) -> Lease:
        address6 = net.address6_for(address)
        return Lease(
            machine,
            net.name,
            f"{address}/{net.subnet.prefixlen}",
            None if address6 is None else f"{address6}/{net.subnet6.prefixlen}",
        )

    if fixed is not None:
        reserved = {net.subnet.network_address, net.subnet.broadcast_address, net.gateway}
        if fixed not in net.subnet or fixed in reserved:
            raise InvalidInput(
                f"address {fixed} of machine {machine!r} is not a free host address of "
                f"bridge {net.name!r}'s subnet {net.subnet} (the gateway is {net.gateway})"
            )
        if fixed in used:
            owner = next(
                m
                for m, lease in leases.items()
                if lease.bridge == net.name and lease.ip == str(fixed)
            )
            raise Conflict(f"address {fixed} is already leased to machine {owner!r}")
        wanted = make(fixed)
    elif (
        current is not None
        and current.bridge == net.name
        and ipaddress.IPv4Address(current.ip) in net.subnet
        and ipaddress.IPv4Address(current.ip) not in used
        and ipaddress.IPv4Address(current.ip) != net.gateway
    ):
        wanted = make(ipaddress.IPv4Address(current.ip))
    else:
        for host in net.subnet.hosts():
            if host != net.gateway and host not in used:
                wanted = make(host)
                break
        else:
            raise Conflict(f"no free address left on bridge {net.name!r} ({net.subnet})")

    if wanted == current:
        return current, False
    leases[machine] = wanted
    _save_leases(paths, leases)
    return wanted, True


def release(paths: Paths, machine: str) -> Lease | None:
    """Forget the machine's lease; returns what it was."""
    with locked(paths):
        leases = load_leases(paths)
        lease = leases.pop(machine, None)
        if lease is not None:
            _save_leases(paths, leases)
    return lease
