"""What a stopped bridged machine's network leaves (veth, nft rules, record), removed, light.

(Not ``teardown.py``: a submodule of that name would replace the package's
lazy ``machined.network.teardown`` function once imported.)

Every stop of a bridged machine runs it, in the unit's ``ExecStopPost=``
(:mod:`machined.runtime.cleanup`), and its imports are most of what that
process costs: so it works from the record's path and the machine's name
alone with plain functions (no dataclasses, typing, ``json``, ``socket``,
``threading``, leases or links), :mod:`.nftlib` for the rules and
:mod:`.rtnl` only when the veth is still there. :func:`machined.network.teardown`
(the supervisor's, ``gc``'s and the next setup's) is this function.

The veth usually is gone by then: it dies with the machine's network
namespace. But the kernel removes a dead namespace's devices asynchronously
(``cleanup_net`` on a workqueue), so one may linger for a moment after the
container's last process exited; it is deleted here, before the stop
completes, or a quick restart would find its name taken (EEXIST).
"""

from __future__ import annotations

import _socket
import errno
import os

from machined.network import state

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from machined.network.rtnl import Rtnl


def teardown(machine: str, record_path: str) -> None:
    """Remove the machine's nft rules and veth, then its record; keep its lease. Idempotent.

    Needs nothing but the record (or, without one, the machine's name): works
    after the runtime was killed with SIGKILL.
    """
    record = state.read_file(record_path) or {}
    failed = None
    # The rules first: their deletion's destroy work (an RCU grace period, a few
    # ms) must end before this process can close its nft socket, i.e. exit, so
    # the rest of the clean-up runs meanwhile. Setup records the ports before it
    # installs their rules: no ports, no rules (a record without the key, an
    # unreadable one: look in the table anyway).
    if record.get("ports") != []:
        from machined.network import nftlib  # (ctypes: not for the CLI's veth check)

        try:
            nftlib.remove_machine(machine)
        except OSError as exc:
            failed = exc  # the veth still goes; the record stays for gc and the next start
    delete_lingering_veth(machine, record.get("host_ifname"))
    if failed is not None:
        raise failed
    try:  # noqa: SIM105 - contextlib costs ~2 ms of imports here
        os.unlink(record_path)
    except FileNotFoundError:
        pass


def delete_lingering_veth(machine: str, ifname: str | None = None) -> None:
    """Delete the machine's host-side veth (IFNAME, else the name it gets) if the
    kernel has not removed it with the machine's namespace yet: one ioctl, and
    rtnetlink only for a veth that lingers."""
    ifname = ifname or state.host_ifname(machine)
    if link_exists(ifname):
        from machined.network.rtnl import Rtnl

        with Rtnl() as ipr:
            delete_link(ipr, ifname, machine)


def link_exists(ifname: str) -> bool:
    """Whether this network namespace has an interface of that name (an ioctl;
    ``_socket``'s ``if_nametoindex``, as ``socket`` costs ~3 ms to import)."""
    try:
        _socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def delete_link(ipr: Rtnl, ifname: str, machine: str) -> bool:
    """Delete the machine's host-side veth if it is there (and is ours); True if deleted."""
    try:
        link = ipr.get_link(ifname=ifname)
    except OSError as e:
        if e.errno == errno.ENODEV:
            return False
        raise
    if link.alias not in (None, state.ALIAS_PREFIX + machine) or link.kind != "veth":
        return False  # someone else's interface that happens to have this name
    try:
        ipr.del_link(link.index)
    except OSError as e:
        if e.errno != errno.ENODEV:
            raise
        return False
    return True
