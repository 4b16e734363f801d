"""Paths resolved *inside* a machine's root, as nspawn's ``chase`` and runc's
securejoin do: a symlink in the image or written by root inside (``/etc ->
/var/tmp``, ``../../..``) resolves against the machine's root, never the
host's, and ``..`` stops at the root.

The walk goes one component at a time through ``O_PATH|O_NOFOLLOW`` file
descriptors, so nothing on the way is looked up by a host path string; it
can create what is missing (directories, an empty file at the end) through
the directory fds (``mkdirat``, ``openat(O_CREAT|O_EXCL|O_NOFOLLOW)``).
Callers mount onto the result through ``/proc/self/fd/N``: the kernel then
mounts on exactly the resolved inode, whatever the path says by then.

``..`` goes back along the walk's own stack (as securejoin does): even a
directory moved out from under a concurrent walk cannot lead above the root.
The kernel's ``openat2(RESOLVE_IN_ROOT)`` is the reference the unit tests
compare with; it is not used here because it cannot create.

os only: the runtime runs this on every start.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SYMLINKS = 40  # the kernel's limit (ELOOP)
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(path: str) -> list[str]:
    """PATH's components, reversed (a stack: the next one last). A trailing
    slash becomes "." so that it demands a directory, as the kernel does."""
    parts = [part for part in path.split("/") if part]
    if path.endswith("/") and parts:
        parts.append(".")
    parts.reverse()
    return parts


def _create(dir_fd: int, name: str, directory: bool, owner: tuple[int, int] | None) -> None:
    try:
        if directory:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o644, dir_fd=dir_fd))
    except FileExistsError:
        return  # made meanwhile: the walk looks at it again
    if owner is not None:
        os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)


def open_in_root(
    root_fd: int,
    path: str,
    *,
    create: str | None = None,
    owner: tuple[int, int] | None = None,
) -> int:
    """An ``O_PATH`` fd of PATH resolved inside the directory ROOT_FD (absolute
    and relative symlinks alike; the final one is followed too).

    CREATE ("dir" or "file"): make missing directories on the way and the
    last component as that kind (OWNER: the uid/gid to give them). Raises
    OSError as the kernel would: ENOENT, ENOTDIR, ELOOP."""
    pending = _components(path)
    stack = [os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=root_fd)]
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(name, _PATH_FLAGS, dir_fd=stack[-1])
            except FileNotFoundError:
                if create is None:
                    raise
                _create(stack[-1], name, bool(pending) or create == "dir", owner)
                pending.append(name)
                continue
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                links += 1
                if not target:
                    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending.extend(_components(target))
                continue
            if pending and not stat.S_ISDIR(mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            stack.append(fd)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def fd_path(fd: int) -> str:
    """The ``/proc/self/fd`` name of FD: mount(2) follows it to the very inode."""
    return f"/proc/self/fd/{fd}"
