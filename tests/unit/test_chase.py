"""chase.open_in_root against the kernel's own in-root resolution
(``openat2(RESOLVE_IN_ROOT)``) on random trees of symlinks: absolute,
relative, climbing out, looping, dangling. Whatever the tree, the result is
the kernel's, and always inside the root; creating never touches anything
outside it."""

from __future__ import annotations

import errno
import os
import random

import pytest

from machined.runtime import chase, linux

NAMES = ("a", "b", "c", "etc", "var", "tmp", "x")


def _random_target(rng: random.Random, outside: str) -> str:
    kind = rng.randrange(6)
    parts = [rng.choice((*NAMES, "..", ".")) for _ in range(rng.randrange(1, 5))]
    if kind == 0:
        return "/" + "/".join(parts)  # absolute: the machine's root, not the host's
    if kind == 1:
        return "/".join([".."] * rng.randrange(1, 6) + parts)  # climbing above the root
    if kind == 2:
        return outside + "/" + "/".join(parts)  # a host path that exists on the host
    if kind == 3:
        return rng.choice(NAMES)  # siblings: loops (a -> b, b -> a) come from these
    if kind == 4:
        return "/".join(parts) + rng.choice(("", "/"))
    return "."


def _random_tree(rng: random.Random, root: str, outside: str) -> None:
    dirs = [root]
    for _ in range(rng.randrange(3, 25)):
        parent = rng.choice(dirs)
        path = os.path.join(parent, rng.choice(NAMES))
        if os.path.lexists(path):
            continue
        kind = rng.randrange(3)
        if kind == 0:
            os.mkdir(path)
            dirs.append(path)
        elif kind == 1:
            with open(path, "w") as handle:
                handle.write("file")
        else:
            os.symlink(_random_target(rng, outside), path)


def _random_path(rng: random.Random, outside: str) -> str:
    if rng.randrange(5) == 0:
        return _random_target(rng, outside)
    parts = [rng.choice((*NAMES, *NAMES, "..", ".")) for _ in range(rng.randrange(1, 6))]
    return rng.choice(("", "/")) + "/".join(parts) + rng.choice(("", "", "/"))


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _kernel(root_fd: int, path: str) -> tuple[int, int] | int:
    # openat2 answers EAGAIN when any rename or mount on the machine raced a
    # lookup through ".." (a global sequence count): ask again, as its man page says.
    for _ in range(1000):
        try:
            fd = linux.openat2(root_fd, path, os.O_PATH | os.O_CLOEXEC, linux.RESOLVE_IN_ROOT)
            break
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                return exc.errno
    else:
        raise AssertionError(f"openat2 {path!r}: EAGAIN 1000 times")
    try:
        return _identity(fd)
    finally:
        os.close(fd)


def _ours(root_fd: int, path: str, **kw) -> tuple[int, int] | int:
    try:
        fd = chase.open_in_root(root_fd, path, **kw)
    except OSError as exc:
        return exc.errno
    try:
        return _identity(fd)
    finally:
        os.close(fd)


def _inside(root: str, fd: int) -> bool:
    real = os.readlink(chase.fd_path(fd))
    return real == root or real.startswith(root + "/")


@pytest.fixture
def sandbox(tmp_path):
    """(root, outside): the machine's root, and a host directory beside it that
    symlinks in the tree name by its host path."""
    root, outside = tmp_path / "root", tmp_path / "host"
    root.mkdir()
    outside.mkdir()
    for name in NAMES:
        (outside / name).mkdir()
    return str(root), str(outside)


def _snapshot(path: str) -> list[tuple[str, list[str], list[str]]]:
    return sorted((d, sorted(ds), sorted(fs)) for d, ds, fs in os.walk(path))


@pytest.mark.parametrize("seed", range(40))
def test_resolution_matches_the_kernel_s_in_root_resolution(sandbox, seed):
    root, outside = sandbox
    rng = random.Random(seed)
    _random_tree(rng, root, outside)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(60):
            path = _random_path(rng, outside)
            ours, kernel = _ours(root_fd, path), _kernel(root_fd, path)
            assert ours == kernel, f"{path!r} in {_snapshot(root)}"
            if not isinstance(ours, int):
                fd = chase.open_in_root(root_fd, path)
                try:
                    assert _inside(root, fd), path
                finally:
                    os.close(fd)
    finally:
        os.close(root_fd)


@pytest.mark.parametrize("seed", range(40))
def test_creating_stays_inside_the_root(sandbox, seed):
    root, outside = sandbox
    rng = random.Random(1000 + seed)
    _random_tree(rng, root, outside)
    before = _snapshot(outside)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(30):
            path = _random_path(rng, outside)
            kind = rng.choice(("dir", "file"))
            try:
                fd = chase.open_in_root(root_fd, path, create=kind)
            except OSError as exc:
                # a file on the way, a symlink loop: nothing the walk could create through
                assert exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.EEXIST), path
                continue
            try:
                assert _inside(root, fd), path
                assert _kernel(root_fd, path) == _identity(fd), path  # found again, the same
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    assert _snapshot(outside) == before


def test_a_hostile_etc_symlink_lands_in_the_root(sandbox):
    """The image's ``etc -> /var/tmp``: /etc/hostname is created in the
    root's var/tmp, not the host's."""
    root, outside = sandbox
    os.symlink(outside, os.path.join(root, "etc"))
    os.symlink("../../../../../..", os.path.join(root, "up"))
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, kind in (("/etc/hostname", "file"), ("/up/up/data/sub", "dir")):
            fd = chase.open_in_root(root_fd, path, create=kind, owner=(os.getuid(), os.getgid()))
            os.close(fd)
    finally:
        os.close(root_fd)
    assert os.path.isfile(root + outside + "/hostname")
    assert os.path.isdir(os.path.join(root, "data/sub"))
    assert not os.path.exists(os.path.join(outside, "hostname"))


def test_a_symlink_loop_is_eloop_and_an_empty_one_enoent(sandbox):
    root, _outside = sandbox
    os.symlink("b", os.path.join(root, "a"))
    os.symlink("/a", os.path.join(root, "b"))
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as loop:
            chase.open_in_root(root_fd, "a/x", create="dir")
        assert loop.value.errno == errno.ELOOP
        assert _kernel(root_fd, "a") == errno.ELOOP
    finally:
        os.close(root_fd)
