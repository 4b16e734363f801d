"""Dependencies between machines: ``Requires=``, ``Wants=`` and ``After=`` in
a definition's ``[Machine]`` section name other machines (``db``, not
``pymachine-db.service``).

They become the unit's own ``Requires=`` / ``Wants=`` / ``After=`` on the other
machines' units (a required or wanted machine is ordered before, as
docker compose's ``depends_on`` is), so systemd stops a machine whose
required one stops, and an enabled machine's unit file says the same at boot.
A transient unit cannot pull in a machine that has no unit yet, so ``start``
starts the required and wanted machines first, each waited for to be running —
ready, with ``Notify=`` (:meth:`machined.machines.Machines.start`).

``create`` refuses a name that is no machine and a cycle: :func:`check`.
"""

from __future__ import annotations

from collections.abc import Callable

from machined.errors import InvalidInput, NotFound
from machined.names import validate_machine_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from machined.definition import MachineDefinition

KEYS = ("Requires", "Wants", "After")


def parse(text: str) -> list[str]:
    """A ``Requires=`` (…) line: machine names, blank-separated."""
    names = text.split()
    for name in names:
        validate_machine_name(name)
    return names


def started_first(definition: MachineDefinition) -> list[tuple[str, bool]]:
    """(machine, required) for each machine ``start`` starts before this one."""
    seen: dict[str, bool] = {}
    for name in definition.requires:
        seen[name] = True
    for name in definition.wants:
        seen.setdefault(name, False)
    return list(seen.items())


def check(definition: MachineDefinition, load: Callable[[str], MachineDefinition]) -> None:
    """Refuse a dependency on a machine that does not exist, and a cycle
    (through any mix of Requires=, Wants= and After=). LOAD: a machine's
    definition by name (NotFound if there is none)."""
    own = definition.name

    def edges(d: MachineDefinition) -> list[str]:
        return list(dict.fromkeys([*d.requires, *d.wants, *d.after]))

    for key, names in (
        ("Requires", definition.requires),
        ("Wants", definition.wants),
        ("After", definition.after),
    ):
        for name in names:
            if name == own:
                raise InvalidInput(f"machine '{own}' cannot depend on itself ({key}={name})")
            try:
                load(name)
            except NotFound:
                raise NotFound(f"{key}={name}: machine '{name}' not found") from None
    # depth-first search from the new definition; others are read as they are
    path: list[str] = []
    done: set[str] = set()

    def visit(d: MachineDefinition) -> None:
        path.append(d.name)
        for name in edges(d):
            if name in path:
                cycle = " → ".join([*path[path.index(name) :], name])
                raise InvalidInput(f"dependency cycle: {cycle}")
            if name in done:
                continue
            try:
                other = definition if name == own else load(name)
            except (NotFound, InvalidInput):
                continue  # a machine removed or broken since: start says so
            visit(other)
        path.pop()
        done.add(d.name)

    visit(definition)
