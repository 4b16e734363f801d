"""Fuzz: random hostile archives, and after each one the host beside the root is unchanged.

Seeded (reproducible: the failing case's seed and entries are in the message)
and bounded. The ingredients are the ones real attacks combine: directories
with setuid modes, symlinks absolute (at the host canary), relative and
climbing, links replacing directories and the other way round, hard links to
anything (symlinks included), duplicates, device nodes, fifos, xattrs, OCI
whiteouts and opaque markers through links, over one or two layers. Each
archive may be refused (one clean :class:`PymachineError`), never anything
else; after each: nothing outside the root changed (modes, owners, mtimes,
link counts, contents, xattrs), and no symlink in the root climbs above it.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from machined.errors import PymachineError
from tests.unit.test_import_hostile import (
    E,
    climbing_links,
    make_canary,
    snapshot,
    tar_bytes,
    unpack,
)

CASES = 2500
NAMES = ["a", "b", "x", "l", "a/b", "a/x", "a/l", "b/a", "a/b/c", "a/b/l", "l/x", "l/l", "d/e/f"]
MODES = [0o755, 0o4777, 0o6777, 0o1777, 0o555, 0o700, 0o000]


def targets(host: Path) -> list[str]:
    return [
        str(host),
        str(host / "file"),
        str(host / "dir"),
        str(host / "dir/sub"),
        str(host / "missing"),
        "/",
        ".",
        "..",
        "../..",
        "../../..",
        "/a",
        "a/b",
        "../x",
        "l/../..",
        "b/../../..",
        *NAMES,
    ]


def entry(rng: random.Random, host: Path, whiteouts: bool, devices: bool, made: list[str]) -> E:
    """One random entry; hard links mostly name an earlier entry (else most archives are refused)."""
    name = rng.choice(NAMES)
    kinds = ["dir"] * 3 + ["file"] * 3 + ["sym"] * 4 + ["hard"] * 2 + ["fifo"]
    kinds += ["chr"] if devices or rng.random() < 0.05 else []
    kinds += ["wh", "opq"] if whiteouts else []
    kind = rng.choice(kinds)
    xattrs = (("user.fuzz", "v"),) if rng.random() < 0.2 else ()
    if kind == "wh":
        parent, _, base = name.rpartition("/")
        return E(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
    if kind == "opq":
        parent = name.rpartition("/")[0]
        return E(f"{parent}/.wh..wh..opq" if parent else ".wh..wh..opq")
    if kind == "sym":
        result = E(name, "sym", rng.choice(targets(host)), xattrs=xattrs)
    elif kind == "hard":
        result = E(name, "hard", rng.choice(made if made and rng.random() < 0.8 else NAMES))
    else:
        result = E(name, kind, mode=rng.choice(MODES), data=b"image data", xattrs=xattrs)
    if kind != "dir":
        made.append(name)
    return result


@pytest.fixture
def workspace(tmp_path) -> Iterator[Path]:
    """Somewhere fast: /dev/shm (tmpfs) when there is one, as the disk would dominate the time."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="pymachine-fuzz.", dir="/dev/shm"))
        try:
            yield path
        finally:
            shutil.rmtree(path)
    else:
        yield tmp_path


def test_random_hostile_archives_stay_inside(workspace):
    tmp_path = workspace
    host = make_canary(tmp_path / "host")
    roots = tmp_path / "roots"
    roots.mkdir()
    before = snapshot(tmp_path, skip=roots)
    refused = 0
    for seed in range(CASES):
        rng = random.Random(seed)
        whiteouts = rng.random() < 0.4
        allow_devices = rng.random() < 0.3
        made: list[str] = []
        layers = [
            [entry(rng, host, whiteouts, allow_devices, made) for _ in range(rng.randint(2, 10))]
            for _ in range(2 if whiteouts else 1)
        ]
        root = roots / str(seed)
        try:
            for layer in layers:
                unpack(tar_bytes(layer), root, whiteouts=whiteouts, allow_devices=allow_devices)
        except PymachineError:
            refused += 1
        where = f"seed {seed}: {layers}"
        assert snapshot(tmp_path, skip=roots) == before, where
        assert climbing_links(root) == [], where
        if not allow_devices:
            devices = [p for p in root.rglob("*") if stat.S_ISCHR(p.lstat().st_mode)]
            assert devices == [], where
        shutil.rmtree(root)
    print(f"{refused} of {CASES} archives refused")
    assert 0 < refused < CASES  # both outcomes were exercised
