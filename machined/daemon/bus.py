"""dbus-next, as pymachined uses it: the calling message reachable from a
method (polkit needs its sender), and pymachine's errors as D-Bus errors.

No ``from __future__ import annotations`` (dbus-next reads annotations).
"""

import contextvars
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_next import DBusError, Message
from dbus_next.aio import MessageBus

from machined import daemon
from machined.errors import PymachineError

#: The method call being handled (its sender and flags, for polkit): set by
#: :class:`Bus` around each handler; the handler's task inherits it.
CURRENT_MESSAGE: contextvars.ContextVar[Message] = contextvars.ContextVar("message")


class _RetryingSocket:
    """The bus socket as dbus-next's writer sees it, EAGAIN made a short write.

    dbus-next 0.2's writer ends the connection when ``send`` raises
    ``BlockingIOError`` (altdesktop/python-dbus-next#153, open): many signals
    at once (100 machines stopping: a PropertiesChanged each) fill the
    socket's buffer and the daemon died. A short write of 0 bytes makes the
    writer wait for the socket to be writable and send the rest, as it does
    for any short write. A message with descriptors (``sendmsg``) waits here
    instead: the writer forgets the descriptors after its first ``sendmsg``.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any) -> int:
        import select

        while True:
            try:
                return self._sock.sendmsg(buffers, ancdata)
            except BlockingIOError:
                select.select([], [self._sock], [])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Bus(MessageBus):
    """dbus-next's bus, with each method call's message reachable from the
    handler (:data:`CURRENT_MESSAGE`). dbus-next 0.2 hands a ``@method`` only
    its arguments, and polkit needs the caller's bus name. Its writer survives
    a full socket buffer (:class:`_RetryingSocket`)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._writer.sock = _RetryingSocket(self._writer.sock)

    def _make_method_handler(self, interface, method):  # noqa: ANN001 (dbus-next's hook)
        inner = super()._make_method_handler(interface, method)

        def handler(msg: Message, send_reply: Any) -> None:
            token = CURRENT_MESSAGE.set(msg)
            try:
                inner(msg, send_reply)  # creates the handler's task: it copies the context
            finally:
                CURRENT_MESSAGE.reset(token)

        return handler


def api(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A method's pymachine errors as D-Bus errors of their exit code's name
    (:data:`machined.daemon.ERROR_NAMES`), with the CLI's message."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except PymachineError as exc:
            raise DBusError(daemon.error_name(exc), str(exc)) from None

    return wrapper


def to_bus(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    """A call of the bus itself (``org.freedesktop.DBus``: AddMatch,
    GetConnectionUnixUser …)."""
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=body or [],
    )
