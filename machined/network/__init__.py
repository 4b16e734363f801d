"""Networking of machines: bridge, veth pair, addresses, NAT and port forwards.

The runtime calls, as root in the host's network namespace:

* :func:`setup` after the machine's PID 1 has its own network namespace;
* :func:`render_etc_files` to write the machine's ``/etc/hosts`` and
  ``/etc/resolv.conf`` (bind-mounted over the rootfs' own);
* :func:`teardown` when the machine stops (and :func:`setup` calls it first
  when a previous run left something behind);
* :func:`release` when the machine is removed (it loses its address);
* :func:`gc` to clean what runtimes killed with SIGKILL left;
* :func:`address_of` for ``list``/``status`` (reads one file, no netlink).

``Mode=bridge``: the bridge (default ``pymachine0``) is made on first use with
the gateway addresses of its subnets (IPv4 and an IPv6 ULA /64, see
:mod:`.addresses`); each machine gets a veth pair, ``vm-NAME`` (or ``vh-HASH``
for long names; alias ``pymachine:NAME``) on the bridge and ``host0`` inside,
a persisted address lease, default routes via the bridge, and nftables rules
in the table ``inet pymachine`` (:mod:`.nft`): outbound masquerade and one DNAT
rule per ``Port=`` and IP family, reachable on every local address of the host,
``127.0.0.1`` included; ``[::1]`` needs a userspace proxy the runtime starts
(:func:`loopback_proxies`). Forwarding switches: :mod:`.sysctl`.
``Mode=none``: only ``lo``, brought up. ``Mode=host``: nothing to do.

Files: leases and bridge subnets under ``paths.state/network`` (kept), one
runtime record per machine under ``paths.runtime/.network`` (:mod:`.state`).

The kernel-facing modules (:mod:`.links` and :mod:`.rtnl`, :mod:`.nft`,
:mod:`.sysctl`) are imported inside the functions that need them, never at
module level: ``list``, ``status`` and a ``Mode=none`` start load none of them.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~1.6 ms in the
if TYPE_CHECKING:  # runtime, which runs without site: nothing there imports it)
    from typing import Any

#: What ``from machined import network; network.setup(…)`` reaches, loaded on
#: first use: importing a submodule (``machined.network.config`` for the
#: definition's NetworkMode, ``.state`` for the clean-up) runs this file, and
#: every CLI call and every start pays for what it imports.
_LIFECYCLE = frozenset(
    {
        "NetworkState",
        "LoopbackProxy",
        "setup",
        "teardown",
        "release",
        "address_of",
        "state_of",
        "gc",
        "remove_bridge",
        "loopback_proxies",
        "render_etc_files",
    }
)
#: The /etc files' own names, from their light module (no lifecycle).
_ETC = frozenset({"host_resolvers", "HOST_RESOLV_CONF", "RESOLVED_UPSTREAM"})


def __getattr__(name: str) -> Any:
    if name in _LIFECYCLE:
        from machined.network import lifecycle

        return getattr(lifecycle, name)
    if name in _ETC:
        from machined.network import etc

        return getattr(etc, name)
    raise AttributeError(f"module 'machined.network' has no attribute {name!r}")
