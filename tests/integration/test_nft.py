"""pymachine's nft table for real, through both ways of running nft.

Root only, no systemd: the test thread unshares a network namespace of its own
(as in ``test_network.py``), so the table never touches the host's ruleset.
Every test runs twice: with libnftables in this process through nftables' own
Python binding (what pymachined uses) and with the ``nft`` command (its
stand-in where the binding or the library cannot be loaded);
both must give the same rules, results and error messages.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from machined.errors import Conflict, PymachineError
from machined.network import nft
from machined.network.config import PortForward
from tests.harness import skip_or_fail

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PORT = [PortForward.parse("tcp:8080:80")]
BRIDGE = nft.bridge_elements(
    "pmtest0", ipaddress.ip_network("10.219.250.0/24"), ipaddress.ip_network("fd00:5eed::/64")
)


@pytest.fixture
def own_netns() -> Iterator[None]:
    """Move the test thread into a new network namespace, and back afterwards."""
    if os.geteuid() != 0:
        skip_or_fail("nft tests need root")
    if shutil.which("nft") is None or nft._binding() is None:
        skip_or_fail("nft tests need nftables (the nft command and python3-nftables)")
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if _libc.unshare(CLONE_NEWNET) != 0:
        os.close(saved)
        skip_or_fail(f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        if _libc.setns(saved, CLONE_NEWNET) != 0:  # pragma: no cover
            raise OSError(ctypes.get_errno(), "setns back to the original netns failed")
        os.close(saved)


def without_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where python3-nftables or libnftables.so.1 cannot be loaded."""
    monkeypatch.setattr(nft._Library, "run", classmethod(lambda cls, text: None))


@pytest.fixture(params=nft.BACKENDS)
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, own_netns: None
) -> str:
    if request.param == "command":
        without_library(monkeypatch)
    return request.param


def ruleset() -> str:
    """The namespace's ruleset as nft prints it (the command, whatever the backend)."""
    return subprocess.run(
        ["nft", "list", "ruleset"], check=True, capture_output=True, text=True
    ).stdout


def test_install_is_idempotent_and_removal_exact(backend: str) -> None:
    assert nft.list_table() is None
    assert nft.remove_machine("web") == 0  # no table yet: nothing to do, no error
    nft.install_machine("web", PORT, "10.219.250.2", "fd00:5eed::2", BRIDGE)
    first = ruleset()
    nft.install_machine("web", PORT, "10.219.250.2", "fd00:5eed::2", BRIDGE)
    assert ruleset() == first  # stale rules replaced, base chains rewritten: same table
    assert first.count('comment "pymachine:web:tcp:8080:80"') == 2
    nft.install_machine("db", [PortForward.parse("udp:53:53")], "10.219.250.3", None, BRIDGE)
    assert nft.remove_machine("web") == 2
    assert nft.remove_machine("web") == 0
    assert [r.machine for r in nft.machine_rules(nft.list_table())] == ["db"]
    assert nft.remove_machines_except(set()) == ["db"]
    nft.delete_table()
    assert nft.list_table() is None


def test_both_backends_make_the_same_table(
    own_netns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft.install_machine("web", PORT, "10.219.250.2", "fd00:5eed::2", BRIDGE)
    in_process = ruleset()
    nft.delete_table()
    without_library(monkeypatch)
    nft.install_machine("web", PORT, "10.219.250.2", "fd00:5eed::2", BRIDGE)
    assert ruleset() == in_process


def test_taken_host_port_is_a_conflict(backend: str) -> None:
    nft.install_machine("web", PORT, "10.219.250.2", None, BRIDGE)
    with pytest.raises(Conflict, match="tcp:8080 is already forwarded to machine 'web'"):
        nft.install_machine("other", PORT, "10.219.250.3", None, BRIDGE)
    assert "pymachine:other" not in ruleset()


def test_failed_batch_is_atomic_with_nft_message(backend: str) -> None:
    nft.install_machine("web", PORT, "10.219.250.2", None, BRIDGE)
    before = ruleset()
    bad = {
        "delete": {
            "rule": {"family": "inet", "table": "pymachine", "chain": "ports", "handle": 9999}
        }
    }
    with pytest.raises(PymachineError) as failed:
        nft.run([{"add": {"chain": {"family": "inet", "table": "pymachine", "name": "x"}}}, bad])
    assert str(failed.value) == (
        "nft failed: internal:0:0-0: Error: Could not process rule: No such file or directory"
    )
    assert ruleset() == before  # nothing of the batch applied


def test_context_is_kept_close_on_exec_and_per_network_namespace(own_netns: None) -> None:
    nft.install_machine("web", PORT, "10.219.250.2", None, BRIDGE)
    sockets = nft._sockets()
    assert sockets and not any(os.get_inheritable(fd) for fd in sockets)
    nft.remove_machine("web")
    assert nft._sockets() == sockets  # the same context: kept, not one per command
    assert _libc.unshare(CLONE_NEWNET) == 0  # another namespace (the fixture restores ours)
    assert nft.list_table() is None  # not the first namespace's table
    assert len(nft._sockets()) == len(sockets)  # that namespace's context was freed


def test_without_nftables_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    without_library(monkeypatch)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(PymachineError, match="nft not found: install nftables"):
        nft.list_table()
