"""A machine's credentials, from the unit's credentials directory into the
machine: ``/run/host/credentials`` and ``$CREDENTIALS_DIRECTORY`` (systemd's
container interface, what systemd-nspawn gives a container: a booted guest's
systemd imports them as its own system credentials).

systemd loaded (and decrypted) them into ``$CREDENTIALS_DIRECTORY`` for the
unit, root's files. A user-namespaced machine's root is not host root, and the
credentials directory is a ramfs, which takes no idmapped mount; so the runtime
copies them into a small tmpfs of its own, mounted read-only — in its private
mount namespace only: no host user ever sees it, and it goes with the
machine's processes. As systemd gives a unit's ``User=`` its credentials,
the directory (0500) and files (0400) belong to the payload's user (its
``User=``, resolved in the machine's own /etc/passwd, mapped into the
machine's range), so a payload that is not root reads them, and no other user
inside does (root inside does, as root does with systemd's).
"""

from __future__ import annotations

import os

from machined.runtime import linux

INSIDE = "/run/host/credentials"


def stage(staging: str, owner: tuple[int, int]) -> dict | None:
    """Copy the unit's credentials to STAGING (a tmpfs mounted there), owned by
    OWNER (uid, gid: the payload's user as the host sees it); the bind into
    the machine, or None when the unit has none."""
    source = os.environ.get("CREDENTIALS_DIRECTORY")
    if not source or not os.path.isdir(source):
        return None
    names = sorted(os.listdir(source))
    os.makedirs(staging, mode=0o700, exist_ok=True)
    linux.mount(
        "tmpfs",
        staging,
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        f"mode=0500,uid={owner[0]},gid={owner[1]},size=1m,nr_inodes=1k",
    )
    for name in names:
        with open(os.path.join(source, name), "rb") as handle:
            data = handle.read()
        fd = os.open(
            os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400
        )
        try:
            os.write(fd, data)
            os.fchown(fd, *owner)
        finally:
            os.close(fd)
    linux.mount(
        None,
        staging,
        None,
        linux.MS_REMOUNT
        | linux.MS_BIND
        | linux.MS_RDONLY
        | linux.MS_NOSUID
        | linux.MS_NODEV
        | linux.MS_NOEXEC,
    )
    return {"source": staging, "target": INSIDE, "read_only": True}
