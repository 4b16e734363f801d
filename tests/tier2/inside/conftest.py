"""In-VM pytest configuration: one stage of tests per boot.

The stage runner (``run-stage`` in ``tests/tier2/vm.py``) sets ``TIER2_STAGE``;
tests marked ``@pytest.mark.stage(N)`` run on boot N, unmarked ones on boot 1.
"""

from __future__ import annotations

import os

import pytest

STAGE = int(os.environ.get("TIER2_STAGE", "1"))
STAGES = int(os.environ.get("TIER2_STAGES", "1"))


def _stage_of(item: pytest.Item) -> int:
    marker = item.get_closest_marker("stage")
    return int(marker.args[0]) if marker else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _stage_of(item) > STAGES:
            raise pytest.UsageError(
                f"{item.nodeid} wants stage {_stage_of(item)}, the VM boots only {STAGES} times"
            )
    keep = [i for i in items if _stage_of(i) == STAGE]
    drop = [i for i in items if _stage_of(i) != STAGE]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
