"""An asynchronous Python API for pymachined (``org.pymachine.machine1``).

For programs (Cockpit-style services, Ansible modules, scripts) that run
machines as root or as a polkit-authorized user, over dbus-next and asyncio;
errors are pymachine's own exceptions (``NotFound``, ``Conflict``,
``AccessDenied`` …, each with its ``exit_code``)::

    import asyncio
    from machined.client import Client

    async def main() -> None:
        async with await Client.connect() as pm:
            for machine in await pm.list_machines():
                print(machine["Name"], machine["State"])
            await pm.start("web")
            status = await pm.exec("web", ["hostname"])   # our stdio, its exit status
            print((await pm.status("web"))["Leader"], status)
            await pm.stop("web")

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
from collections.abc import Callable, Sequence
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from machined import daemon
from machined.daemon.bus import to_bus
from machined.errors import PymachineError

__all__ = ["Client"]


def _plain(value: Any) -> Any:
    """dbus-next's Variants unwrapped, recursively."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Client:
    """One connection to the system bus, talking to pymachined."""

    def __init__(self, bus: MessageBus, *, interactive: bool = False) -> None:
        self.bus = bus
        self.interactive = interactive  # let polkit ask the user (an agent must run)

    @classmethod
    async def connect(cls, *, interactive: bool = False) -> Client:
        bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        return cls(bus, interactive=interactive)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        unix_fds: Sequence[int] = (),
        path: str = daemon.MANAGER_PATH,
        interface: str = daemon.MANAGER_INTERFACE,
    ) -> list[Any]:
        """A method of pymachined: its reply's body, or the error as pymachine's."""
        from dbus_next.constants import MessageFlag

        reply = await self.bus.call(
            Message(
                destination=daemon.BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                unix_fds=list(unix_fds),
                flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
                if self.interactive
                else MessageFlag.NONE,
            )
        )
        if reply.message_type == MessageType.ERROR:
            raise daemon.error_from(reply.error_name, reply.body[0] if reply.body else "")
        return reply.body

    # --- machines ------------------------------------------------------------
    async def list_machines(self) -> list[dict[str, Any]]:
        """Every machine's properties (org.pymachine.machine1.Machine)."""
        (rows,) = await self.call("ListMachines")
        return [_plain(props) for _name, _path, props in rows]

    async def status(self, name: str) -> dict[str, Any]:
        (props,) = await self.call("GetMachineStatus", "s", [name])
        return _plain(props)

    async def create(self, name: str, definition: str) -> str:
        """Create NAME from DEFINITION, the text of a ``.machine`` file
        (:func:`machined.definition.to_text` writes one); its object path."""
        (path,) = await self.call("CreateMachine", "ss", [name, definition])
        return path

    async def _batch(self, member: str, names: Sequence[str], *extra: Any, sig: str = "") -> None:
        (pairs,) = await self.call(member, "as" + sig, [list(names), *extra])
        errors = [daemon.error_from(e, m) for e, m in pairs if e]
        if errors:
            raise errors[0] if len(errors) == 1 else PymachineError("; ".join(map(str, errors)))

    async def start(self, *names: str) -> None:
        await self._batch("StartMachines", names)

    async def stop(self, *names: str) -> None:
        await self._batch("StopMachines", names)

    async def restart(self, *names: str) -> None:
        await self._batch("RestartMachines", names)

    async def kill(self, *names: str, signal: int = signals.SIGTERM) -> None:
        await self._batch("KillMachines", names, int(signal), sig="i")

    async def remove(self, *names: str) -> None:
        await self._batch("RemoveMachines", names)

    async def exec(
        self,
        name: str,
        command: Sequence[str],
        *,
        environment: dict[str, str] | None = None,
        user: str = "",
        working_directory: str = "",
        stdin: int = 0,
        stdout: int = 1,
        stderr: int = 2,
        pty: bool = False,
    ) -> int:
        """Run COMMAND in machine NAME with these descriptors as its stdio (only
        stdio crosses into a machine); its exit status once it ends."""
        reader, writer = os.pipe()
        signal_reader, signal_writer = os.pipe()
        try:
            await self.call(
                "ExecMachine",
                "sasasssbhhhhh",
                [
                    name,
                    list(command),
                    [f"{k}={v}" for k, v in (environment or {}).items()],
                    user,
                    working_directory,
                    pty,
                    0,
                    1,
                    2,
                    3,
                    4,
                ],
                unix_fds=[stdin, stdout, stderr, writer, signal_reader],
            )
        except BaseException:
            os.close(reader)
            os.close(signal_writer)
            raise
        finally:
            os.close(writer)
            os.close(signal_reader)
        try:
            text = await asyncio.get_running_loop().run_in_executor(None, _read_all, reader)
        finally:
            os.close(reader)
            os.close(signal_writer)  # EOF: the helper hangs the command up, if it still runs
        if not text.strip().isdigit():
            raise PymachineError(f"lost the command in machine '{name}' (no exit status)")
        return int(text)

    async def gc(self) -> list[str]:
        (lines,) = await self.call("GarbageCollect")
        return lines

    # --- images --------------------------------------------------------------
    async def list_images(self) -> list[dict[str, Any]]:
        (rows,) = await self.call("ListImages")
        return [
            {"name": n, "size": size, "created": created, "used_by": used}
            for n, size, created, used in rows
        ]

    async def remove_image(self, name: str) -> None:
        await self.call("RemoveImage", "s", [name])

    # --- signals ---------------------------------------------------------------
    async def watch(self, callback: Callable[[str, str, str], None]) -> None:
        """CALLBACK(event, name, path) for MachineNew and MachineRemoved."""
        await self._add_match()

        def handler(msg: Message) -> None:
            if (
                msg.message_type == MessageType.SIGNAL
                and msg.interface == daemon.MANAGER_INTERFACE
                and msg.member in ("MachineNew", "MachineRemoved")
            ):
                callback(msg.member, *msg.body)

        self.bus.add_message_handler(handler)

    async def _add_match(self) -> None:
        rule = f"type='signal',interface='{daemon.MANAGER_INTERFACE}'"
        reply = await self.bus.call(to_bus("AddMatch", "s", [rule]))
        if reply.message_type == MessageType.ERROR:
            raise PymachineError(f"cannot watch pymachined: {reply.error_name}")


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
