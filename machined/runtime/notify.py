"""sd_notify(3) in ten lines: a datagram to $NOTIFY_SOCKET.

Hand-written so the runtime needs no D-Bus/pystemd import to tell systemd it
is READY (pystemd.daemon would do the same in C, for 30 ms of imports).
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
