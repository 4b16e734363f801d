"""pymachine-init's signals (issue 16), as PID 1 of a fresh PID namespace,
signalled from outside it as systemd, machined and pymachine do.

The tier-1 tests (tests/integration/test_signals.py) drive the same through
``pymachine kill`` and ``pymachine run``; these check the init alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from machined.runtime import init, linux
from tests.harness import skip_or_fail

# What tini and catatonit forward and our init dropped (issue 16, 1.), ALRM
# and real-time signals that are not systemd's power signals.
RT = signal.SIGRTMIN
OTHERS = [
    signal.SIGPWR,
    signal.SIGURG,
    signal.SIGIO,
    signal.SIGXCPU,
    signal.SIGXFSZ,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGPIPE,
    signal.SIGSTKFLT,
    signal.SIGALRM,
    RT,
    RT + 1,
    RT + 2,
    RT + 7,
    RT + 20,
    signal.SIGRTMAX,
]

# Prints "ready", then "got N" for each signal N of its argv it receives.
CATCHER = """
import os, signal, sys, time
def show(sig, frame):
    os.write(1, b"got %d\\n" % sig)  # print() is not reentrant
for sig in sys.argv[1:]:
    signal.signal(int(sig), show)
os.write(1, b"ready\\n")
while True:
    time.sleep(1)
"""
LOOP = "echo start; while :; do sleep 0.05; done"


@pytest.fixture(autouse=True)
def _root_and_unshare() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("needs root and unshare(1) for a PID namespace")


class Pid1:
    """``pymachine-init ARGV`` as PID 1 of a new PID namespace, and its payload."""

    def __init__(self, argv: list[str]) -> None:
        assert os.access(init.BINARY, os.X_OK), f"{init.BINARY} is not built (./dev/setup)"
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", init.BINARY, *argv[1:]],
            env={"PATH": init.DEFAULT_PATH},
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.init = self.child_of(self.proc.pid)

    def child_of(self, pid: int) -> int:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        for _ in range(1000):
            if found := children.read_text().split():
                return int(found[0])
            select.select([], [], [], 0.01)
        raise AssertionError(f"process {pid} started no child")

    def payload(self) -> int:
        return self.child_of(self.init)

    def line(self, timeout: float = 10) -> str:
        """The payload's next line of output ('' if none came in TIMEOUT seconds)."""
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return ""
        return self.proc.stdout.readline().strip()

    def kill(self, sig: int) -> None:
        """As systemd and machined send: kill(2) from outside the namespace."""
        os.kill(self.init, sig)

    def queue(self, sig: int) -> None:
        """As pymachine run and kill send: queued (sigqueue)."""
        pidfd = os.pidfd_open(self.init)
        try:
            linux.queue_signal(pidfd, sig)
        finally:
            os.close(pidfd)

    def status(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def pid1():
    started: list[Pid1] = []

    def start(argv: list[str], **options) -> Pid1:
        started.append(Pid1(init.command_line(argv, **options)))
        return started[-1]

    yield start
    for each in started:
        each.close()


def state_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, wanted: bool, states: str = "Tt") -> bool:
    for _ in range(500):
        if (state_of(pid) in states) == wanted:
            return True
        select.select([], [], [], 0.02)
    return False


def test_every_signal_but_the_power_ones_reaches_the_payload(pid1) -> None:
    machine = pid1([sys.executable, "-c", CATCHER, *map(str, OTHERS)])
    assert machine.line() == "ready"
    for sig in OTHERS:
        machine.kill(sig)
        assert machine.line() == f"got {sig}", f"signal {sig} did not arrive"
    machine.kill(signal.SIGTERM)
    assert machine.status() == 128 + signal.SIGTERM


@pytest.mark.parametrize("sig", ["SIGTSTP", "SIGTTIN", "SIGTTOU"])
def test_a_job_control_stop_stops_a_payload_that_does_not_catch_it(pid1, sig) -> None:
    """The kernel discards their default action in the payload's own session
    (an orphaned process group): the init stops its whole job with SIGSTOP
    instead, as Ctrl-Z would, and SIGCONT resumes all of it."""
    # no fork after the start (dash's vfork would hold a stopped parent in D)
    machine = pid1(["sh", "-c", "sleep 1000 & echo start; exec sleep 1000"])
    assert machine.line() == "start"
    payload = machine.payload()
    job = [payload, machine.child_of(payload)]
    machine.kill(signal.Signals[sig])
    for pid in job:
        assert wait_for_state(pid, True), f"{sig}: {pid} is {state_of(pid)}"
    machine.kill(signal.SIGCONT)
    for pid in job:
        assert wait_for_state(pid, False), f"SIGCONT: {pid} is {state_of(pid)}"


def test_a_payload_that_catches_sigtstp_gets_it_and_goes_on(pid1) -> None:
    """A shell or an editor decides itself what a SIGTSTP means."""
    machine = pid1([sys.executable, "-c", CATCHER, str(int(signal.SIGTSTP))])
    assert machine.line() == "ready"
    machine.kill(signal.SIGTSTP)
    assert machine.line() == f"got {int(signal.SIGTSTP)}"
    assert state_of(machine.payload()) not in "Tt"


def test_a_payload_that_ignores_sigtstp_is_not_stopped(pid1) -> None:
    """SIG_IGN is the payload's choice too (/proc's SigIgn): it goes on, as the
    USR1 it answers after the TSTP shows."""
    ignoring = "import signal; signal.signal(signal.SIGTSTP, signal.SIG_IGN)\n" + CATCHER
    usr1 = int(signal.SIGUSR1)
    machine = pid1([sys.executable, "-c", ignoring, str(usr1)])
    assert machine.line() == "ready"
    machine.kill(signal.SIGTSTP)
    machine.kill(signal.SIGUSR1)
    assert machine.line() == f"got {usr1}"
    assert state_of(machine.payload()) not in "Tt"


def test_a_killed_sigint_reboots_a_queued_one_interrupts(pid1) -> None:
    """kill(2) is machinectl reboot's way (the payload starts again);
    pymachine run and kill queue the user's interrupt (the payload ends: 130)."""
    machine = pid1(["sh", "-c", LOOP])
    assert machine.line() == "start"
    machine.kill(signal.SIGINT)
    assert machine.line() == "start"  # rebooted
    machine.queue(signal.SIGINT)
    assert machine.status() == 128 + signal.SIGINT


def test_sigterm_reaches_a_stopped_payload(pid1) -> None:
    """SIGTERM is followed by SIGCONT (as systemd does): a suspended payload
    ends on a stop at once, not by SIGKILL after the stop timeout."""
    machine = pid1(["sh", "-c", LOOP], stop_timeout=600)
    assert machine.line() == "start"
    payload = machine.payload()
    os.kill(payload, signal.SIGSTOP)
    assert wait_for_state(payload, True)
    machine.kill(signal.SIGTERM)
    assert machine.status() == 128 + signal.SIGTERM
