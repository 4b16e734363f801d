"""machined.lazy: a deferred standard-library module loads whole on first use."""

from __future__ import annotations

import subprocess
import sys


def test_deferred_inspect_is_not_loaded_by_dataclasses_and_works_when_used() -> None:
    code = (
        "import sys\n"
        "from machined import lazy\n"
        "lazy.defer('inspect')\n"
        "import dataclasses\n"
        "@dataclasses.dataclass\n"
        "class Documented:\n"
        "    '''Has a docstring: no signature needed.'''\n"
        "    a: int\n"
        "print('ast' in sys.modules)\n"
        "@dataclasses.dataclass\n"
        "class Bare:\n"
        "    a: int\n"
        "import inspect\n"
        "from inspect import isclass\n"
        "print(Bare.__doc__, isclass(Bare), inspect.signature(len), sys.modules['inspect'] is inspect)\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True).splitlines()
    assert out == ["False", "Bare(a: int) True (obj, /) True"]


def test_the_cli_defers_inspect_and_reads_a_definition_without_it(tmp_path) -> None:
    (tmp_path / "etc/pymachine").mkdir(parents=True)
    (tmp_path / "etc/pymachine/m.machine").write_text(
        "[Machine]\nImage=i\n[Exec]\nPrivateUsers=no\n"
    )
    code = (
        "import sys, machined.cli\n"
        "from machined import definition\n"
        "d = definition.load('m')\n"
        "print(d.image, 'ast' in sys.modules)\n"
    )
    env = {"PYMACHINE_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.check_output([sys.executable, "-c", code], text=True, env=env)
    assert out.split() == ["i", "False"]


def test_every_dataclass_of_the_package_has_a_docstring() -> None:
    """Without one, dataclasses imports inspect to write it (the deferral above
    is then undone: ~4 ms of the call that imports the module)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "machined"
    bare = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
            named = {getattr(d, "id", getattr(d, "attr", "")) for d in decorators}
            if "dataclass" in named and ast.get_docstring(node) is None:
                bare.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name}")
    assert bare == []
