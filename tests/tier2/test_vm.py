"""Tier 2 on the host: boot the VM (once per session) and report every in-VM test.

Each test in ``inside/test_*.py`` becomes one test here, so a run shows which
limit is or is not enforced, with the failure text from inside the VM. The VM's
serial console is attached to failures that look like the VM itself broke.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from . import vm

pytestmark = pytest.mark.tier2


def _stage(func: ast.FunctionDef) -> int:
    for dec in func.decorator_list:
        # @pytest.mark.stage(N)
        if (
            isinstance(dec, ast.Call)
            and isinstance(dec.func, ast.Attribute)
            and dec.func.attr == "stage"
        ):
            return int(ast.literal_eval(dec.args[0]))
    return 1


def in_vm_tests() -> list[tuple[str, str, int]]:
    """(module, function, stage) of every in-VM test, read without importing them."""
    found = []
    for path in sorted(vm.INSIDE.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found.append((path.stem, node.name, _stage(node)))
    return found


def test_vm_ran_every_stage(tier2):
    run = tier2.run
    if not run.complete:
        pytest.fail(
            f"{run.error or 'not every stage finished'} (stages done: {run.stages_done})\n"
            f"run directory: {run.run_dir}\n{run.serial_tail()}",
            pytrace=False,
        )


@pytest.mark.parametrize(
    ("module", "function", "stage"),
    [pytest.param(*t, id=f"{t[0]}::{t[1]}") for t in in_vm_tests()],
)
def test_in_vm(tier2, module: str, function: str, stage: int):
    cases = tier2.find(module, function)
    if not cases:
        run = tier2.run
        where = Path(run.results) / f"stage{stage}.log"
        log = where.read_text(errors="replace")[-4000:] if where.exists() else "(no in-VM log)"
        pytest.fail(
            f"{module}::{function} (stage {stage}) did not run in the VM: "
            f"{run.error or 'no result recorded'}\n--- in-VM pytest log ---\n{log}",
            pytrace=False,
        )
    failed = [c for c in cases if c.outcome in ("failed", "error")]
    if failed:
        pytest.fail(
            "\n\n".join(
                f"[in VM, stage {c.stage}] {c.name}: {c.message}\n{c.text}\n{c.stdout[-3000:]}"
                for c in failed
            ),
            pytrace=False,
        )
    skipped = [c for c in cases if c.outcome == "skipped"]
    if skipped and len(skipped) == len(cases):
        from .conftest import skip_or_fail

        skip_or_fail(f"skipped in the VM: {skipped[0].message}")
