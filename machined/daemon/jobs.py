"""Long image work as Job objects, as systemd-importd's transfers.

A job is pymachine's own verb (``bootstrap``, ``import-tar``) run by the
daemon as a process of its own, as root and in-process (no daemon in the
loop: ``PYMACHINE_NO_DAEMON``): the builders are atomic (a hidden staging
directory renamed at the end), so a cancelled or killed job leaves nothing.
Its progress lines become the job's ``Status``/``Progress`` properties with
PropertiesChanged; its end is the Manager's ``JobRemoved`` signal.

No ``from __future__ import annotations``: dbus-next reads the signatures.
"""

import asyncio
import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from machined import daemon, machines
from machined.daemon.bus import api
from machined.paths import Paths

JOB_INTERFACE = "org.pymachine.machine1.Job"
JOB_PATH_PREFIX = daemon.MANAGER_PATH + "/job/"
_ids = itertools.count(1)
_FRACTION = re.compile(r"\((\d+)/(\d+)\)|\b(\d+)/(\d+)\b")

BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split(':'); "
    "from machined.cli import main; sys.exit(main(sys.argv[1:]))"
)


def verb_command(argv: list[str]) -> list[str]:
    """``pymachine ARGV`` as the daemon's child: its interpreter, ``-I -S``."""
    path = machines.runtime_command("-")[5]
    return [sys.executable, "-I", "-S", "-c", BOOTSTRAP, path, *argv]


class Job(ServiceInterface):
    """``org.pymachine.machine1.Job`` at ``/org/pymachine/machine1/job/ID``."""

    def __init__(
        self,
        kind: str,
        image: str,
        on_end: Callable[["Job", int, str], None],
        authorize: Callable[..., Awaitable[None]],
    ) -> None:
        super().__init__(JOB_INTERFACE)
        self._authorize = authorize
        self.id = next(_ids)
        self.path = f"{JOB_PATH_PREFIX}{self.id}"
        self.kind = kind
        self.image = image
        self.status = "starting"
        self.progress = -1.0
        self.started = int(time.time() * 1_000_000)
        self._on_end = on_end
        self._process: asyncio.subprocess.Process | None = None

    async def run(self, argv: list[str], paths: Paths, stdin: int | None = None) -> None:
        env = {**machines.runtime_environment(paths), "PYMACHINE_NO_DAEMON": "1"}
        env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        self._process = await asyncio.create_subprocess_exec(
            *verb_command(argv),
            stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        last_error = ""
        async for raw in self._process.stderr:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            if line.startswith("pymachine: "):
                last_error = line.removeprefix("pymachine: ")
            self._update(line)
        code = await self._process.wait()
        if code < 0:
            code, last_error = 1, last_error or f"cancelled (signal {-code})"
        self._on_end(self, code, last_error if code else "")

    def _update(self, line: str) -> None:
        self.status = line
        changed: dict[str, Any] = {"Status": line}
        match = _FRACTION.search(line)
        if match:
            done, total = (
                int(g) for g in (match.group(1, 2) if match.group(1) else match.group(3, 4))
            )
            if total:
                self.progress = min(done / total, 1.0)
                changed["Progress"] = self.progress
        self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "u":
        return self.id

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":
        return self.kind

    @dbus_property(access=PropertyAccess.READ)
    def Image(self) -> "s":
        return self.image

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        return self.status

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        """0…1 when the work says how far it is (N/M), else -1."""
        return self.progress

    @dbus_property(access=PropertyAccess.READ)
    def Started(self) -> "t":
        return self.started

    @method()
    @api
    async def Cancel(self) -> None:
        """SIGINT to the work (a KeyboardInterrupt: the builders remove their
        staging directory on the way out, as after a Ctrl-C)."""
        await self._authorize(
            daemon.ACTION_MANAGE_IMAGES, f"cancel job {self.id}", image=self.image
        )
        if self._process is not None and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGINT)
