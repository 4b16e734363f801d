"""pymachined's network part: the host side of a bridged machine, from its
start to its stop, in one owner.

When a bridged machine's runtime has made the machine's network namespace, it
calls ``SetUpNetwork(NAME, PID)`` (:func:`set_up`): the daemon checks that PID
is in the unit of machine NAME, then runs :func:`machined.network.attach`
(bridge, lease, veth pair, addresses and routes on both ends, nft rules,
``/etc`` files, the bridge's dnsmasq, the ``[::1]`` proxies) on pyroute2 and
libnftables loaded once, and answers with the machine's network. The runtime
speaks no netlink and loads none of it.

A bridged machine's port forwards are nft rules in the host's table; its veth
dies with its network namespace, but asynchronously. The daemon follows
systemd's signals for ``pymachine-*`` units (:func:`machined.daemon.service.follow_systemd`)
and, when a machine's unit goes inactive or failed — whatever stopped it:
``pymachine stop``, ``systemctl stop``, ``machinectl terminate``, a crash, a
SIGKILLed PID 1 — removes its rules and a lingering veth (:func:`unit_stopped`).
At its own start it reconciles what it finds against the machines that run
(:func:`reconcile`: ``gc``'s network part, made automatic), so what machines
left while it was not running (killed, not yet activated, an upgrade) goes
too. The ``[::1]`` proxies are ``BindsTo=`` the machine: systemd removes them.

Races with a new start of the same machine are decided under the network lock
(:func:`machined.network.addresses.locked`): a start writes the machine's
runtime record under that lock before it makes anything, so a record means a
run that owns what is there, and the daemon leaves it alone.
"""

from __future__ import annotations

import contextlib
import logging
import os

from machined import network
from machined.errors import AccessDenied, InvalidInput, NotRunning
from machined.names import validate_machine_name
from machined.network import addresses, state
from machined.network.config import NetworkMode
from machined.network.lifecycle import NetworkState
from machined.paths import Paths

log = logging.getLogger("pymachined")

#: Unit states of a machine that holds (or is about to hold) its network.
ALIVE = frozenset({"active", "activating", "deactivating", "reloading", "refreshing"})


def machine_unit_of(pid: int, name: str) -> str:
    """The unit of machine NAME that process PID is in (``pymachine-NAME.service``,
    or ``.scope`` for ``run``), or :class:`AccessDenied`: the daemon configures
    the network namespace of a machine's own process, never another's (the
    host's, or a different machine's)."""
    from machined.runtime.cgroup import own_cgroup, unit_of

    try:
        unit = unit_of(own_cgroup(pid))
    except OSError:
        raise NotRunning(f"machine '{name}': process {pid} is gone") from None
    if unit not in (f"pymachine-{name}.service", f"pymachine-{name}.scope"):
        raise AccessDenied(f"process {pid} is not in the unit of machine '{name}'")
    if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
        raise AccessDenied(f"process {pid} of machine '{name}' has no network namespace of its own")
    return unit


def set_up(paths: Paths, name: str, pid: int) -> NetworkState:
    """The host side of machine NAME's start, whose PID 1 (or its parent in the
    machine's namespaces) is PID. A worker thread's work (netlink, libnftables)."""
    from machined import definition as definitions

    validate_machine_name(name)
    unit = machine_unit_of(pid, name)
    config = definitions.load(name, paths).network
    if config.mode != NetworkMode.BRIDGE:
        raise InvalidInput(f"machine '{name}' is not on a bridge (Network={config.mode})")
    net_state = network.attach(name, config, pid, paths, unit)
    try:
        machine_unit_of(pid, name)  # still the machine's process, not a PID reused meanwhile
    except BaseException:
        network.teardown(name, paths)
        raise
    return net_state


def unit_stopped(paths: Paths, name: str) -> bool:
    """Remove what the stopped machine NAME left (nft rules, veth, its record);
    True if something was there. A worker thread's work (libnftables, rtnetlink)."""
    try:
        validate_machine_name(name)
    except InvalidInput:
        return False  # pymachine-dns@BRIDGE, a snapshot's unit, …: no machine's
    with addresses.locked(paths):
        record = state.read(paths, name)
        if record and _runs(record.get("netns_pid"), name):
            return False  # a new run set up meanwhile: it owns what is there
        rules, veth = network.teardown_locked(name, paths)
    if rules or veth:
        log.info("pymachined: removed what machine %s left: %d rules, veth: %s", name, rules, veth)
    return bool(rules or veth)


def _runs(pid: object, name: str) -> bool:
    """Whether PID (a record's) is a live process of machine NAME's unit."""
    if not isinstance(pid, int) or pid <= 1:
        return False
    with contextlib.suppress(AccessDenied, NotRunning, OSError):
        machine_unit_of(pid, name)
        return True
    return False


def reconcile(paths: Paths) -> list[str]:
    """At the daemon's start: remove the network of every machine whose unit is
    not running (records, veths, nft rules); the names cleaned."""
    from machined.systemd import Systemd

    with Systemd() as systemd:
        units = systemd.list_units(["pymachine-*.service", "pymachine-*.scope"])
    running = {
        unit.removeprefix("pymachine-").rsplit(".", 1)[0]
        for unit, active, _sub in units
        if active in ALIVE and "@" not in unit
    }
    cleaned = network.gc(paths, running)
    if cleaned:
        log.info("pymachined: removed the network of stopped machines: %s", ", ".join(cleaned))
    return cleaned
