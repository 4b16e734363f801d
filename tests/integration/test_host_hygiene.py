"""What of the host reaches a machine, and what of a machine reaches the host's
users (issue 15, items 4, 5, 10): only stdio (and ``--preserve-fds``) crosses
into a machine, no host cwd; the state directories stay closed (0700) so no
host user runs a set-user-ID file that root inside made; a host port claimed
twice is refused before anything starts."""

from __future__ import annotations

import shlex
import sys

import pytest

PM = shlex.join([sys.executable, "-m", "machined"])
# The fds of the payload's shell itself (ls would list its own directory fd too,
# and a pipeline's pipes are the shell's for a moment), then its cwd.
LIST_FDS = "ls /proc/$$/fd; readlink /proc/$$/cwd"


def _fds_and_cwd(output: str) -> tuple[list[str], str]:
    *fds, cwd = output.split()
    return sorted(fds, key=int), cwd


# --- item 4: file descriptors and the cwd ------------------------------------------


def test_exec_passes_only_stdio_and_no_host_cwd(systemd_host, make_machine, machine_name):
    """A host directory the caller left open (fd 7, not close-on-exec) and the
    caller's cwd (/etc) never reach the command: ``cat /proc/self/fd/7/passwd``
    would read the host's file, ``openat(7, "../..")`` climb to its root."""
    name = make_machine(machine_name)
    script = f"cd /etc && exec 7</etc 9</ && {PM} exec {name} -- sh -c {shlex.quote(LIST_FDS)}"
    fds, cwd = _fds_and_cwd(systemd_host.run(script).stdout)
    assert fds == ["0", "1", "2"]
    assert cwd == "/root"  # root's home in the image, not the caller's /etc
    leak = systemd_host.run(
        f"exec 7</etc && {PM} exec {name} -- cat /proc/self/fd/7/hostname", check=False
    )
    assert leak.returncode != 0 and leak.stdout == ""


def test_shell_passes_only_stdio(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    out = systemd_host.run(
        f"exec 7</etc && {PM} shell {name} -- sh -c {shlex.quote(LIST_FDS)} </dev/null"
    ).stdout
    assert _fds_and_cwd(out.replace("\r", ""))[0] == ["0", "1", "2"]


def test_exec_preserve_fds_passes_exactly_those(systemd_host, make_machine, machine_name):
    """podman's ``--preserve-fds N``: 3 … 3+N-1 cross, 3+N and above do not."""
    name = make_machine(machine_name)
    script = (
        f"exec 3</dev/null 4</dev/null 7</etc && "
        f"{PM} exec --preserve-fds 2 {name} -- sh -c {shlex.quote(LIST_FDS)}"
    )
    assert _fds_and_cwd(systemd_host.run(script).stdout)[0] == ["0", "1", "2", "3", "4"]
    given = systemd_host.run(
        f"echo handed-over > /tmp/fd-{name} && exec 3</tmp/fd-{name} && "
        f"{PM} exec --preserve-fds 1 {name} -- cat /proc/self/fd/3"
    )
    assert given.stdout == "handed-over\n"


def test_preserve_fds_refuses_a_descriptor_that_is_not_open(
    systemd_host, make_machine, machine_name
):
    name = make_machine(machine_name)
    for verb in ("exec", "run"):
        bad = systemd_host.run(
            f"exec 3</dev/null && {PM} {verb} --preserve-fds 2 {name} -- true", check=False
        )
        assert bad.returncode == 2, bad
        assert bad.stderr.strip().splitlines() == [
            "pymachine: --preserve-fds 2: file descriptor 4 is not open (fds 3 to 4 must be)"
        ]


def test_run_passes_only_stdio_and_the_preserved_fds(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, start=False)
    script = f"cd /etc && exec 7</etc && {PM} run {name} -- sh -c {shlex.quote(LIST_FDS)}"
    fds, cwd = _fds_and_cwd(systemd_host.run(script).stdout)
    assert fds == ["0", "1", "2"]
    assert cwd == "/"
    script = (
        f"exec 3</dev/null 7</etc && "
        f"{PM} run --preserve-fds 1 {name} -- sh -c {shlex.quote(LIST_FDS)}"
    )
    assert _fds_and_cwd(systemd_host.run(script).stdout)[0] == ["0", "1", "2", "3"]


def test_a_started_machine_has_only_stdio(systemd_host, make_machine, machine_name):
    """The unit's chain (supervisor → intermediate → PID 1 → pymachine-init →
    payload): nothing but stdio reaches the payload, nor PID 1 (the init)."""
    name = make_machine(
        machine_name, command=("/bin/sh", "-c", f"{LIST_FDS}; while :; do sleep 1; done")
    )
    unit = f"pymachine-{name}.service"
    journal = systemd_host.wait_for_journal(unit, "\n/")
    lines = journal.splitlines()  # systemd's lines about the unit, then the payload's
    assert [line for line in lines if line.isdigit()] == ["0", "1", "2"], journal
    assert lines[-1] == "/"
    init_fds = systemd_host.pymachine("exec", name, "--", "ls", "/proc/1/fd").stdout.split()
    assert sorted(init_fds, key=int) == ["0", "1", "2"]
