"""Authorization of callers by polkit, as systemd-machined does it.

Root is always allowed (machined's ``bus_verify_polkit_async`` does the same
for privileged callers); anyone else is asked about with ``CheckAuthorization``
for their bus name, so polkit sees the caller's process, session and groups,
and rules may look at ``action.lookup("machine")``.
"""

from __future__ import annotations

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from machined.daemon.bus import to_bus
from machined.errors import AccessDenied

POLKIT = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 1  # CheckAuthorizationFlags


async def caller_uid(bus: MessageBus, sender: str) -> int:
    reply = await bus.call(to_bus("GetConnectionUnixUser", "s", [sender]))
    if reply.message_type == MessageType.ERROR:
        raise AccessDenied(f"cannot identify the caller {sender}: {reply.body}")
    return int(reply.body[0])


async def check(
    bus: MessageBus,
    sender: str,
    action: str,
    details: dict[str, str],
    *,
    interactive: bool,
    what: str,
) -> None:
    """Return if SENDER may do ACTION, else raise :class:`AccessDenied` naming
    WHAT was refused ("start machine 'web'")."""
    if await caller_uid(bus, sender) == 0:
        return
    reply = await bus.call(
        Message(
            destination=POLKIT,
            path=AUTHORITY_PATH,
            interface=AUTHORITY_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                action,
                details,
                ALLOW_USER_INTERACTION if interactive else 0,
                "",
            ],
        )
    )
    if reply.message_type == MessageType.ERROR:
        raise AccessDenied(f"access denied: cannot {what}: polkit: {reply.error_name}")
    authorized, challenge, _details = reply.body[0]
    if authorized:
        return
    hint = " (interactive authentication required)" if challenge else ""
    raise AccessDenied(f"access denied: not allowed to {what} ({action}){hint}")
