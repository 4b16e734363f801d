"""The process pymachined starts for ``ExecMachine``: ``exec``/``shell`` as
the CLI runs them in-process as root (:mod:`machined.runtime.enter`), with the
caller's stdio as its own, its exit status written to a status descriptor.

A process of its own, in a session of its own, so that it outlives a restart
of pymachined (the unit has ``KillMode=process``) and the daemon never forks
its threaded event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from machined import machines

BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split(':'); "
    "from machined.daemon.enter import main; sys.exit(main(sys.argv[1:]))"
)


def command(request: dict, status_fd: int, signal_fd: int) -> list[str]:
    """The helper's argv: ``python -I -S`` with the module path spelled out, as
    the units' runtime is started (:func:`machined.machines.runtime_command`)."""
    path = machines.runtime_command(request["name"])[5]
    fds = [str(status_fd), str(signal_fd)]
    return [sys.executable, "-I", "-S", "-c", BOOTSTRAP, path, json.dumps(request), *fds]


#: What a client may forward: a terminal's keys, a hangup, a resize (``shell``:
#: the relay copies the caller's window size to the machine's pty again).
FORWARDED = frozenset({2, 3, 15, 1, 28})  # SIGINT SIGQUIT SIGTERM SIGHUP SIGWINCH


def _children() -> list[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def copy_command(request: dict) -> list[str]:
    return command(request, 0, 0)[:-2]


def forward_signals(fd: int) -> None:
    """The client's signals, a byte each on FD, to our child (the process that
    joined the machine, which forwards them to the command, as it does for the
    CLI's own signals); EOF, the client gone: SIGHUP. Not to our whole process
    group: the command would get each signal twice (and its forwarder could
    find it gone)."""
    import signal
    import threading

    def send(number: int) -> None:
        for child in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, number)

    def relay() -> None:
        while data := os.read(fd, 16):
            for number in data:
                if number in FORWARDED:
                    send(number)
        send(signal.SIGHUP)

    threading.Thread(target=relay, daemon=True).start()


def run(request: dict, paths=None) -> int:  # noqa: ANN001
    """REQUEST (:func:`machined.daemon.service.exec_request`) in its running
    machine with this process's stdio: the command's exit status."""
    from machined.runtime.enter import ExecRequest, run_in_machine
    from machined.runtime.init import DEFAULT_PATH

    with machines.Machines(paths) as m:
        state = m.running_state(request["name"])
        definition = m.load(request["name"])
    base = {"PATH": DEFAULT_PATH, "container": "pymachine", **definition.environment}
    exec_request = ExecRequest(
        request["command"],
        request["environment"],
        request["user"],
        request["working_directory"],
        pty=request["pty"],
    )
    return run_in_machine(state, exec_request, base)


def copy(request: dict) -> int:
    """copy-to (the caller's file is our stdin) or copy-from (into our stdout)
    of one regular file: its exit code; warnings and the error on stderr."""
    from machined import transfer
    from machined.errors import PymachineError

    try:
        with machines.Machines() as m:
            state = m.running_state(request["name"])
        if request["op"] == "copy-to":
            warnings = transfer.copy_fd_to(state, 0, request["source_name"], request["path"])
        else:
            warnings = transfer.copy_to_fd(state, request["path"], 1)
    except PymachineError as exc:
        print(f"pymachine: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        return copy(json.loads(argv[0]))
    request, status_fd, signal_fd = json.loads(argv[0]), int(argv[1]), int(argv[2])
    for fd in (status_fd, signal_fd):
        os.set_inheritable(fd, False)  # never into the machine: only stdio crosses
    import signal

    from machined.errors import PymachineError

    for number in (signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):  # ours are the command's
        signal.signal(number, lambda *_: None)  # (a handler, not SIG_IGN: exec resets it)
    forward_signals(signal_fd)
    try:
        code = run(request)
    except PymachineError as exc:
        print(f"pymachine: {exc}", file=sys.stderr)
        code = int(exc.exit_code)
    with contextlib.suppress(OSError):  # the caller may have gone
        os.write(status_fd, f"{code}\n".encode())
    return code
