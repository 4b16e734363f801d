"""Readiness (``Notify=yes``): the payload's ``NOTIFY_SOCKET`` and what makes
``start`` wait for its ``READY=1``.

The unit stays ``Type=forking`` with ``PIDFile=`` (systemd must adopt PID 1 as
its own child: supervisor.py ``_hand_over``), and the payload starts only once
the runtime has exited, so neither the runtime nor ``Type=notify`` can wait
for the payload. Instead:

* the runtime binds a datagram socket, ``RUN/notify/socket`` (the directory
  0700 root: no host user reaches it), bind-mounted into the machine at
  ``/run/host/notify`` (where systemd-nspawn puts its own) and named by the
  payload's ``NOTIFY_SOCKET``; a FIFO ``RUN/notify/ready``; and a socket
  connected to systemd's notify socket (the unit has ``NotifyAccess=main``);
* ``pymachine-init`` (PID 1, the unit's main process once adopted) gets the
  three (SCM_RIGHTS through PID 1's set-up), relays ``READY=1``, ``STATUS=``
  and ``WATCHDOG=1`` to systemd and writes one byte to the FIFO at the first
  ``READY=1``;
* the unit's ``ExecStartPost=`` (:func:`wait_ready`) waits for that byte, or
  for PID 1's end: the start job — ``pymachine start``, ``systemctl start``,
  a dependent unit's ``After=`` — completes only then, and
  ``TimeoutStartSec=`` bounds it.

``os`` and ``_socket`` only: :func:`wait_ready` runs on every start of such a
machine, and the runtime imports this before the container is up.
"""

from __future__ import annotations

import _socket
import contextlib
import os
import select
import sys

INSIDE = "/run/host/notify"  # the payload's NOTIFY_SOCKET
DIRECTORY = "notify"
SOCKET = "socket"
FIFO = "ready"
HEALTH = "health"  # the init's health-check record (pymachine-init.c), in RUN


class Channel:
    """What the runtime made for one start: the three descriptors PID 1 takes
    (the socket, the FIFO, the forward socket or -1) and the socket's host path."""

    def __init__(self, fds: list[int], socket_path: str, watchdog: float | None = None) -> None:
        self.fds = fds
        self.socket_path = socket_path
        # the payload's: where to report, and (WatchdogSec=) how often, as
        # sd_watchdog_enabled(3) reads it (no WATCHDOG_PID: the payload is not
        # the unit's main process, the init relays for it)
        self.environment = {"NOTIFY_SOCKET": INSIDE}
        if watchdog is not None:
            self.environment["WATCHDOG_USEC"] = str(round(watchdog * 1_000_000))

    def bind(self) -> dict:
        """The socket's bind mount into the machine (a ``mounts.Bind``'s fields)."""
        return {"source": self.socket_path, "target": INSIDE, "read_only": False}


def prepare(runtime_dir: str, *, health: bool = False, watchdog: float | None = None) -> Channel:
    """Make the socket and the FIFO under RUNTIME_DIR (a leftover of an
    earlier start is replaced) and connect to systemd's notify socket; with
    HEALTH, the file the init records its health checks in (status reads it);
    WATCHDOG: the unit's WatchdogSec=, told to the payload."""
    directory = os.path.join(runtime_dir, DIRECTORY)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # the FIFO and the socket are reached through it only
    socket_path = os.path.join(directory, SOCKET)
    fifo_path = os.path.join(directory, FIFO)
    for path in (socket_path, fifo_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    sock.bind(socket_path)
    # Any user inside may report (as under systemd-nspawn); the 0700 directory
    # keeps host users out, the bind mount is the only way in.
    os.chmod(socket_path, 0o666)
    os.mkfifo(fifo_path, 0o600)
    # O_RDWR: the init holds both ends, so its write never blocks or fails and
    # the byte waits in the pipe until wait_ready opens it.
    fifo = os.open(fifo_path, os.O_RDWR | os.O_CLOEXEC)
    health_fd = -1
    if health:
        health_fd = os.open(
            os.path.join(runtime_dir, HEALTH),
            os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    return Channel([sock.detach(), fifo, _forward_socket(), health_fd], socket_path, watchdog)


def _forward_socket() -> int:
    """A datagram socket connected to systemd's ``$NOTIFY_SOCKET``, or -1 (a
    foreground run, or NotifyAccess= unset)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return -1
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect("\0" + address[1:] if address[0] == "@" else address)
    except OSError:
        sock.close()
        return -1
    return sock.detach()


def relay_boot(fds: list[int], leader: int) -> None:
    """Boot mode (as systemd-nspawn --notify-ready): the image's systemd is PID
    1, so no pymachine-init relays its READY=1. A forked child of the runtime
    holds the socket instead and outlives it: at READY=1 it writes the FIFO's
    byte, waits until ``--wait-ready`` has read it (a pipe keeps no byte once
    no one holds it) and exits; it also exits when PID 1 does."""
    if os.fork():
        return
    status = 0
    try:
        _relay_until_ready(fds[0], fds[1], os.pidfd_open(leader))
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _relay_until_ready(sock_fd: int, fifo: int, pidfd: int) -> None:
    import fcntl
    import termios

    sock = _socket.socket(fileno=sock_fd)
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if pidfd in events:
            return
        if b"READY=1" in sock.recv(4096).split(b"\n"):
            break
    os.write(fifo, b"R")
    pending = bytearray(4)
    while True:  # until --wait-ready took it, or the machine is gone
        fcntl.ioctl(fifo, termios.FIONREAD, pending)
        if not int.from_bytes(pending, "little") or select.select([pidfd], [], [], 0.05)[0]:
            return


def read_health(runtime_dir: str) -> dict[str, str] | None:
    """The init's last health-check record: status (starting, healthy,
    unhealthy), failing streak, last output; None without one."""
    try:
        with open(os.path.join(runtime_dir, HEALTH), "rb") as handle:
            data = handle.read(4096)
    except OSError:
        return None
    head, _, output = data.partition(b"\n")
    status, _, streak = head.decode("ascii", "replace").partition(" ")
    if not status:
        return None
    return {
        "status": status,
        "failing_streak": streak,
        "last_output": output.decode("utf-8", "replace").strip(),
    }


def wait_ready(name: str, runtime_dir: str, pid_file: str) -> int:
    """``ExecStartPost=``: 0 once the machine's init saw ``READY=1``, 1 if
    PID 1 exited first (the start fails, the unit stops)."""
    main_pid = os.environ.get("MAINPID") or _read_pid(pid_file)
    try:
        pidfd = os.pidfd_open(int(main_pid))
    except (TypeError, ValueError, OSError):
        print(f"pymachine: machine {name} is not running", file=sys.stderr)
        return 1
    fifo = os.open(
        os.path.join(runtime_dir, DIRECTORY, FIFO), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    )
    poller = select.poll()
    poller.register(fifo, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == fifo:
                try:
                    if os.read(fifo, 1):
                        return 0
                except BlockingIOError:
                    continue
            print(f"pymachine: machine {name} exited before it was ready", file=sys.stderr)
            return 1


def _read_pid(pid_file: str) -> str | None:
    try:
        with open(pid_file) as handle:
            return handle.read().strip()
    except OSError:
        return None
