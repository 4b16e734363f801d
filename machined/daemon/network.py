"""pymachined's network part: what a stopped machine held, removed by one owner.

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

import logging

from machined.errors import InvalidInput
from machined.names import validate_machine_name
from machined.paths import Paths

log = logging.getLogger("pymachined")

#: Unit states of a machine that holds (or is about to hold) its network.
ALIVE = frozenset({"active", "activating", "deactivating", "reloading", "refreshing"})


def unit_stopped(paths: Paths, name: str) -> bool:
    """Remove what the stopped machine NAME left (nft rules, veth); True if
    something was there. A worker thread's work (libnftables, rtnetlink)."""
    try:
        validate_machine_name(name)
    except InvalidInput:
        return False  # pymachine-dns@BRIDGE, a snapshot's unit, …: no machine's
    from machined.network import addresses, leftover, nftlib, state

    with addresses.locked(paths):
        if state.read(paths, name) is not None:
            return False  # a new run set up meanwhile: it owns what is there
        rules = nftlib.remove_machine(name)
        veth = leftover.link_exists(state.host_ifname(name))
        if veth:
            leftover.delete_lingering_veth(name)
    if rules or veth:
        log.info("pymachined: removed what machine %s left: %d rules, veth: %s", name, rules, veth)
    return bool(rules or veth)


def reconcile(paths: Paths) -> list[str]:
    """At the daemon's start: remove the network of every machine whose unit is
    not running (records, veths, nft rules); the names cleaned."""
    from machined import network
    from machined.systemd import Systemd

    with Systemd() as systemd:
        units = systemd.list_units(["pymachine-*.service", "pymachine-*.scope"])
    running = {
        unit.removeprefix("pymachine-").rsplit(".", 1)[0]
        for unit, active, _sub in units
        if active in ALIVE and "@" not in unit
    }
    from machined.network import addresses

    with addresses.locked(paths):
        cleaned = network.gc(paths, running)
    if cleaned:
        log.info("pymachined: removed the network of stopped machines: %s", ", ".join(cleaned))
    return cleaned
