"""The container's first processes: the intermediate, then PID 1.

The runtime forks the *intermediate* first thing (:func:`spawn`), so that it
loads the set-up modules while the runtime prepares the machine. It is a
fork, not a new interpreter: nothing of it stays once the machine runs, since
PID 1 ends by exec'ing ``pymachine-init`` (C, :mod:`machined.runtime.init`).

The intermediate (still the host's root, so it can read the host's Python
library and pymachine-init, even under a 0700 /root):

1. waits for :meth:`Intermediate.start`, opens pymachine-init, joins the
   runtime's mount namespace (where the runtime mounts the machine's overlay);
2. creates the user namespace first: the runtime writes its ID maps and gives
   the image and the binds their idmapped mounts through it, then mounts the
   overlay, while we wait for :meth:`Intermediate.go`;
3. creates the other namespaces (PID, UTS, IPC, net, cgroup), all owned
   by the user namespace, forks PID 1, reports its host PID, makes PID 1's
   mount namespace when PID 1 asks (below) and exits (PID 1 is re-parented to
   the runtime, a subreaper; the runtime sets up the network meanwhile).

PID 1 becomes root inside, opens the file systems of its namespaces (proc,
sysfs, cgroup2, devpts) and passes them to the runtime (SCM_RIGHTS), which
mounts the machine's file systems from its own mount namespace
(:func:`mounts.build_rootfs`). PID 1 waits for the runtime's message, then
asks the intermediate (which waited for that) for its mount namespace: the
intermediate, root of the user namespace and still in the runtime's mount
namespace, unshares a copy of it — one in which the kernel locks the
runtime's mounts — passes it to PID 1 and exits. PID 1 joins it and pivots
(:mod:`machined.runtime.container`), confines itself
(capabilities, no_new_privs, seccomp compiled by the runtime) so that every
payload inherits it, and execs pymachine-init with the payload, or the image's
init in boot mode. The report pipe is close-on-exec: the runtime reads EOF
once that exec succeeded, a byte if PID 1 failed before it.
"""

from __future__ import annotations

import _signal as signal
import _socket
import marshal
import os
import sys

# os and _signal only: linux and restrict (ctypes) load in the child, after the fork
from machined.runtime import init

FAILED = b"f"  # PID 1 could not set the container up (its reason is on stderr)


class Intermediate:
    """The runtime's handle on a started intermediate: its PID and pipe ends."""

    def __init__(
        self, pid: int, go_write: int, report_read: int, filesystems: _socket.socket
    ) -> None:
        self.pid = pid
        self.go_write = go_write
        self.report_read = report_read
        self._filesystems = filesystems  # PID 1 sends its file system contexts here
        self._started: bool | None = None  # its answer to start(), once read

    def start(self, *, userns: bool, boot: bool) -> None:
        """Let it join our mount namespace and, with USERNS, create the user
        namespace; BOOT: PID 1 execs the image's init, not pymachine-init."""
        os.write(self.go_write, f"{int(userns)} {int(boot)}\n".encode())

    def started(self) -> bool:
        """Wait until it did what :meth:`start` asked (False: it exited)."""
        if self._started is None:
            self._started = os.read(self.report_read, 1) == b"U"
        return self._started

    def go(self, flags: int) -> None:
        """Once :meth:`started`: let it create the other namespaces (FLAGS: clone
        flags besides user and PID) and fork PID 1."""
        os.write(self.go_write, f"{flags}\n".encode())

    def filesystems(self, *, keep_open: bool = False) -> list[int] | None:
        """PID 1's file system contexts (:func:`mounts.open_filesystems`), -1
        for each the kernel refused it; None if PID 1 failed first. The caller
        owns (and closes) them. KEEP_OPEN: :meth:`send_fds` follows."""
        try:
            return receive_fds(self._filesystems)
        finally:
            if not keep_open:
                self._filesystems.close()

    def send_fds(self, fds: list[int]) -> None:
        """FDS (closed here) to PID 1, which execs the init with them
        (the notify socket: runtime/notify.py), once it has the message."""
        try:
            send_fds(self._filesystems, fds)
        except OSError:
            pass  # PID 1 is gone: the report pipe says so
        finally:
            self._filesystems.close()


def spawn(*, foreground: bool) -> Intermediate:
    """Fork the intermediate; it waits for :meth:`Intermediate.go`.

    The runtime calls this first thing, before its own imports: the
    intermediate's imports then overlap with them."""
    go_read, go_write = os.pipe()  # close-on-exec, as every fd here
    report_read, report_write = os.pipe()
    ours, theirs = _socket.socketpair()  # for PID 1's file system contexts
    sys.stdout.flush()  # the child must not write our buffered output again
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.close(report_read)
        ours.close()
        _intermediate(go_read, report_write, theirs, foreground=foreground)
    os.close(go_read)
    os.close(report_write)
    theirs.close()
    return Intermediate(pid, go_write, report_read, ours)


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


def send_fds(sock: _socket.socket, fds: list[int]) -> None:
    """FDS over a unix socket (SCM_RIGHTS), then closed here; -1 entries say
    "none" (a mask byte each)."""
    present = [fd for fd in fds if fd >= 0]
    payload = b"".join(fd.to_bytes(4, sys.byteorder) for fd in present)
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)] if present else []
    sock.sendmsg([bytes(ord("1") if fd >= 0 else ord("0") for fd in fds)], ancillary)
    for fd in present:
        os.close(fd)


def receive_fds(sock: _socket.socket) -> list[int] | None:
    """What :func:`send_fds` sent (close-on-exec); None if the sender went away."""
    data, ancillary, _flags, _address = sock.recvmsg(
        16, _socket.CMSG_SPACE(4 * 16), _socket.MSG_CMSG_CLOEXEC
    )
    fds = []
    for level, kind, payload in ancillary:
        if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS):
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)]
    if not data or data.count(b"1") != len(fds):
        for fd in fds:
            os.close(fd)
        return None
    received = iter(fds)
    return [next(received) if flag == ord("1") else -1 for flag in data]


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


def _intermediate(
    go_read: int, report_write: int, filesystems: _socket.socket, *, foreground: bool
) -> None:
    """Namespaces and PID 1; then exit. Never returns into the runtime's code."""
    status = 1
    try:
        # Everything PID 1 needs, loaded (and the init opened) while the runtime
        # prepares, and before anything is root inside a user namespace: mapped
        # root may not read the host's Python library (e.g. under a 0700 /root).
        from machined.runtime import container, linux, restrict  # noqa: F401

        linux.prctl(linux.PR_SET_PDEATHSIG, 9)
        start = read_line(go_read).split()
        if not start:
            _exit(1)  # the runtime gave up before the container
        userns, boot = start[0] == b"1", start[1] == b"1"
        init_fd = None if boot else init.open_binary()
        # We may have been forked before the runtime made its mount namespace: join
        # it, so that the container's is a copy of it (the overlay mounted meanwhile).
        ns = os.open(f"/proc/{os.getppid()}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(ns, linux.CLONE_NEWNS)
        os.close(ns)
        if userns:
            linux.unshare(linux.CLONE_NEWUSER)
        os.write(report_write, b"U")  # one line at a time: go comes only after this
        go = read_line(go_read).split()  # the ID maps are written, the overlay mounted
        if not go:
            _exit(1)
        linux.unshare(int(go[0]) | linux.CLONE_NEWPID)
        mine, pid1_end = _socket.socketpair()  # PID 1 asks us for its mount namespace
        pid1 = os.fork()
        if pid1 == 0:
            mine.close()
            _pid1(
                init_fd,
                go_read,
                report_write,
                filesystems,
                pid1_end,
                userns=userns,
                foreground=foreground,
            )
        pid1_end.close()
        filesystems.close()
        os.write(report_write, f"P{pid1}\n".encode())  # the runtime sets up the network
        # PID 1 asks once the runtime has mounted the machine's file systems: a
        # copy of the runtime's mount namespace, made by us (root of the user
        # namespace), is owned by it, and in such a copy the kernel locks them.
        if mine.recv(1) == b"N":
            linux.unshare(linux.CLONE_NEWNS)
            send_fds(mine, [os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)])
        status = 0
    except BaseException as exc:  # report, never fall back into the caller's code
        print(
            f"pymachine-runtime: cannot create the container's namespaces: {exc}", file=sys.stderr
        )
    finally:
        _exit(status)


def _die_with_supervisor(go_read: int) -> None:
    """Foreground (``pymachine run``): the runtime stays our parent; if it is
    SIGKILLed, we go too, so no container runs on headless in the scope."""
    from machined.runtime import linux

    # Kept across the exec of the init (the kernel clears it only for an exec
    # that changes credentials: set-user-ID or file capabilities; checked).
    linux.prctl(linux.PR_SET_PDEATHSIG, 9)
    os.set_blocking(go_read, False)
    try:
        gone = os.read(go_read, 1) == b""  # EOF: every writer (the runtime) exited
    except BlockingIOError:
        gone = False
    if gone:
        raise RuntimeError("the runtime is gone")


def _host_parent() -> int:
    """Our parent's PID as the host sees it: getppid() is 0 for PID 1 of a PID
    namespace, but the host's /proc (still mounted here, before the pivot)
    shows the real one."""
    with open("/proc/self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _wait_until_reparented(intermediate: _socket.socket, parent: int) -> None:
    """Foreground: PID 1 arms ``PR_SET_PDEATHSIG`` for the runtime
    (:func:`_die_with_supervisor`), and the kernel ties it to whoever is our
    parent then. The intermediate is our parent until it exits right after it
    sent our mount namespace; armed before that, its ordinary exit SIGKILLs
    the container (seen under load: ``run`` exiting 137 with no output). So
    wait for its end (EOF on its socket), then for the kernel to have moved
    us to the runtime (a subreaper)."""
    intermediate.recv(1)
    while _host_parent() == parent:
        os.sched_yield()


def _pid1(
    init_fd: int | None,
    go_read: int,
    report_write: int,
    filesystems: _socket.socket,
    intermediate: _socket.socket,
    *,
    userns: bool,
    foreground: bool,
) -> None:
    from machined.runtime import container, restrict  # loaded by the intermediate already

    try:
        if userns:
            _become_root()
        send_fds(filesystems, container.open_filesystems())  # the runtime mounts them
        message = receive(go_read)  # sent once the network is set up and the root mounted
        if message is None:
            raise RuntimeError("the runtime is gone")
        notify_fds = receive_fds(filesystems) if message.get("notify") else None
        filesystems.close()
        if message.get("notify") and notify_fds is None:
            raise RuntimeError("the runtime is gone")
        parent = _host_parent() if foreground else 0  # the intermediate, seen from the host
        intermediate.send(b"N")
        namespace = receive_fds(intermediate)
        if not namespace:
            raise RuntimeError("the intermediate is gone")
        if foreground:
            _wait_until_reparented(intermediate, parent)
        intermediate.close()
        program = container.set_up(message, namespace[0])
        if foreground:
            _die_with_supervisor(go_read)
        restrict.apply(**message["restrictions"])
        if program["path"] is not None:  # boot mode: the image's own init
            os.execve(program["path"], program["argv"], program["environment"])
        argv = program["argv"]
        if not foreground:  # the payload starts once the runtime has registered and handed over
            os.set_inheritable(go_read, True)
            argv[1:1] = ["--handover-fd", str(go_read)]
        if notify_fds:  # the init relays the payload's READY=1 (runtime/notify.py)
            argv[1:1] = init.notify_arguments(notify_fds) + message["init_arguments"]
        # Signals that come before the init waits for them stay pending, not lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, init.WATCHED)
        os.execve(init_fd, argv, program["environment"])
    except BaseException as exc:  # PID 1 reports and exits, whatever it was
        print(f"pymachine-init: {exc}", file=sys.stderr)
        try:  # noqa: SIM105 — contextlib would be imported before the fork
            os.write(report_write, FAILED)
        except OSError:
            pass
    finally:
        _exit(1)
