"""Which unit-derived names `pymachine list` shows as machines: not the
``[::1]`` proxies of a machine's ``Port=`` (``pymachine-MACHINE-portN``)."""

from __future__ import annotations

from machined.machines import _is_port_proxy
from machined.proxies import unit_names


def test_a_machines_port_proxy_is_not_a_machine() -> None:
    socket_unit, service_unit = unit_names("web", 8080)
    name = service_unit.removeprefix("pymachine-").removesuffix(".service")
    assert _is_port_proxy(name, {"web", name}, defined={"web"})


def test_a_machine_whose_name_looks_like_a_proxy_is_still_a_machine() -> None:
    # defined itself: a machine called db-port5432
    assert not _is_port_proxy("db-port5432", {"db", "db-port5432"}, defined={"db", "db-port5432"})
    # no machine "db" it could belong to: a running machine whose definition was removed
    assert not _is_port_proxy("db-port5432", {"db-port5432"}, defined=set())
    assert not _is_port_proxy("web-portal", {"web", "web-portal"}, defined={"web"})
