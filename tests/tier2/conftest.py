"""Host side of tier 2: boot the VM once per session and hand its results to the tests."""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import vm

# inside/ is the suite that runs *in* the VM; the host's pytest must never collect it.
collect_ignore = ["inside"]


def skip_or_fail(reason: str):
    """Skip when the environment lacks something, but never silently in CI
    (the project's policy, :func:`tests.harness.skip_or_fail`)."""
    try:
        from tests.harness import skip_or_fail as shared
    except ImportError:  # run outside the repository's test package
        shared = None
    print(f"tier2: cannot run: {reason}")
    if shared is not None:
        return shared(reason)
    if os.environ.get("CI"):
        pytest.fail(
            f"{reason} (CI is set: missing prerequisites fail instead of skip)", pytrace=False
        )
    pytest.skip(reason)


@dataclass
class Case:
    stage: int
    classname: str
    name: str
    outcome: str  # passed | failed | error | skipped
    message: str
    text: str
    seconds: float
    stdout: str


def parse_junit(path: Path) -> list[Case]:
    stage = int(path.stem.removeprefix("stage"))
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message, text = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message, text = el.get("message", ""), el.text or ""
                break
        out = "\n".join(
            (el.text or "") for el in tc.findall("system-out") + tc.findall("system-err")
        )
        cases.append(
            Case(
                stage,
                tc.get("classname", ""),
                tc.get("name", ""),
                outcome,
                message,
                text,
                float(tc.get("time", 0)),
                out,
            )
        )
    return cases


@dataclass
class Tier2Session:
    run: vm.Tier2Run
    cases: list[Case]

    def find(self, module: str, function: str) -> list[Case]:
        # classname is the module's dotted path ("test_limits"), name the function,
        # with "[params]" for a parametrized one.
        return [
            c
            for c in self.cases
            if c.classname.split(".")[-1] == module
            and (c.name == function or c.name.startswith(function + "["))
        ]


_TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def tier2(tmp_path_factory: pytest.TempPathFactory) -> Tier2Session:
    problems = vm.missing_prerequisites()
    if problems:
        skip_or_fail("; ".join(problems))
    out = os.environ.get("PYMACHINE_TIER2_OUT")
    run_dir = (
        Path(out) if out else Path(tempfile.mkdtemp(prefix="pymachine-tier2-", dir="/var/tmp"))
    )
    result = vm.run_tier2(run_dir, keep=bool(os.environ.get("PYMACHINE_TIER2_KEEP")))
    _TIMINGS.update(result.timings)
    cases = [c for f in result.junit_files() for c in parse_junit(f)]
    return Tier2Session(result, cases)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _TIMINGS:
        terminalreporter.section("tier 2 wall times (s)")
        terminalreporter.write_line(json.dumps({k: round(v, 1) for k, v in _TIMINGS.items()}))
