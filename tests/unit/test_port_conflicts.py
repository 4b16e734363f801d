"""A host port forwarded to two machines (issue 15, item 10): the check that
``start`` makes before anything starts, and the runtime again (pure logic;
tier 1 has the real nft table: tests/integration/test_host_hygiene.py)."""

from __future__ import annotations

import json

import pytest

from machined.definition import from_text
from machined.errors import Conflict
from machined.machines import _ports_claimed_twice, _Start
from machined.network.config import PortForward, check_ports_free


def _rule(machine: str, port: str) -> tuple[str, PortForward]:
    return machine, PortForward.parse(port)


def test_a_port_of_another_machine_is_a_conflict_with_its_name():
    rules = [_rule("web", "tcp:8080:80")]
    with pytest.raises(
        Conflict, match="^host port tcp:8080 is already forwarded to machine 'web'$"
    ):
        check_ports_free("api", [PortForward.parse("8080:8000")], rules)


def test_own_stale_rules_other_protocols_and_other_ports_are_free():
    rules = [_rule("api", "tcp:8080:80"), _rule("web", "udp:8080"), _rule("web", "tcp:8081")]
    check_ports_free("api", [PortForward.parse("tcp:8080"), PortForward.parse("udp:9")], rules)
    check_ports_free("api", [], rules)


def _start(name: str, *ports: str, mode: str = "bridge") -> _Start:
    lines = "".join(f"Port={p}\n" for p in ports)
    text = f"[Machine]\nImage=tiny\n[Network]\nMode={mode}\n{lines}"
    definition = from_text(name, text)
    return _Start(name, f"pymachine-{name}.service", definition, False, False)


def test_the_second_of_two_machines_started_together_on_one_port_is_refused():
    starts = {
        0: _start("a", "tcp:8080:80"),
        1: _start("b", "udp:8080", "tcp:8080"),
        2: _start("c", "tcp:8080"),
        3: _start("d", "udp:8080"),
    }
    errors = _ports_claimed_twice(starts)
    assert sorted(errors) == [1, 2]
    assert str(errors[1]) == "host port tcp:8080 is already forwarded to machine 'a'"
    assert str(errors[2]) == "host port tcp:8080 is already forwarded to machine 'a'"


def test_a_refused_machine_claims_none_of_its_ports():
    """b is refused (tcp:8080 is a's): its udp:53 stays free for c."""
    starts = {
        0: _start("a", "tcp:8080"),
        1: _start("b", "tcp:8080", "udp:53"),
        2: _start("c", "udp:53"),
    }
    assert sorted(_ports_claimed_twice(starts)) == [1]


def test_the_runtime_records_name_the_forwarded_ports(tmp_path):
    """What ``start`` asks: each running (or starting) machine's record."""
    from machined.network import state
    from machined.paths import Paths

    paths = Paths(tmp_path)
    for machine, ports in (("web", ["tcp:8080:80", "udp:53:53"]), ("bad", ["tcp:0", "x"])):
        (paths.machine_runtime(machine)).mkdir(parents=True)
        state.state_file(paths, machine).write_text(json.dumps({"ports": ports}))
    paths.machine_runtime("none").mkdir()  # a machine without a network record
    assert state.forwarded_ports(paths) == [
        ("web", PortForward("tcp", 8080, 80)),
        ("web", PortForward("udp", 53, 53)),
    ]
    with pytest.raises(Conflict, match="tcp:8080 is already forwarded to machine 'web'"):
        check_ports_free("api", [PortForward.parse("8080")], state.forwarded_ports(paths))
