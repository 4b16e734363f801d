"""Project-wide pytest fixtures and policy.

* Tests marked ``tier1`` (or using a systemd host fixture, which marks them)
  are skipped when a tier-1 host cannot be booted here, or fail if ``CI`` is
  set: see :mod:`tests.harness`.
* ``systemd_host``: one booted host for the whole session, shared by tier-1
  tests; use unique machine and unit names in it.
* ``fresh_systemd_host``: a factory for tests that need a host of their own,
  ``fresh_systemd_host(name="pymtest", binds=None, start=True)``; every host
  it made is stopped after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness import require_tier1, skip_or_fail
from tests.harness.systemd_host import SystemdHost, default_binds

__all__ = ["require_tier1", "skip_or_fail"]

_TIER1_FIXTURES = {"systemd_host", "fresh_systemd_host"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _TIER1_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.tier1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("tier1"):
        require_tier1()


@pytest.fixture(scope="session")
def systemd_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    """One throwaway systemd host for the whole test session (booted on first use)."""
    require_tier1()
    base = tmp_path_factory.mktemp("systemd-host")
    host = SystemdHost(base / "host", binds=default_binds(base))
    host.start()
    try:
        # pymachined installed from the start, as `pymachine install-units` leaves a
        # host: every verb takes the path users get (the CLI as the daemon's client),
        # whatever order the tests run in.
        host.pymachine("install-units")
        yield host
    finally:
        host.stop()


@pytest.fixture
def fresh_systemd_host(tmp_path: Path) -> Iterator[Callable[..., SystemdHost]]:
    """A factory of systemd hosts of the test's own, stopped after the test."""
    require_tier1()
    hosts: list[SystemdHost] = []

    def make(
        name: str = "pymtest",
        binds: Mapping[str, Path | str] | None = None,
        *,
        start: bool = True,
        **kw,
    ) -> SystemdHost:
        base = tmp_path / f"host{len(hosts)}"
        host = SystemdHost(
            base / "host", name=name, binds=default_binds(base) if binds is None else binds, **kw
        )
        hosts.append(host)
        if start:
            host.start()
        return host

    try:
        yield make
    finally:
        for host in hosts:
            host.stop()
