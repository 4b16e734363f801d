"""Run a command inside a running machine, like ``nsenter`` + ``chroot``:
join the container's cgroup (so its limits hold), then its namespaces and
root, fork once more so the command lives in the container's PID namespace,
and pass its exit status back.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from machined.runtime import linux, users
from machined.runtime.state import RuntimeState

# Joined in this order: cgroup first (paths are resolved in the host's view),
# mount last (after it, /proc/LEADER paths no longer resolve).
NAMESPACES = (
    ("cgroup", linux.CLONE_NEWCGROUP),
    ("ipc", linux.CLONE_NEWIPC),
    ("uts", linux.CLONE_NEWUTS),
    ("net", linux.CLONE_NEWNET),
    ("pid", linux.CLONE_NEWPID),
    ("mnt", linux.CLONE_NEWNS),
)


@dataclass
class ExecRequest:
    argv: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    working_directory: str | None = None


def _join(state: RuntimeState) -> None:
    """Join the machine from the current (already forked) process."""
    Path(state.payload_cgroup, "cgroup.procs").write_text(str(os.getpid()))
    fds = []
    for name, nstype in NAMESPACES:
        path = f"/proc/{state.leader}/ns/{name}"
        if os.readlink(path) != os.readlink(f"/proc/self/ns/{name}"):
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), nstype))
    root = os.open(f"/proc/{state.leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for fd, nstype in fds:
        linux.setns(fd, nstype)
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.close(root)


def _exec(request: ExecRequest, base_env: dict[str, str]) -> None:
    """Runs inside the machine's root: import nothing here."""
    try:
        user = users.resolve(request.user)
    except LookupError as exc:
        print(f"pymachine: {exc}", file=sys.stderr)
        os._exit(125)
    env = {
        **base_env,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        **request.environment,
    }
    workdir = request.working_directory or (user.home if os.path.isdir(user.home) else "/")
    try:
        os.chdir(workdir)
    except OSError as exc:
        print(f"pymachine: cannot change to {workdir}: {exc.strerror}", file=sys.stderr)
        os._exit(125)
    if user.uid or user.gid:
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)
    try:
        os.execvpe(request.argv[0], request.argv, env)
    except FileNotFoundError:
        print(f"pymachine: {request.argv[0]}: command not found in the machine", file=sys.stderr)
        os._exit(127)
    except OSError as exc:
        print(f"pymachine: {request.argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(126)


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def run_in_machine(state: RuntimeState, request: ExecRequest, base_env: dict[str, str]) -> int:
    """Fork, join, fork (for the PID namespace), exec; return the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    joiner = os.fork()
    if joiner == 0:
        code = 1
        try:
            _join(state)
            command = os.fork()
            if command == 0:
                _exec(request, base_env)
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, lambda s, _f, pid=command: os.kill(pid, s))
            while True:
                try:
                    _pid, wait_status = os.waitpid(command, 0)
                    break
                except InterruptedError:
                    continue
            code = _status(wait_status)
        except BaseException as exc:  # never fall back into the caller's code
            print(f"pymachine: cannot enter machine {state.name}: {exc}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    previous = signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # the terminal's Ctrl-C reaches the command
    try:
        _pid, wait_status = os.waitpid(joiner, 0)
    finally:
        signal.signal(signal.SIGINT, previous)
    return _status(wait_status)
