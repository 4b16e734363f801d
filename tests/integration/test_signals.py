"""Signals through `pymachine kill` and `pymachine run` (issue 16): the cases
of tini's, dumb-init's and catatonit's behavioural suites that pymachine failed."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from machined.paths import STATE_FILE
from tests.integration.test_boot import wait_booted

pytestmark = pytest.mark.tier1

# Dropped by the old init's fixed list; ALRM killed `pymachine run`.
OTHERS = ["PWR", "URG", "IO", "XCPU", "XFSZ", "VTALRM", "PROF", "PIPE", "STKFLT", "RTMIN+1"]
LOOP = "while :; do sleep 0.2; done"


def number(name: str) -> int:
    if name.startswith("RTMIN+"):
        return signal.SIGRTMIN + int(name[6:])
    return int(signal.Signals[f"SIG{name}"])


def trapping(names: list[str], then: str = LOOP) -> tuple[str, ...]:
    """A busybox sh payload that says "got-N" for each signal N it receives."""
    traps = "; ".join(f"trap 'echo got-{number(n)}' {number(n)}" for n in names)
    return ("/bin/sh", "-c", f"{traps}; echo ready; {then}")


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def payload_state(host, name: str, args: str) -> str:
    """The ps state letter of the machine's process whose command line is ARGS."""
    table = host.pymachine("exec", name, "--", "ps", "-o", "stat,args").stdout
    for row in table.splitlines()[1:]:
        state, _, command = row.strip().partition(" ")
        if command.strip() == args:
            return state
    return f"(no {args!r} in {table!r})"


def unit_show(host, unit: str) -> dict[str, str]:
    out = host.run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "ExecMainStatus"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


# --- pymachine kill of a started machine --------------------------------------


def test_kill_delivers_every_signal_to_the_payload(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=trapping(OTHERS))
    unit = f"pymachine-{name}.service"
    systemd_host.wait_for_journal(unit, "ready")
    for sig in OTHERS:
        systemd_host.pymachine("kill", name, "--signal", sig)
        systemd_host.wait_for_journal(unit, f"got-{number(sig)}")
    assert unit_show(systemd_host, unit)["ActiveState"] == "active"


def test_kill_tstp_suspends_a_payload_and_cont_resumes_it(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=("/bin/sh", "-c", LOOP))
    args = f"/bin/sh -c {LOOP}"
    assert wait_until(lambda: payload_state(systemd_host, name, args).startswith("S"))
    systemd_host.pymachine("kill", name, "-s", "TSTP")
    assert wait_until(lambda: payload_state(systemd_host, name, args).startswith("T")), (
        payload_state(systemd_host, name, args)
    )
    systemd_host.pymachine("kill", name, "-s", "CONT")
    assert wait_until(lambda: not payload_state(systemd_host, name, args).startswith("T"))


def test_kill_int_interrupts_the_payload_and_machinectl_reboot_restarts_it(
    systemd_host, make_machine, machine_name
):
    script = "echo start >> /root/boots; " + LOOP
    name = make_machine(machine_name, command=("/bin/sh", "-c", script))
    unit = f"pymachine-{name}.service"

    def boots() -> str:
        return systemd_host.pymachine("exec", name, "--", "cat", "/root/boots", check=False).stdout

    assert wait_until(lambda: boots() == "start\n")
    systemd_host.run(["machinectl", "reboot", name])
    assert wait_until(lambda: boots() == "start\nstart\n")
    systemd_host.pymachine("kill", name, "-s", "INT")
    assert wait_until(lambda: unit_show(systemd_host, unit)["ActiveState"] != "active")
    assert unit_show(systemd_host, unit)["ExecMainStatus"] == str(128 + signal.SIGINT)


def test_kill_refuses_an_unknown_signal_number(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, command=("/bin/sh", "-c", LOOP))
    result = systemd_host.pymachine("kill", name, "-s", "99", check=False)
    assert result.returncode == 2 and "unknown signal" in result.stderr
    assert unit_show(systemd_host, f"pymachine-{name}.service")["ActiveState"] == "active"


def test_kill_of_a_stopped_or_unknown_machine_says_so(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, start=False)
    stopped = systemd_host.pymachine("kill", name, "-s", "USR1", check=False)
    assert stopped.returncode == 3 and "not running" in stopped.stderr
    assert systemd_host.pymachine("kill", "no-such-machine", check=False).returncode == 4


def test_kill_never_signals_a_process_outside_the_machine(systemd_host, make_machine, machine_name):
    """A stale state file whose PID 1 is gone and whose PID now belongs to
    another process (here: a host `sleep`) must not make `kill` signal it."""
    name = make_machine(machine_name, start=False)
    bystander = systemd_host.popen(["sleep", "301"])
    try:
        found = lambda: systemd_host.run(["pgrep", "-n", "-f", "^sleep 301$"], check=False).stdout  # noqa: E731
        assert wait_until(found)
        pid = found().split()[0]
        cgroup = f"/sys/fs/cgroup/unified/system.slice/pymachine-{name}.service/payload"
        record = json.dumps(
            {
                "name": name,
                "leader": int(pid),
                "supervisor": int(pid),
                "payload_cgroup": cgroup,
                "root": "/",
                "boot": False,
                "started": 0,
            }
        )
        state = f"/run/pymachine/{name}/{STATE_FILE}"
        systemd_host.run(
            ["sh", "-c", f"mkdir -p /run/pymachine/{name} && cat > {state}"], input=record
        )
        result = systemd_host.pymachine("kill", name, "-s", "TERM", check=False)
        assert result.returncode == 3, result.stderr
        assert systemd_host.run(["kill", "-0", pid], check=False).returncode == 0  # alive
    finally:
        systemd_host.run(["rm", "-rf", f"/run/pymachine/{name}"], check=False)
        bystander.kill()
        bystander.wait(10)


def test_kill_reaches_a_booted_machines_systemd(systemd_host, debian_image, machine_name):
    """Its systemd moved itself to init.scope below the machine's cgroup:
    still the machine's PID 1. SIGRTMIN+4 is its power-off."""
    name, unit = machine_name, f"pymachine-{machine_name}.service"
    systemd_host.pymachine("create", name, "--image", debian_image, "--boot", "--network", "none")
    try:
        systemd_host.pymachine("start", name)
        assert wait_booted(systemd_host, name) in ("running", "degraded")
        systemd_host.pymachine("kill", name, "-s", "RTMIN+4")
        assert wait_until(lambda: unit_show(systemd_host, unit)["ActiveState"] == "inactive", 90)
    finally:
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)


# --- pymachine run ------------------------------------------------------------


class Run:
    """``pymachine run NAME -- PAYLOAD`` in the host, stdin /dev/null, stdout read here."""

    def __init__(self, host, name: str, payload: tuple[str, ...]) -> None:
        self.host, self.name = host, name
        self.proc = host.popen(
            [sys.executable, "-m", "machined", "run", name, "--", *payload],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 20) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return ""
        return self.proc.stdout.readline().strip()

    def runtime_pid(self) -> int:
        """`run`'s own process in the host (the runtime, once the machine is up)."""
        path = f"/run/pymachine/{self.name}/{STATE_FILE}"
        read = lambda: self.host.run(["cat", path], check=False).stdout  # noqa: E731
        assert wait_until(read), f"no {path}"  # written once the payload has started
        return json.loads(read())["supervisor"]

    def kill(self, sig: str) -> None:
        self.host.run(["kill", "-s", sig, str(self.runtime_pid())])

    def status(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.host.pymachine("stop", self.name, check=False)
            self.proc.kill()
            self.proc.wait(20)
        self.proc.stdout.close()


@pytest.fixture
def run_machine(systemd_host, make_machine):
    runs: list[Run] = []

    def start(name: str, payload: tuple[str, ...]) -> Run:
        make_machine(name, start=False)
        runs.append(Run(systemd_host, name, payload))
        return runs[-1]

    yield start
    for each in runs:
        each.close()


def test_run_survives_and_forwards_every_signal(systemd_host, run_machine, machine_name):
    """ALRM, PWR, VTALRM… killed `pymachine run` (the container then died of
    the parent-death signal, without a stop, and left its state for `gc`)."""
    names = [*OTHERS, "ALRM", "CONT"]
    run = run_machine(machine_name, trapping(names))
    assert run.line() == "ready"
    for sig in names:
        run.kill(sig)
        assert run.line() == f"got-{number(sig)}", f"{sig} did not reach the payload"
    run.kill("TERM")
    assert run.status() == 128 + signal.SIGTERM
    state = f"/run/pymachine/{machine_name}/{STATE_FILE}"
    assert systemd_host.run(["test", "-e", state], check=False).returncode != 0


def test_a_scripted_sigint_interrupts_run_rather_than_rebooting(
    systemd_host, run_machine, machine_name
):
    """stdin is not a terminal: SIGINT used to restart the payload."""
    run = run_machine(machine_name, ("/bin/sh", "-c", f"echo start; {LOOP}"))
    assert run.line() == "start"
    run.kill("INT")
    assert run.status() == 128 + signal.SIGINT
    assert run.proc.stdout.read() == ""  # not started again


def test_kill_reaches_a_run_machine(systemd_host, run_machine, machine_name):
    """Its scope has no main process for systemd's KillUnit."""
    run = run_machine(machine_name, trapping(["USR1"]))
    assert run.line() == "ready"
    systemd_host.pymachine("kill", machine_name, "-s", "USR1")
    assert run.line() == f"got-{int(signal.SIGUSR1)}"
    systemd_host.pymachine("kill", machine_name, "-s", "INT")
    assert run.status() == 128 + signal.SIGINT


def test_run_suspends_with_its_payload_on_sigtstp(systemd_host, run_machine, machine_name):
    """Like any program: `run` and the payload stop, SIGCONT resumes both."""
    run = run_machine(machine_name, ("/bin/sh", "-c", f"echo start; {LOOP}"))
    args = f"/bin/sh -c echo start; {LOOP}"
    assert run.line() == "start"
    runtime = run.runtime_pid()
    run.kill("TSTP")
    assert wait_until(lambda: payload_state(systemd_host, machine_name, args).startswith("T"))
    stat = lambda: systemd_host.run(["cat", f"/proc/{runtime}/stat"]).stdout  # noqa: E731
    assert wait_until(lambda: stat().rsplit(")", 1)[1].split()[0] == "T")
    run.kill("CONT")
    assert wait_until(lambda: not payload_state(systemd_host, machine_name, args).startswith("T"))
    assert stat().rsplit(")", 1)[1].split()[0] != "T"
    os.kill(run.proc.pid, signal.SIGCONT)  # nsenter (the harness's) stopped with its child
    run.kill("TERM")
    assert run.status() == 128 + signal.SIGTERM


def _tmux(host, session: str, command: str) -> None:
    host.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "20", command])


@pytest.mark.parametrize("stdin", ["terminal", "redirected"])
def test_ctrl_c_on_a_terminal_interrupts_run(systemd_host, make_machine, machine_name, stdin):
    """Ctrl-C interrupts the payload whether or not stdin is the terminal
    (with `</dev/null` it restarted the payload)."""
    name = make_machine(machine_name, start=False)
    session = f"int-{machine_name}"[:30]
    redirect = " </dev/null" if stdin == "redirected" else ""
    payload = f"/bin/sh -c 'echo start-$((40+2)); {LOOP}'"
    _tmux(
        systemd_host,
        session,
        f"{sys.executable} -m machined run {name} -- {payload}{redirect}; "
        "echo run-exit=$?; sleep 60",
    )
    screen = lambda: systemd_host.run(["tmux", "capture-pane", "-p", "-t", session]).stdout  # noqa: E731
    try:
        assert wait_until(lambda: "start-42" in screen(), 30), screen()
        systemd_host.run(["tmux", "send-keys", "-t", session, "C-c"])
        assert wait_until(lambda: "run-exit=" in screen(), 20), screen()
        assert f"run-exit={128 + signal.SIGINT}" in screen()
        assert screen().count("start-42") == 1  # not restarted
    finally:
        systemd_host.run(["tmux", "kill-session", "-t", session], check=False)
        systemd_host.pymachine("stop", name, check=False)


@pytest.mark.parametrize("stdin", ["terminal", "redirected"])
def test_ctrl_z_suspends_run_and_its_payload_and_fg_resumes_them(
    systemd_host, make_machine, machine_name, stdin
):
    """In an interactive shell, as for any command: the shell shows the job
    stopped, the payload is stopped, `fg` resumes both."""
    name = make_machine(machine_name, start=False)
    session = f"tstp-{machine_name}"[:30]
    redirect = " </dev/null" if stdin == "redirected" else ""
    payload = f"/bin/sh -c 'echo start-$((40+2)); {LOOP}'"
    args = f"/bin/sh -c echo start-$((40+2)); {LOOP}"
    _tmux(systemd_host, session, "bash --norc --noprofile -i")
    screen = lambda: systemd_host.run(["tmux", "capture-pane", "-p", "-t", session]).stdout  # noqa: E731
    keys = lambda *k: systemd_host.run(["tmux", "send-keys", "-t", session, *k])  # noqa: E731
    state = lambda: payload_state(systemd_host, name, args)  # noqa: E731
    try:
        keys(f"{sys.executable} -m machined run {name} -- {payload}{redirect}", "Enter")
        assert wait_until(lambda: "start-42" in screen(), 30), screen()
        keys("C-z")
        assert wait_until(lambda: "Stopped" in screen(), 20), screen()
        assert wait_until(lambda: state().startswith("T")), state()
        keys("fg", "Enter")
        assert wait_until(lambda: not state().startswith("T")), state()
        keys("C-c")
        keys("echo run-exit-$?-", "Enter")  # the status shows as run-exit-N-
        assert wait_until(lambda: re.search(r"run-exit-\d+-", screen()), 20), screen()
        assert f"run-exit-{128 + signal.SIGINT}-" in screen()
    finally:
        systemd_host.run(["tmux", "kill-session", "-t", session], check=False)
        systemd_host.pymachine("stop", name, check=False)
