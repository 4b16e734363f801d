"""The init's exit status for its payload, from real wait statuses of forked children."""

from __future__ import annotations

import os
import signal

import pytest

from machined.runtime.init import exit_status


def _wait_status_of(child) -> int:
    """Fork, run ``child()`` in the child (which must end the process), return the wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        finally:
            os._exit(99)  # child() should never return
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("code", [0, 1, 3, 42, 127, 255])
def test_exit_code_is_passed_on(code: int) -> None:
    status = _wait_status_of(lambda: os._exit(code))
    assert os.WIFEXITED(status)
    assert exit_status(status) == code


def _die_by(sig: int):
    def child() -> None:
        if sig != signal.SIGKILL:  # SIGKILL's disposition cannot be changed
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        signal.pause()

    return child


@pytest.mark.parametrize(
    ("sig", "expected"),
    [
        (signal.SIGKILL, 137),
        (signal.SIGTERM, 143),
        (signal.SIGINT, 130),
        (signal.SIGHUP, 129),
        (signal.SIGALRM, 142),
        (signal.SIGUSR1, 138),
    ],
)
def test_killed_by_signal_is_128_plus_n(sig: int, expected: int) -> None:
    status = _wait_status_of(_die_by(sig))
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == sig
    assert exit_status(status) == expected


def test_exit_3_and_sigkill_from_the_brief() -> None:
    assert exit_status(_wait_status_of(lambda: os._exit(3))) == 3
    assert exit_status(_wait_status_of(_die_by(signal.SIGKILL))) == 137


def test_exit_code_143_is_not_confused_with_sigterm() -> None:
    status = _wait_status_of(lambda: os._exit(143))
    assert os.WIFEXITED(status) and not os.WIFSIGNALED(status)
    assert exit_status(status) == 143
