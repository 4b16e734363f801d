"""Unit tests of machined.runtime.userns: range allocation, the ownership
shift of a writable layer, and (as root) an idmapped mount."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from machined.runtime import linux, userns
from machined.runtime.userns import (
    DEFAULT_COUNT,
    PICK_MAX,
    PICK_MIN,
    UsernsSpec,
    allocate,
    allocations,
    parse_spec,
    release,
    shift_tree,
)


def test_pick_is_stable_and_in_bounds(tmp_path):
    first = allocate(tmp_path, "web", parse_spec("pick"))
    assert first is not None
    base, count = first
    assert PICK_MIN <= base < PICK_MAX and count == DEFAULT_COUNT
    assert base % DEFAULT_COUNT == 0
    assert allocate(tmp_path, "web", parse_spec("pick")) == first  # kept across restarts


def test_a_start_of_an_allocated_machine_writes_nothing(tmp_path, monkeypatch):
    """Every start allocates: the registry and the layer's marker are only read then."""
    first = allocate(tmp_path, "web", parse_spec("pick"))
    layer = tmp_path / "machines" / "web"
    userns.own_layer(layer, layer / "upper", first[0], first[1])

    def no_write(*args: object) -> None:
        raise AssertionError("written again")

    monkeypatch.setattr(userns, "_write_registry", no_write)
    monkeypatch.setattr(Path, "write_text", no_write)
    assert allocate(tmp_path, "web", parse_spec("pick")) == first
    userns.own_layer(layer, layer / "upper", first[0], first[1])
    assert (layer / userns.SHIFT_FILE).read_text() == f"{first[0]}\n"


def test_no_means_no_range(tmp_path):
    assert allocate(tmp_path, "web", parse_spec("no")) is None
    assert allocations(tmp_path) == {}


def test_two_machines_never_share_a_range(tmp_path):
    ranges = [allocate(tmp_path, f"m{i}", UsernsSpec("pick")) for i in range(50)]
    ranges.sort()
    for (a, a_count), (b, _) in zip(ranges, ranges[1:], strict=False):
        assert a + a_count <= b


def test_concurrent_allocation_is_serialized(tmp_path):
    results: dict[str, tuple[int, int]] = {}

    def grab(name: str) -> None:
        results[name] = allocate(tmp_path, name, UsernsSpec("pick"))

    threads = [threading.Thread(target=grab, args=(f"c{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r[0] for r in results.values()}) == 16
    assert set(allocations(tmp_path)) == set(results)


def test_fixed_range_overlap_is_refused(tmp_path):
    allocate(tmp_path, "a", parse_spec("1000000:65536"))
    with pytest.raises(ValueError, match="overlaps machine a"):
        allocate(tmp_path, "b", parse_spec("1050000:10"))
    assert allocate(tmp_path, "b", parse_spec("1065536:10")) == (1065536, 10)


def test_pick_avoids_taken_and_released_ranges_come_back(tmp_path):
    base, _ = allocate(tmp_path, "x", UsernsSpec("pick"))
    release(tmp_path, "x")
    assert "x" not in allocations(tmp_path)
    # someone else takes x's old range explicitly: x must now pick another one
    allocate(tmp_path, "y", parse_spec(f"{base}:65536"))
    again, _ = allocate(tmp_path, "x", UsernsSpec("pick"))
    assert again != base


def test_map_text():
    assert userns.map_text(524288, 65536) == "0 524288 65536\n"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


@needs_root
def test_shift_tree_moves_owners_and_keeps_setuid(tmp_path):
    root = tmp_path / "upper"
    (root / "etc").mkdir(parents=True)
    (root / "etc/file").write_text("x")
    tool = root / "su"
    tool.write_text("#!/bin/sh\n")
    os.chown(tool, 0, 0)
    os.chmod(tool, 0o4755)
    os.chown(root / "etc/file", 1000, 100)
    os.symlink("/nowhere", root / "link")
    changed = shift_tree(root, 0, 524288, 65536)
    assert changed == 5
    assert (root / "etc/file").stat().st_uid == 525288
    assert (root / "etc/file").stat().st_gid == 524388
    assert tool.stat().st_mode & 0o7777 == 0o4755
    assert os.lstat(root / "link").st_uid == 524288
    shift_tree(root, 524288, 0, 65536)
    assert (root / "etc/file").stat().st_uid == 1000


@needs_root
def test_own_layer_shifts_once(tmp_path):
    state = tmp_path / "state"
    upper = state / "upper"
    upper.mkdir(parents=True)
    (upper / "f").write_text("x")
    userns.own_layer(state, upper, 524288, 65536)
    assert (upper / "f").stat().st_uid == 524288
    assert (state / userns.SHIFT_FILE).read_text().strip() == "524288"
    userns.own_layer(state, upper, 524288, 65536)  # same mapping: nothing moves
    assert (upper / "f").stat().st_uid == 524288
    userns.own_layer(state, upper, None, 65536)  # PrivateUsers=no again
    assert (upper / "f").stat().st_uid == 0


def _unshare_mount_ns_in_child(func) -> int:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            code = func()
        except BaseException as exc:
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@needs_root
def test_idmapped_mount_shows_host_root_as_range_root(tmp_path):
    source = tmp_path / "image"
    source.mkdir()
    (source / "file").write_text("x")
    target = tmp_path / "mapped"
    target.mkdir()

    def child() -> int:
        try:
            with userns.mapped_userns(524288, 65536) as fd:
                userns.idmapped_mount(source, target, fd)
        except OSError as exc:
            os.write(2, f"{exc}\n".encode())
            return 77
        return 0 if Path(target / "file").stat().st_uid == 524288 else 1

    status = _unshare_mount_ns_in_child(child)
    if status == 77:
        from tests.harness import skip_or_fail

        skip_or_fail("this kernel or file system refuses idmapped mounts")
    assert status == 0
    assert (source / "file").stat().st_uid == 0  # the image itself is unchanged
