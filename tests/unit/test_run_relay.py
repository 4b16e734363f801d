"""What `pymachine run` passes on to the container's PID 1 (supervisor.Relay):
pure logic; tests/integration/test_signals.py drives it for real."""

from __future__ import annotations

import os
import signal

from machined.runtime import linux
from machined.runtime.supervisor import HALT, Relay

SI_USER = 0
SHELL = 4242  # some process outside the container


def test_a_users_signal_is_passed_on_whatever_it_is() -> None:
    relay = Relay(1, True, boot=False)
    for code in (SI_USER, linux.SI_QUEUE):
        assert relay.passes_on(code, SHELL)
        assert relay.passes_on(code, 0)  # from an ancestor PID namespace


def test_the_terminals_signals_are_passed_on_only_to_a_pid1_outside_our_group() -> None:
    """Ctrl-C reaches the whole foreground process group: pymachine-init, in
    ours, has it already; a booted systemd made a session of its own."""
    assert not Relay(1, True, boot=False).passes_on(linux.SI_KERNEL, 0)
    assert Relay(1, False, boot=True).passes_on(linux.SI_KERNEL, 0)


def test_our_own_signals_stay_with_us() -> None:
    """SIGPIPE of a write of ours to a closed pipe."""
    assert not Relay(1, True, boot=False).passes_on(SI_USER, os.getpid())


def test_a_booted_machine_halts_on_sigterm_and_sigint() -> None:
    boot, app = Relay(1, False, boot=True), Relay(1, True, boot=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        assert boot.translated(sig) == HALT
        assert app.translated(sig) == sig
    assert boot.translated(signal.SIGUSR1) == signal.SIGUSR1
