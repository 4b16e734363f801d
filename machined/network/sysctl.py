"""The kernel switches a pymachine bridge needs, written through ``/proc/sys``.

``/proc/sys/net`` shows the network namespace of the thread that opens it, so
these act on the namespace the caller is in (the host's, for the runtime; a
throwaway one in the tests).

What is written, and why:

* ``net.ipv4.ip_forward = 1``. Forwarding is decided by the interface a packet
  *arrives* on: a machine's packets arrive on the bridge, but the replies to its
  outbound connections and the clients of ``Port=`` arrive on the uplink (any
  interface). Enabling it on the bridge alone therefore cannot work
  (systemd#33004 is the consequence); docker, podman, libvirt and LXD enable it
  globally too. pymachine's nft ``forward`` chain then drops every new
  connection *into* a pymachine bridge that is not a ``Port=`` forward, so
  machines are not exposed to anything that routes to the host.
* ``net.ipv4.conf.BRIDGE.forwarding = 1`` (implied by the above, written so the
  bridge keeps it should an administrator turn ``ip_forward`` off again).
* ``net.ipv4.conf.BRIDGE.route_localnet = 1``: packets from ``127.0.0.1``,
  DNATed by ``Port=`` in the output hook, may leave through the bridge (they are
  masqueraded to the gateway address on the way out). The nft ``input`` chain
  drops packets that arrive *on* a pymachine bridge for ``127.0.0.0/8``, which
  closes the hole route_localnet opens (CVE-2020-8558 in Kubernetes).
* IPv6, if the bridge has an IPv6 subnet: ``net.ipv6.conf.all.forwarding = 1``
  (IPv6 has no per-interface switch before Linux 6.17's ``force_forwarding``).
  With forwarding on, the kernel ignores router advertisements on interfaces
  whose ``accept_ra`` is 1, and a host configured by SLAAC would lose its
  default route; so, first, every interface (and ``default``) with
  ``accept_ra = 1`` is set to 2 ("accept even when forwarding"), which keeps
  today's behaviour. The bridge itself gets ``accept_ra = 0``: a machine must not
  be able to route the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from machined.errors import PymachineError

PROC = Path("/proc/sys/net")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def write(path: Path, value: str) -> bool:
    """Write ``value`` unless already set; True if changed."""
    if _read(path) == value:
        return False
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise PymachineError(f"cannot set {path} to {value}: {e.strerror or e}") from e
    return True


def ipv6_available() -> bool:
    return (PROC / "ipv6/conf/all/forwarding").exists() and _read(
        PROC / "ipv6/conf/all/disable_ipv6"
    ) != "1"


def enable_bridge(bridge: str, ipv6: bool) -> None:
    write(PROC / "ipv4/ip_forward", "1")
    write(PROC / f"ipv4/conf/{bridge}/forwarding", "1")
    write(PROC / f"ipv4/conf/{bridge}/route_localnet", "1")
    if ipv6:
        # the bridge itself must never learn routes from a machine's router advertisements
        write(PROC / f"ipv6/conf/{bridge}/accept_ra", "0")
    if ipv6 and _read(PROC / "ipv6/conf/all/forwarding") != "1":
        for conf in sorted((PROC / "ipv6/conf").iterdir()):
            if _read(conf / "accept_ra") == "1":
                with contextlib.suppress(PymachineError):
                    write(conf / "accept_ra", "2")
        write(PROC / "ipv6/conf/all/forwarding", "1")
