"""A machine's ``/etc/hosts`` and ``/etc/resolv.conf`` (bind-mounted over the
rootfs' own), written at every start.

A few generated lines, so plain string formatting: no jinja2 (~16 ms of import)
on the start path. Loads nothing of the bridge's machinery unless the machine
is on a bridge (``Mode=none`` writes both files with this module alone).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~1.6 ms in the
if TYPE_CHECKING:  # runtime, which runs without site: nothing there imports it)
    from typing import Any

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved's list of the real upstream servers, when /etc/resolv.conf is its stub
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")


class Resolv:
    """What a resolv.conf says: name servers, search domains, options, its path."""

    def __init__(
        self, nameservers: list[str], search: list[str], options: list[str], source: str
    ) -> None:
        self.nameservers = nameservers
        self.search = search
        self.options = options
        self.source = source


def _parse_resolv(path: Path) -> Resolv | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    servers, search, options = [], [], []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            servers.append(words[1])
        elif words[0] in ("search", "domain"):
            search = words[1:]
        elif words[0] == "options":
            options.extend(words[1:])
    return Resolv(servers, search, options, str(path))


def _is_loopback(server: str) -> bool:
    import ipaddress  # bridged machines only

    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(server.split("%", 1)[0]).is_loopback
    return False


def host_resolvers(bridged: bool) -> Resolv:
    """The host's resolver configuration, as a machine can use it.

    A bridged machine cannot reach the host's loopback, so loopback servers
    (systemd-resolved's 127.0.0.53 stub, a local dnsmasq) are replaced by
    systemd-resolved's upstream list when there is one, else dropped.
    """
    resolv = _parse_resolv(HOST_RESOLV_CONF) or Resolv([], [], [], "none")
    if bridged and any(_is_loopback(s) for s in resolv.nameservers):
        upstream = _parse_resolv(RESOLVED_UPSTREAM)
        if upstream is not None and any(not _is_loopback(s) for s in upstream.nameservers):
            resolv = upstream
        resolv.nameservers = [s for s in resolv.nameservers if not _is_loopback(s)]
        resolv.options = [o for o in resolv.options if o != "trust-ad"]
    return resolv


def _hosts_entries(
    paths: Any, machine: str, net_state: Any, leases: Any = None
) -> list[tuple[str, str]]:
    """(address, name) of the gateway and of every other machine on the bridge
    (LEASES: the bridge's, when the caller has read them)."""
    if net_state is None or not net_state.bridge:
        return []
    if leases is None:
        from machined.network import addresses

        leases = addresses.leases_on(paths, net_state.bridge)
    entries = [(net_state.gateway, "_gateway")]
    if net_state.gateway6:
        entries.append((net_state.gateway6, "_gateway"))
    for lease in leases:
        if lease.machine == machine:
            continue
        entries.append((lease.ip, lease.machine))
        if lease.address6 and net_state.address6:
            entries.append((lease.address6.split("/", 1)[0], lease.machine))
    return entries


def render_hosts(paths: Any, machine: str, net_state: Any, leases: Any = None) -> str:
    """The machine's /etc/hosts: itself on its addresses (127.0.1.1 without
    any), then its bridge's gateway and machines."""
    own = []
    if net_state is not None:
        own.append(net_state.address.split("/", 1)[0])
        if net_state.address6:
            own.append(net_state.address6.split("/", 1)[0])
    lines = [
        f"# /etc/hosts of machine {machine}, written by pymachine at every start.",
        "# Machines on the same bridge are listed below and kept current while it runs.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]
    lines += [f"{address}\t{machine}" for address in own or ["127.0.1.1"]]
    lines += [
        f"{address}\t{name}" for address, name in _hosts_entries(paths, machine, net_state, leases)
    ]
    return "\n".join(lines) + "\n"


def render_resolv(machine: str, resolv: Resolv) -> str:
    lines = [
        f"# /etc/resolv.conf of machine {machine}, written by pymachine at every start",
        f"# from the host's resolver configuration ({resolv.source}).",
    ]
    lines += [f"nameserver {server}" for server in resolv.nameservers] or [
        "# the host has no name server a machine can reach"
    ]
    if resolv.search:
        lines.append("search " + " ".join(resolv.search))
    if resolv.options:
        lines.append("options " + " ".join(resolv.options))
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> None:
    """Rewrite keeping the inode: a bind mount of the file sees the new content."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)


def write_etc_files(
    machine: str, net_state: Any, paths: Any, dest_dir: Path, *, dns: bool = True
) -> None:
    """Write ``dest_dir/hosts`` and ``dest_dir/resolv.conf``; NET_STATE None
    (``Mode=none``/``host``): the name on 127.0.1.1, the host's resolvers as they are."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    write_in_place(dest_dir / "hosts", render_hosts(paths, machine, net_state))
    write_resolv(machine, net_state, dest_dir, dns=dns)


def write_resolv(machine: str, net_state: Any, dest_dir: Path, *, dns: bool = True) -> None:
    """``dest_dir/resolv.conf``: the bridge's dnsmasq (:mod:`.dns`) when there
    is one to run and DNS is true, else the host's resolvers."""
    write_in_place(
        Path(dest_dir) / "resolv.conf", render_resolv(machine, resolvers(net_state, dns=dns))
    )


def resolvers(net_state: Any, *, dns: bool = True) -> Resolv:
    """What a machine asks: on a bridge with dnsmasq, the bridge's gateway,
    searching ``machine`` then the host's domains (dnsmasq forwards the rest to
    the host's resolvers); otherwise the host's resolvers."""
    if dns and net_state is not None and net_state.bridge:
        from machined.network import dns as bridge_dns

        if bridge_dns.dnsmasq() is not None:
            # dnsmasq runs on the host: it reads the host's own file, loopback
            # servers and all; the machine keeps its search domains
            host = host_resolvers(bridged=False)
            search = [bridge_dns.DOMAIN, *(d for d in host.search if d != bridge_dns.DOMAIN)]
            options = [o for o in host.options if o != "trust-ad"]  # dnsmasq does not validate
            source = f"{bridge_dns.unit_name(net_state.bridge)}, which forwards to {host.source}"
            return Resolv([net_state.gateway], search, options, source)
    return host_resolvers(bridged=net_state is not None)
