"""The container's one-time set-up, run by its PID 1 before it execs the init.

It opens the file systems of its namespaces for the runtime, which mounts
everything under the machine's root (:mod:`machined.runtime.mounts`). With
the supervisor's message (:func:`leader.send`: where the root is, the
payload, the confinement) it joins the mount namespace the intermediate made
for it (where the kernel locks those mounts) and pivots into the machine's
root, then resolves ``User=`` against the container's own /etc/passwd and
says what PID 1 is to exec: ``pymachine-init`` with the payload, or the
image's own init in boot mode.
"""

from __future__ import annotations

import os

from machined.runtime import init, users
from machined.runtime.init import DEFAULT_PATH
from machined.runtime.mounts import enter_rootfs, open_filesystems  # noqa: F401 (leader)

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


def set_up(message: dict, namespace: int) -> dict:
    """Join NAMESPACE (the intermediate's copy of the runtime's mount namespace,
    where the kernel locked its mounts) and pivot into the mounted root (we are
    PID 1, root inside); return what PID 1 execs:
    ``{"path": the image's init, or None for pymachine-init, "argv", "environment"}``."""
    enter_rootfs(message["root"], message["hostname"], namespace, nested=message["boot"])
    if message["boot"]:
        env = {"PATH": DEFAULT_PATH, "container": "pymachine", "TERM": "vt220"}
        env.update(message["environment"])
        path = _boot_init()
        return {"path": path, "argv": [path], "environment": env}
    user = users.resolve(message["user"])
    argv = init.command_line(
        message["command"],
        working_directory=message["working_directory"],
        uid=user.uid,
        gid=user.gid,
        groups=list(user.groups),
        terminal=message["terminal"],
        stop_timeout=message["stop_timeout"],
    )
    return {"path": None, "argv": argv, "environment": payload_environment(message, user.home)}
