"""machined.dependencies: what create refuses (pure: definitions in a dict)."""

from __future__ import annotations

import random

import pytest

from machined.definition import MachineDefinition, from_text
from machined.dependencies import check, started_first
from machined.errors import InvalidInput, NotFound


def loader(graph: dict[str, list[str]]):
    def load(name: str) -> MachineDefinition:
        if name not in graph:
            raise NotFound(name)
        return MachineDefinition(name, "tiny", requires=list(graph[name]))

    return load


def test_a_cycle_through_other_machines_is_refused() -> None:
    graph = {"b": ["c"], "c": ["a"]}  # a is the one being created
    with pytest.raises(InvalidInput, match="dependency cycle: a → b → c → a"):
        check(MachineDefinition("a", "tiny", requires=["b"]), loader(graph))


def test_any_key_makes_the_edge() -> None:
    graph = {"b": ["a"]}
    for key in ("requires", "wants", "after"):
        with pytest.raises(InvalidInput, match="cycle"):
            check(MachineDefinition("a", "tiny", **{key: ["b"]}), loader(graph))


def test_unknown_machine_and_self_are_refused() -> None:
    with pytest.raises(NotFound, match="Wants=db: machine 'db' not found"):
        check(MachineDefinition("web", "tiny", wants=["db"]), loader({}))
    with pytest.raises(InvalidInput, match="itself"):
        check(MachineDefinition("web", "tiny", after=["web"]), loader({}))


def test_random_graphs_agree_with_a_plain_reachability_check() -> None:
    """Fuzz: check refuses exactly when the new machine reaches itself."""
    rng = random.Random(20)
    names = [f"m{i}" for i in range(7)]
    for _ in range(500):
        graph = {n: rng.sample(names[1:], rng.randint(0, 2)) for n in names[1:]}
        new = rng.sample(names[1:], rng.randint(1, 3))
        graph_with_new = {**graph, "m0": new}

        def reaches(start: str, goal: str, seen=frozenset(), g=graph_with_new) -> bool:
            return any(
                n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in g[start]
            )

        # a cycle anywhere reachable from m0 (not only through m0) is refused too
        cyclic = any(reaches(n, n) for n in graph_with_new if n == "m0" or reaches("m0", n))
        definition = MachineDefinition("m0", "tiny", requires=new)
        if cyclic:
            with pytest.raises(InvalidInput, match="cycle"):
                check(definition, loader(graph))
        else:
            check(definition, loader(graph))


def test_the_definition_keys_read_and_write_back() -> None:
    text = "[Machine]\nImage=tiny\nRequires=db cache\nWants=log\nAfter=dns\n"
    parsed = from_text("web", text)
    assert (parsed.requires, parsed.wants, parsed.after) == (["db", "cache"], ["log"], ["dns"])
    assert started_first(parsed) == [("db", True), ("cache", True), ("log", False)]
    with pytest.raises(InvalidInput):
        from_text("web", "[Machine]\nImage=tiny\nRequires=pymachine-db.service/x\n")


@pytest.mark.parametrize("bad", ["../db", "db\x01", "-db", "a" * 300])
def test_names_are_machine_names(bad: str) -> None:
    with pytest.raises(InvalidInput):
        from_text("web", f"[Machine]\nImage=tiny\nRequires={bad}\n")
