"""``lo`` up inside a ``Mode=none`` machine's network namespace with one ioctl.

The runtime's own: nothing of the host changes, so pymachined is not asked
(:mod:`machined.network` is the host's side), and a start pays neither
netlink nor pyroute2's import (~130 ms) for one interface flag.
"""

from __future__ import annotations

import _socket
import _thread
import fcntl
import os
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000


def _socket_in(pid: int) -> _socket.socket:
    """A datagram socket in the network namespace of PID: a short-lived thread
    joins the namespace and makes it (the socket keeps the namespace it was
    made in; this thread's namespaces stay as they are). ``_socket`` and
    ``_thread`` rather than ``socket`` and ``threading``: ~2 ms less of imports
    on the runtime's start path, for one socket and one thread."""
    from machined.runtime import linux

    result: dict[str, object] = {}
    done = _thread.allocate_lock()
    done.acquire()

    def enter() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            result["sock"] = _socket.socket(
                _socket.AF_INET, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC
            )
        except OSError as exc:
            result["error"] = exc
        finally:
            done.release()

    _thread.start_new_thread(enter, ())
    done.acquire()
    if "sock" not in result:
        raise OSError(f"cannot enter the network namespace of PID {pid}: {result.get('error')}")
    return result["sock"]  # type: ignore[return-value]


def loopback_up(netns_pid: int) -> None:
    sock = _socket_in(netns_pid)
    try:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    finally:
        sock.close()
