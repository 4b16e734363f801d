"""Names between machines: one dnsmasq per bridge, on the bridge's own addresses.

As LXC and Incus do, a well-kept server answers for the machines of a bridge
instead of a server of our own: ``pymachine-dns@BRIDGE.service``, a transient
unit that the first bridged start on BRIDGE makes (:func:`ensure`) and that
then stays, like the bridge. It answers

* ``NAME`` and ``NAME.machine`` for every machine with a lease on the bridge
  (``--hostsdir``: dnsmasq re-reads the one hosts file there through inotify
  whenever a lease comes or goes, :func:`write_hosts`; no signal, no restart),
  and never forwards ``.machine`` or a plain name (``--local``,
  ``--domain-needed``);
* every other name by forwarding to the host's resolvers (dnsmasq reads the
  host's ``/etc/resolv.conf`` and follows its changes; it runs in the host's
  network namespace, so systemd-resolved's 127.0.0.53 stub is reachable).

A machine's ``/etc/resolv.conf`` names the bridge's gateway and searches
``machine`` (:mod:`.etc`), so ``getent hosts web`` and busybox's ``nslookup
web`` (static images have no NSS) both work; ``/etc/hosts`` keeps its list of
the bridge's machines as a fallback. Without dnsmasq installed, machines
resolve through the host's resolvers as before (and ``/etc/hosts``).

dnsmasq listens only on the bridge (``--bind-dynamic --interface``: no
wildcard socket, addresses followed as they come), serves no DHCP, reads no
configuration file and drops root for ``nobody`` once its sockets are bound;
the hosts file is world-readable (names and addresses, what ``pymachine
list`` shows anyone).
"""

from __future__ import annotations

import contextlib
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (runtime path)
if TYPE_CHECKING:
    from machined.paths import Paths

DOMAIN = "machine"
DNSMASQ_PATHS = ("/usr/sbin/dnsmasq", "/sbin/dnsmasq", "/usr/bin/dnsmasq")
DIRECTORY = ".dns"  # under paths.runtime: hidden, so no machine is ever named so
HOSTS = "hosts"


def dnsmasq() -> str | None:
    """dnsmasq's path, or None when it is not installed (no DNS on the bridges)."""
    return next((p for p in DNSMASQ_PATHS if os.access(p, os.X_OK)), None)


def unit_name(bridge: str) -> str:
    """An instance name: ``@`` is in no machine's name, so no machine's unit is this."""
    return f"pymachine-dns@{bridge}.service"


def directory(paths: Paths):
    return paths.runtime / DIRECTORY


def hosts_dir(paths: Paths, bridge: str):
    return directory(paths) / bridge


def pid_file(paths: Paths, bridge: str):
    return directory(paths) / f"{bridge}.pid"


def render_hosts(leases) -> str:
    """The bridge's hosts file: every leased machine, IPv4 and IPv6, as NAME
    and NAME.machine (spelled out: dnsmasq's ``--expand-hosts`` adds the
    domain to names without a dot only, and ``web.prod`` is a machine's name)."""
    lines = [f"# machines on this bridge, written by pymachine from {len(leases)} lease(s)"]
    for lease in sorted(leases, key=lambda lease: lease.machine):
        names = f"{lease.machine}\t{lease.machine}.{DOMAIN}"
        lines.append(f"{lease.ip}\t{names}")
        if lease.address6:
            lines.append(f"{lease.address6.split('/', 1)[0]}\t{names}")
    return "\n".join(lines) + "\n"


def write_hosts(paths: Paths, bridge: str) -> None:
    """Rewrite BRIDGE's hosts file from the leases (call with the network lock
    held: two writers must not interleave). Written next to the directory and
    renamed in: dnsmasq's inotify sees one complete file (IN_MOVED_TO)."""
    from machined.network import addresses

    target = hosts_dir(paths, bridge)
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(directory(paths), 0o755)  # nobody (dnsmasq after dropping root) reads it
    os.chmod(target, 0o755)
    tmp = directory(paths) / f".{bridge}.hosts.{os.getpid()}"
    tmp.write_text(render_hosts(addresses.leases_on(paths, bridge)), encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target / HOSTS)


def running(paths: Paths, bridge: str) -> bool:
    """Whether BRIDGE's dnsmasq runs: its PID file names a live dnsmasq serving
    BRIDGE (no bus round trip: every bridged start asks)."""
    try:
        pid = int(pid_file(paths, bridge).read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return False
    return f"--interface={bridge}".encode() in argv


def command(binary: str, paths: Paths, bridge: str) -> list[str]:
    """dnsmasq's command line for BRIDGE (Type=forking: dnsmasq's parent exits
    once the child has bound its sockets, so the start's job ends when it
    answers)."""
    argv = [
        binary,
        "--conf-file=/dev/null",  # nothing of the host's dnsmasq configuration
        f"--pid-file={pid_file(paths, bridge)}",
        f"--interface={bridge}",
        "--except-interface=lo",
        "--bind-dynamic",
        "--no-hosts",
        f"--hostsdir={hosts_dir(paths, bridge)}",
        f"--domain={DOMAIN}",
        "--expand-hosts",
        f"--local=/{DOMAIN}/",
        "--domain-needed",
        "--bogus-priv",
        "--log-facility=-",
        "--user=nobody",
    ]
    if _group_exists("nogroup"):
        argv.append("--group=nogroup")
    return argv


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def ensure(systemd, paths: Paths, bridge: str) -> bool:
    """Start BRIDGE's dnsmasq unless it runs; False when dnsmasq is not installed.

    Two machines starting at once on a new bridge may both ask: the second
    ``StartTransientUnit`` fails (the unit exists) and its job is the first's.
    """
    binary = dnsmasq()
    if binary is None:
        return False
    if running(paths, bridge):
        return True
    from machined.dbus import BusError
    from machined.properties import Property

    unit = unit_name(bridge)
    hosts = hosts_dir(paths, bridge) / HOSTS
    if not hosts.exists():
        from machined.network import addresses

        with addresses.locked(paths):
            write_hosts(paths, bridge)
    argv = command(binary, paths, bridge)
    properties = [
        Property("Description", "s", f"pymachine: names of the machines on bridge {bridge}"),
        Property("Type", "s", "forking"),
        Property("PIDFile", "s", str(pid_file(paths, bridge))),
        Property("ExecStart", "a(sasb)", [(binary, argv, False)]),
        Property("Restart", "s", "on-failure"),
        Property("CollectMode", "s", "inactive-or-failed"),
    ]
    systemd.reset_failed(unit)
    try:
        systemd.start_transient(unit, properties)
    except BusError as exc:
        if "UnitExists" not in exc.name and "already exists" not in str(exc):
            raise
        systemd.start_unit(unit)  # made by a concurrent start: wait for its job
    return True


def stop(systemd, bridge: str) -> None:
    """Stop BRIDGE's dnsmasq (the bridge was removed)."""
    from machined.dbus import BusError

    with contextlib.suppress(BusError):
        systemd.stop_unit(unit_name(bridge))
