"""pymachine's nftables table, changed through libnftables' JSON interface.

Every change is one atomic JSON batch; what is there is read with a JSON
``list table inet pymachine`` (never scraped text). Both go to libnftables in
pymachined's process through nftables' own Python binding (Debian's
``python3-nftables``, :func:`_binding`), where a start's two ``nft -j``
subprocesses cost 15-29 ms; where the binding or ``libnftables.so.1`` is
missing, the ``nft`` command runs the same batch (:func:`_run_command`), with
the same error messages. The JSON is the library's stable contract
(libnftables-json(5)) either way.

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
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from machined.errors import PymachineError
from machined.network.config import PortForward, check_ports_free

Cmd = dict[str, Any]  # one command of a JSON batch

FAMILY = "inet"
TABLE = "pymachine"
COMMENT_PREFIX = "pymachine:"
PORTS_CHAIN = "ports"
NO_TABLE = "No such file or directory"  # nft's error for a table that is not there

#: Where Debian's python3-nftables puts the binding: for the distribution's
#: Python, which a venv (pymachine's own, or pipx's) does not see. The binding
#: is pure Python over ctypes, so it is loaded from there by its path.
DEBIAN_BINDING = "/usr/lib/python3/dist-packages/nftables/__init__.py"


# --- running nft -----------------------------------------------------------------


def _binding() -> Any | None:
    """nftables' own Python module (``nftables.Nftables``), or None without it."""
    try:
        import nftables
    except ImportError:
        if not os.path.exists(DEBIAN_BINDING):
            return None
        spec = importlib.util.spec_from_file_location(
            "nftables", DEBIAN_BINDING, submodule_search_locations=[os.path.dirname(DEBIAN_BINDING)]
        )
        if spec is None or spec.loader is None:
            return None
        nftables = importlib.util.module_from_spec(spec)
        sys.modules["nftables"] = nftables
        try:
            spec.loader.exec_module(nftables)
        except Exception:  # noqa: BLE001 - a broken copy: the nft command instead
            del sys.modules["nftables"]
            return None
    return nftables


class _Library:
    """One libnftables context of this process and network namespace, kept open.

    Kept because closing a netfilter netlink socket right after a change waits
    for the kernel to release the change's objects (``nft_rcv_nl_event``
    flushes nf_tables' destroy work: an RCU grace period, 7-30 ms in a tier-1
    host, where the change itself takes ~1 ms). A context acts in the network
    namespace it was made in: one of another namespace (a test's) or inherited
    through a fork is replaced. Its socket is made close-on-exec
    (libnftables' is not), so no command pymachined runs inherits it.
    Contexts are not thread-safe: one at a time, under a lock.
    """

    lock = threading.Lock()
    current: tuple[tuple[int, int], Any] | None = None
    module: Any | None = None
    loaded = False

    @classmethod
    def context(cls) -> Any | None:
        if not cls.loaded:
            cls.module, cls.loaded = _binding(), True
        if cls.module is None:
            return None
        owner = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
        if cls.current is None or cls.current[0] != owner:
            before = _sockets()
            try:
                nft = cls.module.Nftables()
            except OSError:  # libnftables.so.1 cannot be loaded
                cls.module = None
                return None
            for fd in _sockets() - before:  # the one the context opened
                os.set_inheritable(fd, False)
            nft.set_json_output(True)
            cls.current = (owner, nft)
        return cls.current[1]

    @classmethod
    def run(cls, text: str) -> tuple[bool, str] | None:
        """(ok, output or error), or None without the library."""
        with cls.lock:
            nft = cls.context()
            if nft is None:
                return None
            rc, output, error = nft.cmd(text)
        return rc == 0, output if rc == 0 else (error.strip() or output.strip())


def _sockets() -> set[int]:
    """This process's socket descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
    return found


def _run_command(text: str) -> tuple[bool, str]:
    """The library's stand-in: ``nft -j -f -``."""
    path = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if path is None:
        raise PymachineError("nft not found: install nftables (apt-get install nftables)")
    proc = subprocess.run(
        [path, "-j", "-f", "-"], input=text, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return False, proc.stderr.strip() or proc.stdout.strip()
    return True, proc.stdout


#: how a batch runs: "library" or "command" (tests compare the two)
BACKENDS = ("library", "command")


def _execute(commands: list[Cmd], backend: str | None = None) -> tuple[bool, str]:
    """One JSON batch, atomic: (True, JSON output) or (False, nft's error message)."""
    text = json.dumps({"nftables": commands})
    if backend != "command":
        result = _Library.run(text)
        if result is not None:
            return result
        if backend == "library":
            raise PymachineError("libnftables' Python binding (python3-nftables) is not installed")
    return _run_command(text)


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
        if NO_TABLE in output:
            return None
        raise PymachineError(f"nft list table failed: {output}")
    return json.loads(output).get("nftables", []) if output.strip() else []


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


@dataclass(frozen=True)
class MachineRule:
    """One machine's rule found in the table (for teardown and gc)."""

    machine: str
    chain: str
    handle: int
    port: PortForward | None


def parse_comment(comment: Any) -> tuple[str, PortForward | None] | None:
    """``pymachine:web:tcp:8080:80`` → ("web", tcp:8080:80); None if not pymachine's."""
    if not isinstance(comment, str) or not comment.startswith(COMMENT_PREFIX):
        return None
    machine = comment[len(COMMENT_PREFIX) :].partition(":")[0]
    if not machine:
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

    Found by listing the table, so nothing but the name is needed; listed again
    when a concurrent change deleted some of them first (the batch then fails whole).
    """
    for attempt in range(attempts):
        rules = [r for r in machine_rules(list_table()) if r.machine == machine]
        if not rules:
            return 0
        ok, output = _execute([_delete(r) for r in rules])
        if ok:
            return len(rules)
        if attempt == attempts - 1:
            raise PymachineError(f"nft failed: {output}")
    return 0


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
