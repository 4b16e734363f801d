"""Definition files are written atomically (issue 8): a crash at any point of
``unitfile.write_atomic`` leaves either the old file or the new one, never half
of one, and a leftover temp file is never taken for a machine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from machined import definition as defs
from machined import unitfile
from machined.definition import MachineDefinition
from machined.paths import Paths

OLD = MachineDefinition(name="web", image="tiny", command=["/bin/old"])
NEW = MachineDefinition(name="web", image="tiny", command=["/bin/new", "x" * 20_000])


def _saved(tmp_path: Path) -> tuple[Paths, Path]:
    paths = Paths(tmp_path)
    path = defs.save(OLD, paths)
    return paths, path


def _crash_in_child(action) -> int:
    """Run ACTION in a forked child that dies by SIGKILL inside it; return the signal."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            action()
        finally:
            os._exit(0)  # the crash point was not reached: the test sees status 0
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _die(*_args, **_kw):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("crash_at", ["write", "fsync", "chmod", "rename"])
def test_a_crash_mid_write_leaves_the_old_definition_whole(tmp_path, monkeypatch, crash_at):
    paths, path = _saved(tmp_path)
    before = path.read_bytes()

    def action():
        if crash_at == "write":
            # SIGKILL after half of the new text reached the temp file
            real_fdopen = os.fdopen

            def fdopen(fd, *a, **kw):
                handle = real_fdopen(fd, *a, **kw)
                real_write = handle.write

                def write(text):
                    real_write(text[: len(text) // 2])
                    handle.flush()
                    _die()

                handle.write = write
                return handle

            monkeypatch.setattr(os, "fdopen", fdopen)
        else:
            monkeypatch.setattr(os, crash_at, _die)
        defs.save(NEW, paths)

    assert _crash_in_child(action) == signal.SIGKILL
    assert path.read_bytes() == before  # the old file, whole
    assert defs.load("web", paths) == OLD
    assert defs.list_names(paths) == ["web"]  # a temp file left behind is no machine
    leftovers = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert all(name.startswith(".web.machine.") for name in leftovers), leftovers


def test_a_crash_after_rename_leaves_the_new_definition_whole(tmp_path, monkeypatch):
    paths, path = _saved(tmp_path)
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        _die()

    def action():
        monkeypatch.setattr(os, "rename", rename_then_die)
        defs.save(NEW, paths)

    assert _crash_in_child(action) == signal.SIGKILL
    assert defs.load("web", paths) == NEW
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("failing", ["write", "fsync", "rename"])
def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path, monkeypatch, failing
):
    paths, path = _saved(tmp_path)
    before = path.read_bytes()

    def enospc(*_a, **_kw):
        raise OSError(28, "No space left on device")

    if failing == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, *a, **kw):
            handle = real_fdopen(fd, *a, **kw)
            handle.write = enospc
            return handle

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(os, failing, enospc)
    with pytest.raises(OSError, match="No space left"):
        defs.save(NEW, paths)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append("rename"), real_rename(a, b))[1])
    target = tmp_path / "etc" / "x.machine"
    unitfile.write_atomic(target, "[Machine]\nImage=tiny\n", mode=0o600)
    assert calls == ["fsync", "rename"]
    assert target.read_text() == "[Machine]\nImage=tiny\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert list(target.parent.iterdir()) == [target]


def test_replacing_keeps_the_inode_of_nobody_reading_it(tmp_path):
    """A reader holding the old file open still reads the old text (rename, not rewrite)."""
    paths, path = _saved(tmp_path)
    with open(path) as reader:
        defs.save(NEW, paths)
        assert defs.from_text("web", reader.read(), str(path)) == OLD
    assert defs.load("web", paths) == NEW


def test_temp_files_left_by_a_crash_are_not_machines(tmp_path):
    paths, path = _saved(tmp_path)
    (path.parent / ".web.machine.abc123").write_text("[Machine]\nIm")
    (path.parent / ".other.machine.zz").write_text("")
    assert defs.list_names(paths) == ["web"]
    assert [d.name for d in defs.list_definitions(paths)] == ["web"]
