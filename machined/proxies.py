"""Port forwards on the host's ``[::1]``: socket-activated systemd-socket-proxyd.

nftables serves ``Port=`` on 127.0.0.1 and every other host address, but IPv6
has no ``route_localnet``, so a DNAT from ``[::1]`` cannot be answered
(``machined.network.loopback_proxies`` says which forwards need this). As
systemd-nspawn users are told to do by hand (systemd#6106), each such forward
becomes a transient ``.socket`` listening on ``[::1]:PORT`` with a
``systemd-socket-proxyd`` service behind it. Both are ``BindsTo=`` the
machine's unit, so systemd removes them whenever the machine goes, even after
a SIGKILLed runtime.
"""

from __future__ import annotations

import shutil

from machined.properties import Property

PROXYD_DIRS = "/lib/systemd:/usr/lib/systemd"


def proxyd() -> str | None:
    return shutil.which("systemd-socket-proxyd", path=PROXYD_DIRS)


def unit_names(machine: str, port: int) -> tuple[str, str]:
    base = f"pymachine-{machine}-port{port}"
    return f"{base}.socket", f"{base}.service"


def start(systemd, machine: str, machine_unit: str, proxies) -> list[str]:
    """Start a socket + proxy service per entry of ``network.loopback_proxies``."""
    binary = proxyd()
    if binary is None or not proxies:
        return []
    started = []
    for proxy in proxies:
        port = int(proxy.listen.rsplit(":", 1)[1])
        socket_unit, service_unit = unit_names(machine, port)
        bound = [
            Property("BindsTo", "as", [machine_unit]),
            Property("CollectMode", "s", "inactive-or-failed"),
        ]
        socket_props = [
            Property("Description", "s", f"pymachine machine {machine}: [::1]:{port}"),
            Property("Listen", "a(ss)", [("Stream", proxy.listen)]),
            Property("BindIPv6Only", "s", "ipv6-only"),  # activates the service of the same name
            *bound,
        ]
        service_props = [
            Property(
                "Description", "s", f"pymachine machine {machine}: [::1]:{port} → {proxy.target}"
            ),
            Property("ExecStart", "a(sasb)", [(binary, [binary, proxy.target], False)]),
            *bound,
        ]
        systemd.reset_failed(socket_unit)
        systemd.start_transient(socket_unit, socket_props, aux=[(service_unit, service_props)])
        started.append(socket_unit)
    return started
