"""Files shipped with pymachine: jinja2 templates and static unit files."""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import
if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The package's directory; templates/ and units/ are in it (symlinks to the
#: repository's top-level directories in a checkout).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def templates_dir() -> Traversable:
    from importlib.resources import files

    return files("machined").joinpath("templates")


def units_dir() -> Traversable:
    from importlib.resources import files

    return files("machined").joinpath("units")


def template_text(name: str) -> str:
    """The text of template NAME. From the package's directory when it is one on
    disk (always, installed or not: the package ships a binary it executes), so
    that an enabled machine's start, which checks its unit file against the
    template, does not import importlib.resources (zipfile, tempfile, shutil:
    ~3 ms); through importlib.resources otherwise."""
    path = os.path.join(_PACKAGE_DIR, "templates", name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return templates_dir().joinpath(name).read_text(encoding="utf-8")
