"""pymachine's nftables table, changed through libnftables' JSON interface.

Every change is one atomic JSON batch; what is there is read with a JSON
``list table inet pymachine`` (never scraped text). Both go to libnftables in
this process, through ctypes (:class:`_Context`), where a bridged start's two
``nft -j`` subprocesses cost 15-29 ms (tier-1 host): 3-8 ms each to start
``nft``, and the exit of the one that made a change waits for the kernel (see
:class:`_Context`); in-process the list and the change take ~2 ms. Why not the
Python bindings: Debian's ``python3-nftables`` exists only for the
distribution's Python, and nftables publishes none on PyPI (only unofficial
copies); they are a thin ctypes wrapper of the same few functions. The JSON is
the library's stable contract (libnftables-json(5)) either way, and where
``libnftables.so.1`` cannot be loaded the ``nft`` command runs the same batch
(:func:`_run_command`), with the same error messages.

One table, ``inet pymachine``, holds everything:

* sets ``bridges`` (ifname), ``subnets4``, ``subnets6``: pymachine's bridges and
  their subnets; a bridge is added on its first setup, so the fixed rules below
  cover every bridge without per-bridge rules.
* base chains whose rules never change (rewritten atomically by every setup
  with ``flush chain`` + ``add rule`` in one batch, so concurrent setups and
  upgrades converge on the same content):
  ``prerouting``/``output`` (nat, dstnat): ``fib daddr type local jump ports``,
  i.e. ``Port=`` applies to every local address, 127.0.0.1 included, but not
  ``::1``: IPv6 has no ``route_localnet``, the kernel drops a reply whose
  destination was de-NATed to ``::1`` on a bridge, so ``[::1]`` needs a
  userspace proxy (:func:`machined.network.loopback_proxies`);
  ``postrouting`` (nat, srcnat): masquerade of machine traffic leaving the
  bridges, of loopback-sourced forwards into a bridge, and of hairpin
  forwards (machine → host port → machine);
  ``forward`` (filter): into a bridge only replies, ``Port=`` forwards and
  traffic from pymachine bridges;
  ``input`` (filter): drop new traffic for ``127.0.0.0/8`` arriving on a bridge
  (route_localnet is on there).
* chain ``ports``: the per-machine DNAT rules, each with the comment
  ``pymachine:MACHINE:PROTO:HOSTPORT:CONTAINERPORT``. Teardown deletes exactly
  the rules whose comment names the machine, found by listing the table, so it
  needs nothing but the machine's name.
"""

from __future__ import annotations

import contextlib
import json
from collections import namedtuple
from collections.abc import Iterable

from machined.errors import PymachineError
from machined.network import nftlib
from machined.network.config import PortForward, check_ports_free

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~2 ms in the runtime)
if TYPE_CHECKING:
    from typing import Any

    Cmd = dict[str, Any]  # one command of a JSON batch

FAMILY = nftlib.FAMILY
TABLE = nftlib.TABLE
COMMENT_PREFIX = nftlib.COMMENT_PREFIX
PORTS_CHAIN = "ports"


# --- running nft -----------------------------------------------------------------

#: libnftables and its context live in :mod:`.nftlib` (the stop's clean-up
#: uses them without this module); names kept here for callers and tests
_libnftables = nftlib.libnftables
_Context = nftlib.Context
_sockets = nftlib._sockets


def _run_command(text: str) -> tuple[bool, str]:
    """:class:`_Context`'s stand-in without libnftables: ``nft -j -f -``."""
    import shutil
    import subprocess

    path = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if path is None:
        raise PymachineError("nft not found: install nftables (apt-get install nftables)")
    proc = subprocess.run(
        [path, "-j", "-f", "-"], input=text, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return False, proc.stderr.strip() or proc.stdout.strip()
    return True, proc.stdout


def _execute(commands: list[Cmd]) -> tuple[bool, str]:
    """One JSON batch, atomic: (True, JSON output) or (False, nft's error message)."""
    return _execute_text(json.dumps({"nftables": commands}))


def _execute_text(text: str) -> tuple[bool, str]:
    lib = _libnftables()
    if lib is None:
        return _run_command(text)
    try:
        return _Context.run(lib, text)
    except nftlib.NftError as exc:
        raise PymachineError(str(exc)) from None


def run(commands: list[Cmd]) -> None:
    """Apply ``commands`` as one atomic batch."""
    if not commands:
        return
    ok, message = _execute(commands)
    if not ok:
        raise PymachineError(f"nft failed: {message}")


def list_table() -> list[dict[str, Any]] | None:
    """The table's objects (``{"rule": {...}}`` …), or None if there is no table."""
    ok, output = _execute([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
    if not ok:
        if "No such file or directory" in output:
            return None
        raise PymachineError(f"nft list table failed: {output}")
    return json.loads(output).get("nftables", [])


# --- expressions -----------------------------------------------------------------


def _match(left: Any, right: Any, op: str = "==") -> Cmd:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Cmd:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Cmd:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(network: Any) -> Cmd:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


_LOCAL = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
_TO_BRIDGE = _match(_meta("oifname"), "@bridges")
_FROM_BRIDGE = _match(_meta("iifname"), "@bridges")
_MASQ: Cmd = {"masquerade": None}
_ACCEPT: Cmd = {"accept": None}
_DROP: Cmd = {"drop": None}


def _rule(chain: str, *expr: Cmd, comment: str | None = None) -> Cmd:
    rule: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}
    if comment is not None:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


def _base_chain(name: str, type_: str, hook: str, prio: int) -> dict[str, Any]:
    return {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": type_,
        "hook": hook,
        "prio": prio,
        "policy": "accept",
    }


def _base_rules() -> dict[str, list[list[Cmd]]]:
    loopback4 = _match(_payload("ip", "saddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}})
    from4 = _match(_payload("ip", "saddr"), "@subnets4")
    from6 = _match(_payload("ip6", "saddr"), "@subnets6")
    dnat = _match({"ct": {"key": "status"}}, "dnat", "in")  # a flag test, not equality
    jump_ports = [_LOCAL, {"jump": {"target": PORTS_CHAIN}}]
    return {
        "prerouting": [jump_ports],
        # IPv6 has no route_localnet: a reply de-NATed to ::1 arriving on a bridge is dropped
        # by the kernel, so [::1] is left to a userspace proxy (see loopback_proxies()) and
        # must not be DNATed away from it
        "output": [
            [_match(_meta("nfproto"), "ipv4"), *jump_ports],
            [_match(_payload("ip6", "daddr"), "::1", "!="), *jump_ports],
        ],
        "postrouting": [
            # machines → anywhere but a pymachine subnet: the host's address (outbound NAT)
            [
                from4,
                _match(_payload("ip", "daddr"), "@subnets4", "!="),
                _match(_meta("oifname"), "@bridges", "!="),
                _MASQ,
            ],
            [
                from6,
                _match(_payload("ip6", "daddr"), "@subnets6", "!="),
                _match(_meta("oifname"), "@bridges", "!="),
                _MASQ,
            ],
            # the host's 127.0.0.1 → Port= → machine: a loopback source may not leave the host
            [_TO_BRIDGE, loopback4, _MASQ],
            # machine → host:PORT → machine on the same bridge (hairpin): replies must come back
            [_TO_BRIDGE, dnat, from4, _MASQ],
            [_TO_BRIDGE, dnat, from6, _MASQ],
        ],
        "forward": [
            [_FROM_BRIDGE, _ACCEPT],
            [
                _TO_BRIDGE,
                _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                _ACCEPT,
            ],
            [_TO_BRIDGE, dnat, _ACCEPT],
            [_TO_BRIDGE, _DROP],
        ],
        "input": [
            # route_localnet is on for the bridges: never accept new traffic for 127/8 arriving
            # on one (replies to the host's 127.0.0.1 → Port= connections are the reply direction)
            [
                _FROM_BRIDGE,
                _match(_payload("ip", "daddr"), {"prefix": {"addr": "127.0.0.0", "len": 8}}),
                _match({"ct": {"key": "direction"}}, "original"),
                _DROP,
            ],
        ],
    }


_BASE_CHAINS = (
    # name, type, hook, priority (dstnat = -100, srcnat = 100, filter = 0)
    ("prerouting", "nat", "prerouting", -100),
    ("output", "nat", "output", -100),
    ("postrouting", "nat", "postrouting", 100),
    ("forward", "filter", "forward", 0),
    ("input", "filter", "input", 0),
)


def skeleton() -> list[Cmd]:
    """Table, sets and base chains, the base chains' rules rewritten: idempotent, atomic."""
    cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for name, type_ in (
        ("bridges", "ifname"),
        ("subnets4", "ipv4_addr"),
        ("subnets6", "ipv6_addr"),
    ):
        s: dict[str, Any] = {"family": FAMILY, "table": TABLE, "name": name, "type": type_}
        if type_ != "ifname":
            s["flags"] = ["interval"]
        cmds.append({"add": {"set": s}})
    cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": PORTS_CHAIN}}})
    rules = _base_rules()
    for name, type_, hook, prio in _BASE_CHAINS:
        cmds.append({"add": {"chain": _base_chain(name, type_, hook, prio)}})
        cmds.append({"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}})
        cmds.extend(_rule(name, *expr) for expr in rules[name])
    return cmds


def bridge_elements(bridge: str, subnet: Any, subnet6: Any | None) -> list[Cmd]:
    """Make the fixed rules cover ``bridge``: its name and subnets go into the sets."""

    def element(set_name: str, elem: Any) -> Cmd:
        return {
            "add": {"element": {"family": FAMILY, "table": TABLE, "name": set_name, "elem": [elem]}}
        }

    cmds = [element("bridges", bridge), element("subnets4", _prefix(subnet))]
    if subnet6 is not None:
        cmds.append(element("subnets6", _prefix(subnet6)))
    return cmds


# --- per-machine rules -----------------------------------------------------------


def comment_for(machine: str, port: PortForward) -> str:
    return f"{COMMENT_PREFIX}{machine}:{port}"


class MachineRule(namedtuple("MachineRule", ("machine", "chain", "handle", "port"))):
    """One machine's rule found in the table (for teardown and gc).
    (A namedtuple: a dataclass costs ~0.3 ms to create, paid by every bridged start.)"""

    __slots__ = ()

    machine: str
    chain: str
    handle: int
    port: PortForward | None


def parse_comment(comment: Any) -> tuple[str, PortForward | None] | None:
    """``pymachine:web:tcp:8080:80`` → ("web", tcp:8080:80); None if not pymachine's."""
    machine = nftlib.machine_of(comment)
    if machine is None:
        return None
    rest = comment[len(COMMENT_PREFIX) + len(machine) + 1 :]
    try:
        return machine, PortForward.parse(rest) if rest else None
    except Exception:  # noqa: BLE001 - a rule someone edited: still the machine's
        return machine, None


def machine_rules(listing: Iterable[dict[str, Any]] | None) -> list[MachineRule]:
    """The per-machine rules in a table listing (any chain, identified by comment)."""
    found = []
    for obj in listing or ():
        rule = obj.get("rule")
        if not rule:
            continue
        parsed = parse_comment(rule.get("comment"))
        if parsed is not None:
            found.append(MachineRule(parsed[0], rule["chain"], rule["handle"], parsed[1]))
    return found


def _delete(rule: MachineRule) -> Cmd:
    return {
        "delete": {
            "rule": {"family": FAMILY, "table": TABLE, "chain": rule.chain, "handle": rule.handle}
        }
    }


def port_rules(
    machine: str, ports: Iterable[PortForward], address: str, address6: str | None
) -> list[Cmd]:
    """DNAT for each ``Port=``: one rule per IP family, tagged with the machine's name."""
    cmds = []
    for port in ports:
        comment = comment_for(machine, port)
        dport = _match(_payload(port.protocol, "dport"), port.host_port)
        cmds.append(
            _rule(
                PORTS_CHAIN,
                _match(_meta("nfproto"), "ipv4"),
                dport,
                {"dnat": {"family": "ip", "addr": address, "port": port.container_port}},
                comment=comment,
            )
        )
        if address6:
            cmds.append(
                _rule(
                    PORTS_CHAIN,
                    _match(_meta("nfproto"), "ipv6"),
                    dport,
                    {"dnat": {"family": "ip6", "addr": address6, "port": port.container_port}},
                    comment=comment,
                )
            )
    return cmds


def install_machine(
    machine: str,
    ports: list[PortForward],
    address: str,
    address6: str | None,
    bridge_cmds: list[Cmd],
) -> None:
    """Skeleton + bridge elements + the machine's rules (replacing stale ones), one batch.

    Call with the network lock held: a host port taken by another machine's rule
    is a :class:`Conflict` (the first DNAT rule would win silently otherwise).
    """
    existing = machine_rules(list_table())
    check_ports_free(machine, ports, ((r.machine, r.port) for r in existing if r.port is not None))
    stale = [_delete(r) for r in existing if r.machine == machine]
    run(skeleton() + bridge_cmds + stale + port_rules(machine, ports, address, address6))


def remove_machine(machine: str, attempts: int = 3) -> int:
    """Delete every rule tagged with the machine; the number deleted (0 if none or no table).

    :func:`.nftlib.remove_machine`, which the stop's clean-up calls without this module.
    """
    try:
        return nftlib.remove_machine(machine, _execute_text, attempts)
    except nftlib.NftError as exc:
        raise PymachineError(str(exc)) from None


def remove_machines_except(keep: set[str]) -> list[str]:
    """Delete the rules of every machine not in ``keep`` (gc); the machines cleaned."""
    rules = [r for r in machine_rules(list_table()) if r.machine not in keep]
    if rules:
        run([_delete(r) for r in rules])
    return sorted({r.machine for r in rules})


def remove_bridge_elements(bridge: str, subnet: Any, subnet6: Any | None) -> None:
    listing = list_table()
    if listing is None:
        return
    # deleting an element that is not there fails the whole batch: one by one
    for obj in bridge_elements(bridge, subnet, subnet6):
        with contextlib.suppress(PymachineError):
            run([{"delete": obj["add"]}])


def delete_table() -> None:
    if list_table() is not None:
        run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
