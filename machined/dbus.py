"""A small synchronous D-Bus client over pystemd's sd-bus binding.

pystemd's high-level objects introspect every object (an extra round trip and
lxml parsing); on the hot paths we call methods directly with explicit
signatures instead. This is the only module that touches pystemd's wire API.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence

from machined.errors import PymachineError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (the runtime has no site)
if TYPE_CHECKING:  # not at run time: stop has no properties to send (dataclasses)
    from typing import Any

    from machined.properties import Property


def _pystemd_package_without_init() -> None:
    """Make ``pystemd`` importable as a package without running its
    ``__init__``, which imports ``pystemd.base`` and through it lxml (~25 ms and
    ~3 MB in every CLI call and clean-up) for the introspecting objects we do
    not use. Submodules (dbuslib, dbusexc, even systemd1) still import."""
    if "pystemd" in sys.modules:
        return
    import importlib.util

    spec = importlib.util.find_spec("pystemd")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["pystemd"] = importlib.util.module_from_spec(spec)


def _x2char_star(value: Any, convert_all: bool = False) -> Any:
    """``pystemd.utils.x2char_star`` for the bytes and str we pass; anything
    else goes to the real one (imported then)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    from pystemd.utils import x2char_star

    return x2char_star(value, convert_all)


def _pformat(obj: Any, *args: Any, **kw: Any) -> str:
    import pprint

    return pprint.pformat(obj, *args, **kw)


def _import_dbuslib() -> Any:
    """``pystemd.dbuslib`` without the two modules it imports for one helper
    each: ``pystemd.utils`` (x2char_star; it imports uuid and platform) and
    ``pprint`` (pformat, for an error message; in 3.11 it imports dataclasses
    and inspect): ~6 ms of every CLI call, ``stop`` needing nothing else of
    them. Light stand-ins are in ``sys.modules`` only while dbuslib imports;
    a later ``import pprint`` or ``pystemd.utils`` gets the real module."""
    standins = {}
    for name, attribute, function in (
        ("pystemd.utils", "x2char_star", _x2char_star),
        ("pprint", "pformat", _pformat),
    ):
        if name not in sys.modules:
            module = types.ModuleType(name)
            setattr(module, attribute, function)
            standins[name] = sys.modules[name] = module
    try:
        import pystemd.dbuslib
    finally:
        for name, module in standins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return pystemd.dbuslib


_pystemd_package_without_init()

from pystemd.dbusexc import DBusBaseError  # noqa: E402

_dbuslib = _import_dbuslib()
DBus, apply_signature = _dbuslib.DBus, _dbuslib.apply_signature


class BusError(PymachineError):
    """A D-Bus call failed; ``name`` is the D-Bus error name when known."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


def encode_properties(properties: Sequence[Property]) -> list[tuple[int, Any]]:
    """Encode ``a(sv)`` for pystemd (the shape StartTransientUnit wants)."""
    args: list[tuple[int, Any]] = [(ord("a"), b"(sv)")]
    for prop in properties:
        signature = prop.signature.encode()
        args += [(ord("r"), b"sv"), (ord("s"), prop.name.encode()), (ord("v"), signature)]
        args += apply_signature(signature, [prop.value])
        args += [(-1, None), (-1, None)]
    args.append((-1, None))
    return args


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        return {_decode(k): _decode(v) for k, v in value.items()}
    return value


class Bus:
    """One connection to the system bus."""

    def __init__(self, *, interactive: bool | None = None) -> None:
        # interactive: let polkit ask the user for a password (an agent must run)
        self._bus = DBus(interactive=interactive)
        self._callback_errors: list[Exception] = []
        self._handlers: list[_SignalHandler] = []
        try:
            self._bus.open()
        except DBusBaseError as exc:
            raise BusError(
                f"cannot connect to the system bus: {exc} (is systemd running?)"
            ) from None

    def close(self) -> None:
        self._bus.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        destination: str,
        path: str,
        interface: str,
        method: str,
        signature: str = "",
        args: Sequence[Any] = (),
        *,
        raw_args: list[tuple[int, Any]] | None = None,
    ) -> Any:
        encoded = (
            apply_signature(signature.encode(), [_encode(a) for a in args]) if signature else []
        )
        if raw_args:
            encoded += raw_args
        try:
            reply = self._bus.call_method(
                destination.encode(), path.encode(), interface.encode(), method.encode(), encoded
            )
        except DBusBaseError as exc:
            raise BusError(_message(exc), _error_name(exc)) from None
        return _decode(reply.body)

    def get_all(self, destination: str, path: str, interface: str) -> dict[str, Any]:
        body = self.call(
            destination, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface]
        )
        return body if isinstance(body, dict) else dict(body)

    def get(self, destination: str, path: str, interface: str, name: str) -> Any:
        return self.call(
            destination, path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name]
        )

    def match_signal(
        self,
        sender: str,
        path: str | None,
        interface: str,
        member: str,
        callback: Callable[[Any], None],
    ) -> None:
        handler = _SignalHandler(callback, self._callback_errors)
        self._handlers.append(handler)  # pystemd keeps only a borrowed pointer to it
        self._bus.match_signal(
            sender.encode(),
            path.encode() if path else None,
            interface.encode(),
            member.encode(),
            handler,
        )

    #: sd_bus_process() dispatches one message a call, and may keep more it has
    #: read; a wake-up dispatches up to this many before waiting again.
    DISPATCH_BATCH = 32
    #: The longest wait on the socket alone (what sd-bus buffered beyond a batch
    #: is dispatched at the latest this late).
    POLL_SECONDS = 0.25

    def process_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Dispatch incoming messages until ``done()`` or ``timeout`` seconds pass.

        Waits in ``select`` on the bus's socket, not in ``sd_bus_wait``: pystemd
        holds the GIL through its C calls, so a wait there (a stop job can take
        StopTimeoutSec=) froze every other thread of the process: pymachined's
        event loop, and with it every other client (a ``list`` during a 20 s
        stop took 5-7 s)."""
        import select
        import time

        deadline = time.monotonic() + timeout
        fd = self._bus.get_fd()
        while True:
            for _ in range(self.DISPATCH_BATCH):
                self._bus.process()
                if self._callback_errors:
                    raise self._callback_errors.pop(0)
                if done():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([fd], [], [], min(remaining, self.POLL_SECONDS))


class _SignalHandler:
    """A callable object for pystemd's match_signal (it sets attributes on it).

    An exception escaping into sd-bus's callback would surface later as a
    SystemError from process(); keep it and re-raise it from process_until.
    """

    def __init__(self, callback: Callable[[Any], None], errors: list[Exception]) -> None:
        self.callback = callback
        self.errors = errors

    def __call__(self, msg: Any, error: Any = None, userdata: Any = None) -> None:
        try:
            msg.process_reply(False)
            self.callback(_decode(msg.body))
        except Exception as exc:
            self.errors.append(exc)


def _encode(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_encode(v) for v in value)
    return value


def _message(exc: DBusBaseError) -> str:
    message = getattr(exc, "err_message", "") or str(exc)
    return message.decode(errors="replace") if isinstance(message, bytes) else message


def _error_name(exc: DBusBaseError) -> str:
    name = getattr(exc, "err_name", "")
    if name:
        return name if isinstance(name, str) else name.decode()
    # pystemd's generated subclasses drop err_name; the class name keeps it.
    return type(exc).__name__
