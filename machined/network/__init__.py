"""Networking of machines: bridge, veth pair, addresses, NAT, port forwards, names.

pymachined owns the host side: when a bridged machine's runtime has made the
machine's network namespace, it asks the daemon (``SetUpNetwork``, one D-Bus
call naming the machine and its PID 1), which runs :func:`attach` and answers
with the machine's :class:`NetworkState`; when the machine's unit goes
inactive, whatever stopped it, the daemon runs :func:`teardown`, and at its
own start :func:`gc` (:mod:`machined.daemon.network`). A runtime on a host
without pymachined runs :func:`attach` itself and :func:`teardown` when it
ends.

* :func:`attach`: :func:`setup`, the machine's ``/etc/hosts`` and
  ``/etc/resolv.conf``, the bridge's dnsmasq, the ``[::1]`` proxies;
* :func:`teardown` when the machine stops (and :func:`setup` calls it first
  when a previous run left something behind);
* :func:`release` when the machine is removed (it loses its address);
* :func:`gc` to clean what machines that are not running left;
* :func:`address_of` for ``list``/``status`` (reads one file, no netlink).

``Mode=bridge``: the bridge (default ``pymachine0``) is made on first use with
the gateway addresses of its subnets (IPv4 and an IPv6 ULA /64, see
:mod:`.addresses`); each machine gets a veth pair, ``vm-NAME`` (or ``vh-HASH``
for long names; alias ``pymachine:NAME``) on the bridge and ``host0`` inside,
a persisted address lease, default routes via the bridge, and nftables rules
in the table ``inet pymachine`` (:mod:`.nft`): outbound masquerade and one DNAT
rule per ``Port=`` and IP family, reachable on every local address of the host,
``127.0.0.1`` included; ``[::1]`` needs a userspace proxy
(:func:`loopback_proxies`). Names between machines: :mod:`.dns`. Forwarding
switches: :mod:`.sysctl`. ``Mode=none``: only ``lo``, which the runtime
brings up itself (:mod:`machined.runtime.loopback`). ``Mode=host``: nothing.

Files: leases and bridge subnets under ``paths.state/network`` (kept), one
runtime record per machine under ``paths.runtime/NAME`` (:mod:`.state`).

This package's ``__init__`` loads :mod:`.lifecycle` on first use only: the
definition's ``NetworkMode`` lives in :mod:`.config`, which every CLI call
imports, and the kernel-facing modules (:mod:`.links` on pyroute2, ~130 ms of
import; :mod:`.nft`) are imported inside the functions that use them.
"""

from __future__ import annotations

#: What ``from machined import network; network.setup(…)`` reaches, loaded on first use.
_LIFECYCLE = frozenset(
    {
        "NetworkState",
        "LoopbackProxy",
        "attach",
        "setup",
        "teardown",
        "teardown_locked",
        "release",
        "address_of",
        "state_of",
        "gc",
        "remove_bridge",
        "loopback_proxies",
        "render_etc_files",
        "delete_lingering_veth",
    }
)
#: The /etc files' own names, from their light module (no lifecycle).
_ETC = frozenset({"host_resolvers", "HOST_RESOLV_CONF", "RESOLVED_UPSTREAM"})


def __getattr__(name: str) -> object:
    if name in _LIFECYCLE:
        from machined.network import lifecycle

        return getattr(lifecycle, name)
    if name in _ETC:
        from machined.network import etc

        return getattr(etc, name)
    raise AttributeError(f"module 'machined.network' has no attribute {name!r}")
