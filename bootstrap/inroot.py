"""Paths inside an image root, resolved one directory fd at a time.

Why fds: a path string handed to the kernel is resolved again on every call,
and a symlink that an archive put anywhere along it (a parent, the last
component, a directory replaced by a link after it was made) sends that call
to the host. Here the kernel only ever sees one component at a time, opened
with ``O_NOFOLLOW`` relative to the directory fd before it; symlinks met on
the way are read and resolved *inside* the root like a ``chroot`` would
(absolute targets restart at the root, ``..`` stops there). The caller gets
the parent's fd and the last component, and works with ``*at`` calls
(``dir_fd=``, ``follow_symlinks=False``) or an fd opened with ``O_NOFOLLOW``,
so no extraction call can reach outside the root, whatever earlier entries
made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from machined.errors import InvalidInput

MAX_SYMLINKS = 40
# Directory levels below the root: each holds an fd while a path is walked, and
# tools that recurse (rmtree, cp) must still get through the tree.
MAX_DEPTH = 256
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeEntry(InvalidInput):
    """An archive entry that would land outside the image, or a refused device node."""


def split(rel: str) -> list[str]:
    return [p for p in rel.split("/") if p not in ("", ".")]


@dataclass(frozen=True)
class Located:
    """The last component of a path and the fd of its (real) parent directory."""

    dir_fd: int
    name: str
    parent: tuple[str, ...]  # the parent's real path below the root, no links in it

    @property
    def rel(self) -> str:
        return "/".join((*self.parent, self.name))

    def lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None


class Root:
    """An open image root directory; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, DIR_NOFOLLOW)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def locate(self, rel: str, *, create: bool = False) -> Iterator[Located]:
        """The parent fd (valid inside the block) and last component of ``rel``.

        Parents are resolved inside the root; with ``create`` missing ones are
        made (0755). The last component is never followed. Raises
        ``FileNotFoundError`` for a missing parent, :class:`UnsafeEntry` for a
        parent that is not a directory or a symlink loop.
        """
        parts = split(rel)
        if not parts:
            raise UnsafeEntry("refusing an entry for the image root itself")
        *dirs, last = parts
        if last == "..":
            raise UnsafeEntry(f"refusing path ending in '..': {rel!r}")
        stack: list[tuple[int, str]] = []  # (fd, name) of the directories entered
        try:
            self._walk(rel, dirs, stack, create)
            dir_fd = stack[-1][0] if stack else self.fd
            yield Located(dir_fd, last, tuple(name for _, name in stack))
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _walk(
        self, rel: str, pending: list[str], stack: list[tuple[int, str]], create: bool
    ) -> None:
        followed = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if stack:
                    os.close(stack.pop()[0])
                continue
            here = stack[-1][0] if stack else self.fd
            try:
                fd = os.open(part, _PATH, dir_fd=here)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=here)
                fd = os.open(part, _PATH, dir_fd=here)
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                stack.append((fd, part))
                if len(stack) > MAX_DEPTH:
                    raise UnsafeEntry(f"refusing {rel!r}: more than {MAX_DEPTH} directories deep")
                continue
            os.close(fd)
            if not stat.S_ISLNK(mode):
                where = "/".join([*(name for _, name in stack), part])
                raise UnsafeEntry(f"refusing {rel!r}: {where} is not a directory")
            followed += 1
            if followed > MAX_SYMLINKS:
                raise UnsafeEntry(f"refusing {rel!r}: too many levels of symbolic links")
            target = os.readlink(part, dir_fd=here)
            if target.startswith("/"):
                while stack:
                    os.close(stack.pop()[0])
            pending[:0] = split(target)

    @contextlib.contextmanager
    def open_dir(self, rel: str) -> Iterator[int]:
        """A read fd of directory ``rel`` (parents resolved inside, last not followed)."""
        if not split(rel):
            fd = os.open(".", DIR_NOFOLLOW, dir_fd=self.fd)
        else:
            with self.locate(rel) as at:
                fd = os.open(at.name, DIR_NOFOLLOW, dir_fd=at.dir_fd)
        try:
            yield fd
        finally:
            os.close(fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` below ``dir_fd`` (a whole tree for a directory), never following links."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
