"""A mutable record compared and shown by its attributes.

What ``@dataclass`` gave :class:`~machined.definition.MachineDefinition` and
:class:`~machined.network.config.NetworkConfig`, without dataclasses: every
start reads a definition, and dataclasses cost it ~1 ms to import and ~0.3 ms
per class to create. The subclass writes its ``__init__``.
"""

from __future__ import annotations


class Record:
    """Equal when of the same class with equal attributes; unhashable (mutable)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
