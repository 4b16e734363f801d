"""Progress for bootstrap and import: a live status line on a terminal, plain lines otherwise.

On a terminal one line is redrawn in place (phase, items done/total, bytes,
elapsed seconds) and the tools' chatter is condensed into it; when stderr is a
pipe or a file (CI logs, ``2>log``) every event becomes one ordinary line and
nothing is redrawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from machined.cli.output import human_bytes

REDRAW_INTERVAL = 0.1


class Progress:
    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, quiet: bool = False
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        if os.environ.get("TERM") == "dumb":
            self.tty = False
        self.quiet = quiet
        self.phase = ""
        self.done = 0
        self.total: int | None = None
        self.bytes = 0
        self.detail = ""
        self.started = time.monotonic()
        self._phase_started = self.started
        self._last_draw = 0.0
        self._status_shown = False
        self._lock = threading.RLock()  # backends may report from a watcher thread

    # --- events --------------------------------------------------------------
    def step(self, phase: str, total: int | None = None) -> None:
        """Start a new phase (e.g. "downloading", "applying layer 2/3")."""
        self._finish_phase()
        self.phase = phase
        self.total = total
        self.done = 0
        self.bytes = 0
        self.detail = ""
        self._phase_started = time.monotonic()
        if self.tty:
            self._draw(force=True)
        else:
            self._print(f"{phase}…" if total is None else f"{phase} ({total})…")

    def advance(self, items: int = 1, nbytes: int = 0, detail: str = "") -> None:
        self.done += items
        self.bytes += nbytes
        if detail:
            self.detail = detail
        if self.tty:
            self._draw()

    def add_bytes(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.tty:
            self._draw()

    def set_bytes(self, nbytes: int) -> None:
        self.bytes = nbytes
        if self.tty:
            self._draw()

    def line(self, text: str) -> None:
        """A line of a tool's output: shown as the status detail, or printed as is."""
        text = text.strip()
        if not text:
            return
        if self.tty:
            self.detail = text
            self._draw()
        else:
            self._print(f"  {text}")

    def message(self, text: str) -> None:
        """A line that stays, on a terminal too."""
        if self.tty and self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False
        self._print(text)
        if self.tty:
            self._draw(force=True)

    def finish(self, summary: str | None = None) -> None:
        self._finish_phase()
        if summary:
            self._print(summary)
        self.phase = ""

    # --- drawing ---------------------------------------------------------------
    def status_text(self) -> str:
        parts = [self.phase or "working"]
        if self.total is not None:
            parts.append(f"{self.done}/{self.total}")
        elif self.done:
            parts.append(str(self.done))
        if self.bytes:
            parts.append(human_bytes(self.bytes))
        parts.append(f"{time.monotonic() - self.started:.1f}s")
        text = "  ".join(parts)
        if self.detail:
            text += f"  {self.detail}"
        return text

    def _draw(self, force: bool = False) -> None:
        if self.quiet:
            return
        with self._lock:
            self._draw_locked(force)

    def _draw_locked(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 80
        width = width or 80  # a pty without a size says 0
        text = self.status_text()[: max(width - 1, 10)]
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()
        self._status_shown = True

    def _finish_phase(self) -> None:
        if not self.phase:
            return
        elapsed = time.monotonic() - self._phase_started
        counts = ""
        if self.done:
            counts = f" {self.done}" + (f"/{self.total}" if self.total is not None else "")
        if self.bytes:
            counts += f" {human_bytes(self.bytes)}"
        if self.tty and self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False
        self._print(f"{self.phase}:{counts} done in {elapsed:.1f}s")

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
