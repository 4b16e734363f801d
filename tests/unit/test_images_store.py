"""The image store: listing, sidecar metadata, remove/rename/clone, staging clean-up."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from machined.errors import Conflict, InvalidInput, NotFound
from machined.images import ImageConfig, ImageStore
from machined.paths import Paths


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    return ImageStore(Paths(tmp_path))


def make_image(store: ImageStore, name: str, files: dict[str, str] | None = None, **meta):
    with store.staging(name) as tmp:
        for rel, text in (files or {"etc/os-release": "ID=test\n"}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        return store.commit(name, tmp, meta=meta or None)


def test_empty_store_lists_nothing(store):
    assert store.list() == []
    assert not store.exists("nope")


def test_path_validates_and_reports_missing(store):
    with pytest.raises(InvalidInput):
        store.path("../etc")
    with pytest.raises(NotFound, match="image 'x' not found"):
        store.path("x")


def test_commit_and_list(store):
    path = make_image(store, "one", source="test")
    assert path == store.paths.image("one")
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    [info] = store.list()
    assert info.name == "one"
    assert info.size and info.size > 0
    assert info.used_by == []
    assert info.source == "test"
    assert store.meta_file("one").exists()


def test_hidden_and_temporary_dirs_are_not_images(store):
    make_image(store, "one")
    (store.directory / ".#two.123.abc").mkdir()
    (store.directory / "file.raw").write_text("")
    assert store.names() == ["one"]


def test_failed_staging_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.staging("bad") as tmp:
        (tmp / "etc").mkdir()
        raise RuntimeError("boom")
    assert not store.exists("bad")
    assert [p.name for p in store.directory.iterdir()] == []


def test_interrupted_staging_leaves_nothing(store):
    with pytest.raises(KeyboardInterrupt), store.staging("bad") as tmp:
        (tmp / "etc").mkdir()
        raise KeyboardInterrupt
    assert list(store.directory.iterdir()) == []


def test_stale_staging_of_dead_process_is_cleaned(store):
    store.directory.mkdir(parents=True)
    stale = store.directory / ".#old.999999999.xyz"
    (stale / "etc").mkdir(parents=True)
    mine = store.directory / f".#live.{os.getpid()}.xyz"
    mine.mkdir()
    store.clean_stale()
    assert not stale.exists()
    assert mine.exists()


def test_existing_name_conflicts(store):
    make_image(store, "one")
    with pytest.raises(Conflict), store.staging("one"):
        pass


def test_config_round_trip(store):
    make_image(store, "app")
    assert store.config("app") == ImageConfig()
    config = ImageConfig(
        entrypoint=("/bin/sh", "-c"),
        cmd=("echo hi",),
        environment=("PATH=/bin", "A=b=c"),
        working_directory="/srv",
    )
    store.set_config("app", config)
    assert store.config("app") == config
    assert store.config("app").command == ["/bin/sh", "-c", "echo hi"]
    assert store.config("app").environment_dict == {"PATH": "/bin", "A": "b=c"}


def test_rename_moves_sidecar(store):
    make_image(store, "old")
    store.set_config("old", ImageConfig(cmd=("/bin/true",)))
    store.rename("old", "new")
    assert not store.exists("old")
    assert store.exists("new")
    assert not store.meta_file("old").exists()
    assert store.config("new").cmd == ("/bin/true",)
    assert json.loads(store.meta_file("new").read_text())["name"] == "new"


def test_rename_onto_existing_conflicts(store):
    make_image(store, "a")
    make_image(store, "b")
    with pytest.raises(Conflict):
        store.rename("a", "b")


def test_clone_is_independent_and_keeps_config(store):
    make_image(store, "src", {"etc/x": "1", "usr/bin/tool": "#!/bin/sh\n"})
    os.symlink("tool", store.paths.image("src") / "usr/bin/link")
    store.set_config("src", ImageConfig(cmd=("/bin/sh",)))
    store.clone("src", "copy")
    copy = store.paths.image("copy")
    assert (copy / "etc/x").read_text() == "1"
    assert os.readlink(copy / "usr/bin/link") == "tool"
    (copy / "etc/x").write_text("2")
    assert (store.paths.image("src") / "etc/x").read_text() == "1"
    assert store.config("copy").cmd == ("/bin/sh",)
    assert store.info("copy").source == "clone of src"


def test_remove_deletes_tree_and_sidecar(store):
    make_image(store, "gone")
    store.remove("gone")
    assert not store.exists("gone")
    assert not store.meta_file("gone").exists()
    assert list(store.directory.iterdir()) == []
    with pytest.raises(NotFound):
        store.remove("gone")


def _fake_definitions(monkeypatch, machines):
    module = types.ModuleType("machined.definition")
    module.list_definitions = lambda paths: [
        types.SimpleNamespace(name=name, image=image) for name, image in machines
    ]
    monkeypatch.setitem(sys.modules, "machined.definition", module)


def test_remove_refused_while_used(store, monkeypatch):
    make_image(store, "base")
    _fake_definitions(monkeypatch, [("web", "base"), ("db", "base"), ("x", "other")])
    assert store.used_by("base") == ["db", "web"]
    with pytest.raises(Conflict, match="used by machine"):
        store.remove("base")
    with pytest.raises(Conflict):
        store.rename("base", "base2")
    assert store.exists("base")
    [info] = store.list()
    assert info.used_by == ["db", "web"]


def test_size_recomputed_when_tree_changes(store):
    make_image(store, "s")
    before = store.info("s").size
    (store.paths.image("s") / "big").write_bytes(b"x" * 200_000)
    assert store.info("s").size >= before + 200_000
