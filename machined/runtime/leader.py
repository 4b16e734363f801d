"""The container's first processes: a small interpreter of their own.

The runtime forks a child that execs ``python -I -S`` with this module
(:func:`spawn`, then :func:`main`): the *intermediate*. It loads only :mod:`init`,
:mod:`restrict` and :mod:`linux` (ctypes), so the container's PID 1, a fork of
it, stays at the floor of a Python process (~4 MB) instead of carrying the
runtime's heap (definitions, pyseccomp, json…: ~13 MB). That matters because
PID 1 lives as long as the machine, and in service mode the runtime hands the
unit over to it (``MAINPID=``) and exits.

The intermediate (still the host's root, so it can read the host's Python
library, even under a 0700 /root):

1. creates the user namespace first (the runtime writes its ID maps), then the
   others (PID, mount, UTS, IPC, net, cgroup), all owned by it;
2. forks PID 1, which becomes root inside and waits for its instructions;
3. reports PID 1's host PID (the runtime sets up the network meanwhile);
4. loads the set-up modules and forks the set-up child
   (:mod:`machined.runtime.container`, PID 2): it mounts /proc, /sys, /dev…,
   pivots — moving PID 1's root too — and sends PID 1 what to run; exits
   (PID 1 is re-parented to the runtime, a subreaper).

PID 1 then confines itself (capabilities, no_new_privs, seccomp compiled by
the runtime), so every payload it spawns — a rebooted one too — inherits it,
reports ``r`` and becomes the init, or execs the image's init.
"""

from __future__ import annotations

import marshal
import os
import sys

from machined.runtime import init, linux, restrict

_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from machined.runtime.leader import main; main(sys.argv[2:])"
)


class Intermediate:
    """The runtime's handle on a started intermediate: its PID and pipe ends."""

    def __init__(self, pid: int, go_write: int, report_read: int) -> None:
        self.pid = pid
        self.go_write = go_write
        self.report_read = report_read

    def go(self, flags: int, *, userns: bool) -> None:
        """Let it create the namespaces (FLAGS: clone flags besides user and PID)."""
        os.write(self.go_write, f"{flags} {int(userns)}\n".encode())


def spawn(*, foreground: bool) -> Intermediate:
    """Fork and exec the intermediate; it waits for :meth:`Intermediate.go`.

    The runtime calls this first thing, before its own imports: the ~40 ms
    the intermediate's interpreter takes to start then overlap with them."""
    from machined import package_parent

    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_write)
            os.close(report_read)
            os.set_inheritable(go_read, True)
            os.set_inheritable(report_write, True)
            argv = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, package_parent()]
            argv += [str(go_read), str(report_write), "foreground" if foreground else "service"]
            os.execv(argv[0], argv)
        except BaseException as exc:
            print(f"pymachine-runtime: cannot start the container's PID 1: {exc}", file=sys.stderr)
        finally:
            _exit(1)
    os.close(go_read)
    os.close(report_write)
    return Intermediate(pid, go_write, report_read)


def read_line(fd: int) -> bytes:
    """One newline-terminated message from a pipe (b"" if the writer is gone)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def send(fd: int, message: object) -> None:
    """One ``marshal``-ed message, length first (no json: PID 1's side loads none)."""
    data = marshal.dumps(message)
    data = len(data).to_bytes(8, "little") + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def receive(fd: int) -> object:
    """The message :func:`send` wrote; None if the writer went away first."""
    header = _read_exactly(fd, 8)
    if len(header) < 8:
        return None
    size = int.from_bytes(header, "little")
    data = _read_exactly(fd, size)
    return marshal.loads(data) if len(data) == size else None


def _become_root() -> None:
    """Root inside the (mapped) user namespace."""
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str]) -> None:
    """The intermediate: namespaces, PID 1, the set-up child; then exit."""
    go_read, report_write = int(argv[0]), int(argv[1])
    foreground = argv[2] == "foreground"
    status = 1
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        go = read_line(go_read).split()
        if not go:
            _exit(1)  # the runtime gave up before the container
        flags, userns = int(go[0]), go[1] == b"1"
        # We were started before the runtime made its mount namespace (with the
        # machine's overlay in it): join it, so the container's is a copy of it.
        ns = os.open(f"/proc/{os.getppid()}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(ns, linux.CLONE_NEWNS)
        os.close(ns)
        if userns:
            linux.unshare(linux.CLONE_NEWUSER)
            os.write(report_write, b"U")
            if os.read(go_read, 1) != b"m":  # the runtime wrote our UID/GID maps
                _exit(1)
        linux.unshare(flags | linux.CLONE_NEWPID)
        spec_read, spec_write = os.pipe()
        pid1 = os.fork()
        if pid1 == 0:
            os.close(spec_write)
            _pid1(spec_read, go_read, report_write, userns=userns, foreground=foreground)
        os.close(spec_read)
        os.write(report_write, f"P{pid1}\n".encode())  # the runtime sets up the network
        # Loaded here, after PID 1's fork (not in it) and before we are root
        # inside (after that, the host's library may be out of reach).
        from machined.runtime import container

        if os.fork() == 0:
            _set_up(container, go_read, report_write, spec_write, userns=userns)
        status = 0
    except BaseException as exc:  # report, never fall back into the caller's code
        print(
            f"pymachine-runtime: cannot create the container's namespaces: {exc}", file=sys.stderr
        )
    finally:
        _exit(status)


def _set_up(container, go_read: int, report_write: int, spec_write: int, *, userns: bool) -> None:
    status = 1
    try:
        os.close(report_write)
        if userns:
            _become_root()
        container.set_up(go_read, spec_write)
        status = 0
    except BaseException as exc:
        print(f"pymachine-init: container set-up failed: {exc}", file=sys.stderr)
    finally:
        _exit(status)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _die_with_supervisor(go_read: int) -> None:
    """Foreground (``pymachine run``): the runtime stays our parent; if it is
    SIGKILLed, we go too, so no container runs on headless in the scope."""
    linux.prctl(linux.PR_SET_PDEATHSIG, 9)
    os.set_blocking(go_read, False)
    try:
        gone = os.read(go_read, 1) == b""  # EOF: every writer (the runtime) exited
    except BlockingIOError:
        gone = False
    if gone:
        raise RuntimeError("the runtime is gone")


def _pid1(
    spec_read: int, go_read: int, report_write: int, *, userns: bool, foreground: bool
) -> None:
    status = 1
    try:
        if userns:
            _become_root()
        data = _read_all(spec_read)  # EOF once the set-up child is done
        if not data:
            raise RuntimeError("the container's file systems could not be set up")
        instructions = marshal.loads(data)
        if foreground:
            _die_with_supervisor(go_read)
        restrict.apply(**instructions["restrictions"])
        os.write(report_write, b"r")
        os.close(report_write)
        os.close(go_read)
        if "boot_init" in instructions:
            path = instructions["boot_init"]
            os.execve(path, [path], instructions["environment"])
        linux.set_process_name("pymachine-init")
        payload = init.Payload(**instructions["payload"])
        status = init.run(payload, stop_timeout=instructions["stop_timeout"])
    except BaseException as exc:  # PID 1 reports and exits, whatever it was
        print(f"pymachine-init: {exc}", file=sys.stderr)
    finally:
        _exit(status)
