"""One call run in a thread of its own while the runtime goes on.

The runtime starts a machine on the clock, and some of its steps wait on
someone else (the kernel's cgroup lock, pymachined's answer) while the next
steps need nothing of theirs: :class:`InThread` runs such a call beside them
and :meth:`InThread.result` waits for it where its result is needed. A bare
``_thread`` and a lock: ``threading`` costs the runtime ~2 ms of imports for
one thread.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class InThread:
    """FN(*ARGS) started in a thread; :meth:`result` returns or raises what it did."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None
        _thread.start_new_thread(self._run, (fn, args))

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # raised in the waiting thread by result()
            self._error = exc
        finally:
            self._done.release()

    def result(self) -> Any:
        """FN's return value, once it has returned (its exception, if it raised)."""
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        return self._value
