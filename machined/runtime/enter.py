"""Run a command inside a running machine, like ``nsenter`` + ``chroot``:
join the container's cgroup (so its limits hold), then its namespaces and
root, fork once more so the command lives in the container's PID namespace,
and pass its exit status back. ``pymachine shell`` adds a pseudo-terminal
from the machine's own devpts instance, relayed to the user's terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import termios
import tty
from dataclasses import dataclass, field
from pathlib import Path

from machined.runtime import fds, linux, restrict, security, userns, users
from machined.runtime.init import exit_status
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
FORWARDED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class ExecRequest:
    """What ``pymachine exec``/``shell`` runs inside a machine, and how."""

    argv: list[str]  # empty: the user's shell, as a login shell
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    working_directory: str | None = None
    pty: bool = False  # a new pseudo-terminal inside the machine (pymachine shell)
    preserve_fds: int = 0  # fds 3 … 3+N-1 of the caller cross too (--preserve-fds)


def _join(state: RuntimeState) -> None:
    """Join the machine from the current (already forked) process."""
    Path(state.payload_cgroup, "cgroup.procs").write_text(str(os.getpid()))
    fds = []
    for name, nstype in NAMESPACES:
        path = f"/proc/{state.leader}/ns/{name}"
        if os.readlink(path) != os.readlink(f"/proc/self/ns/{name}"):
            fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), nstype))
    root = os.open(f"/proc/{state.leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    user_ns = userns.open_ns(state.leader)  # security.py, userns.py: as the machine's PID 1
    policy = security.read_state(Path(state.root).parent)
    # on the host (libseccomp may be out of reach inside), applied once we are in
    restrictions = (
        security.restrictions(policy, security.cache_dir(Path(state.root).parents[1]))
        if policy is not None
        else None
    )
    for fd, nstype in fds:
        linux.setns(fd, nstype)
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    userns.join(user_ns)
    if restrictions is not None:
        restrict.apply(**restrictions)


def _exec(request: ExecRequest, base_env: dict[str, str]) -> None:
    """Runs inside the machine's root: everything it uses is imported already."""
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
    argv = request.argv or [user.shell or "/bin/sh", "-l"]
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
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        print(f"pymachine: {argv[0]}: command not found in the machine", file=sys.stderr)
        os._exit(127)
    except OSError as exc:
        print(f"pymachine: {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(126)


def _wait(pid: int) -> int:
    while True:
        try:
            return exit_status(os.waitpid(pid, 0)[1])
        except InterruptedError:
            continue


def _run_plain(request: ExecRequest, base_env: dict[str, str]) -> int:
    command = os.fork()
    if command == 0:
        _exec(request, base_env)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f, pid=command: os.kill(pid, s))
    return _wait(command)


def _copy_window_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


def _run_on_pty(request: ExecRequest, base_env: dict[str, str]) -> int:
    """A new pty from the machine's devpts, the command as session leader on
    its slave side, and bytes relayed between the master and our stdio."""
    master, slave = os.openpty()
    command = os.fork()
    if command == 0:
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
        _exec(request, base_env)
    os.close(slave)
    if os.isatty(0):
        _copy_window_size(0, master)
        signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(0, master))
    inputs = [master, 0]
    while master in inputs:
        try:
            ready, _, _ = select.select(inputs, [], [])
        except InterruptedError:
            continue
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the command closed the terminal
                data = b""
            if fd == master:
                if not data:
                    inputs.remove(master)
                    break
                os.write(1, data)
            elif data:
                os.write(master, data)
            else:
                inputs.remove(0)  # our input ended: an EOF for the command
                os.write(master, b"\x04")
    return _wait(command)


def run_in_machine(state: RuntimeState, request: ExecRequest, base_env: dict[str, str]) -> int:
    """Fork, join, fork (for the PID namespace), exec; return the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    joiner = os.fork()
    if joiner == 0:
        code = 1
        try:
            # before anything joins: nothing of the host but stdio (and what was asked for)
            fds.close_inherited(request.preserve_fds)
            _join(state)
            code = _run_on_pty(request, base_env) if request.pty else _run_plain(request, base_env)
        except BaseException as exc:  # never fall back into the caller's code
            print(f"pymachine: cannot enter machine {state.name}: {exc}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    # The terminal's Ctrl-C goes to the whole process group; the command handles it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    saved = None
    if request.pty and os.isatty(0):
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    try:
        return _wait(joiner)
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
