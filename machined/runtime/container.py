"""The container's one-time set-up, in a short-lived child of its PID 1.

It reads the supervisor's message (:func:`leader.send`: where the root is,
binds, the payload, the confinement), mounts /proc, /sys, /dev… and pivots into the
machine's root — which moves PID 1's root too, since they share the mount
namespace — then resolves ``User=`` against the container's own
/etc/passwd and sends PID 1 what to run (``marshal``: PID 1 imports no json).

It runs in a child so that the modules it needs (the mount
table logic) never load into PID 1, which lives as long as the machine.
"""

from __future__ import annotations

import marshal
import os

from machined.runtime import users
from machined.runtime.init import DEFAULT_PATH
from machined.runtime.leader import receive
from machined.runtime.mounts import Bind, RootfsSpec, setup_rootfs

BOOT_INITS = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")


class SetupError(Exception):
    pass


def payload_environment(message: dict, home: str) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": home,
        "container": "pymachine",
        "HOSTNAME": message["hostname"],
    }
    if message["terminal"] and message.get("term"):
        env["TERM"] = message["term"]
    env.update(message["environment"])
    return env


def _boot_init() -> str:
    for path in BOOT_INITS:
        if os.access(path, os.X_OK):
            return path
    raise SetupError(f"boot mode: none of {', '.join(BOOT_INITS)} exists in the image")


def set_up(go_read: int, spec_write: int) -> None:
    """Mount and pivot; write PID 1's instructions to SPEC_WRITE."""
    message = receive(go_read)
    if message is None:
        raise SetupError("the supervisor is gone")
    setup_rootfs(
        RootfsSpec(
            root=message["root"],
            hostname=message["hostname"],
            read_only=message["read_only"],
            writable_cgroup=message["boot"],
            binds=tuple(Bind(**b) for b in message["binds"]),
            console=os.ttyname(0) if message["terminal"] else None,
            cgroup_dir=message["cgroup_dir"],
        )
    )
    instructions = {
        "restrictions": message["restrictions"],
        "stop_timeout": message["stop_timeout"],
    }
    if message["boot"]:
        env = {"PATH": DEFAULT_PATH, "container": "pymachine", "TERM": "vt220"}
        env.update(message["environment"])
        instructions["boot_init"] = _boot_init()
        instructions["environment"] = env
    else:
        user = users.resolve(message["user"])
        instructions["payload"] = {
            "argv": message["command"],
            "environment": payload_environment(message, user.home),
            "working_directory": message["working_directory"] or "/",
            "uid": user.uid,
            "gid": user.gid,
            "groups": list(user.groups),
            "terminal": message["terminal"],
        }
    data = marshal.dumps(instructions)
    while data:
        data = data[os.write(spec_write, data) :]
