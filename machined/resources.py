"""Files shipped with pymachine: jinja2 templates and static unit files."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def templates_dir() -> Traversable:
    return files("machined").joinpath("templates")


def units_dir() -> Traversable:
    return files("machined").joinpath("units")
