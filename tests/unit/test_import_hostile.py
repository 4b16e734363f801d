"""Hostile archives (issue 15): no extraction call may reach outside the image root.

Each class of attack found by the outside review has a targeted test here (a
real tar made with ``tarfile``, extracted for real into a tmp dir, a canary
tree beside it whose modes, mtimes, contents and link counts must not move);
then a seeded fuzz run mixes the same ingredients at random and checks the
same two things after every archive: nothing outside the root changed, and
no symlink in the result climbs above the root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.oci import import_oci
from bootstrap.progress import Progress
from bootstrap.space import NoSpace, SpaceBudget
from bootstrap.tarimport import UnsafeEntry, export_tar, extract, import_tar, symlink_escapes
from machined.errors import InvalidInput
from machined.images import ImageStore
from machined.paths import Paths
from tests.harness import skip_or_fail
from tests.unit.test_bootstrap_oci import LayoutBuilder

MTIME = 1_700_000_000


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


@dataclass
class E:
    """One archive entry: kind file|dir|sym|hard|chr|fifo; ``target`` for links."""

    name: str
    kind: str = "file"
    target: str = ""
    mode: int = 0o644
    data: bytes = b""
    xattrs: tuple[tuple[str, str], ...] = ()


def tar_bytes(entries: list[E], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime, info.mode = MTIME, e.mode
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs}
            payload = None
            if e.kind == "file":
                info.size, payload = len(e.data), io.BytesIO(e.data)
            elif e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif e.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            t.addfile(info, payload)
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


def unpack(data: bytes, root: Path, **kw) -> None:
    root.mkdir(exist_ok=True)
    extract(io.BufferedReader(io.BytesIO(data)), root, **kw)


# --- the canary: a host tree beside the image root -----------------------------


def make_canary(where: Path) -> Path:
    """A small host tree that hostile archives aim at (files, a dir, a dir below it)."""
    (where / "dir/sub").mkdir(parents=True)
    (where / "file").write_text("host secret\n")
    (where / "dir/file").write_text("host file in a dir\n")
    (where / "dir/sub/deep").write_text("deep\n")
    os.chmod(where / "file", 0o640)
    os.chmod(where / "dir", 0o750)
    os.chmod(where / "dir/sub", 0o700)
    for path in (where, where / "file", where / "dir", where / "dir/sub", where / "dir/file"):
        os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return where


def snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path below ``top`` (but ``skip``): type, mode, owner, mtime, links, content."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(top):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(dirpath, d) != skip]
        for name in [".", *dirs, *files]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry: tuple = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry += (hashlib.sha256(f.read()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            entry += (sorted(os.listxattr(path, follow_symlinks=False)),)
            out[os.path.relpath(path, top)] = entry
    return out


def climbing_links(root: Path) -> list[str]:
    """Symlinks below ``root`` whose target climbs above it (seen from where they are)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                rel = os.path.relpath(path, root)
                if symlink_escapes(rel, os.readlink(path)):
                    found.append(f"{rel} -> {os.readlink(path)}")
    return found


@pytest.fixture
def host(tmp_path) -> Path:
    return make_canary(tmp_path / "host")


# --- issue 15.2: metadata through a link a later entry put there -----------------


def test_dir_metadata_does_not_follow_a_symlink_that_replaced_the_dir(tmp_path, host):
    before = snapshot(host)
    data = tar_bytes([E("x", "dir", mode=0o4777), E("x", "sym", str(host / "file"))])
    unpack(data, tmp_path / "r")
    assert snapshot(host) == before  # the old code chmodded the host file to 4777
    assert os.readlink(tmp_path / "r/x") == str(host / "file")


def test_dir_metadata_does_not_follow_a_parent_replaced_by_a_symlink(tmp_path, host):
    """``a/sub`` made, then ``a`` becomes a link to a host dir that has a ``sub`` too."""
    before = snapshot(host)
    data = tar_bytes(
        [
            E("a", "dir", mode=0o755),
            E("a/sub", "dir", mode=0o6777),
            E("a", "sym", str(host / "dir")),
        ]
    )
    unpack(data, tmp_path / "r")
    assert snapshot(host) == before


def test_oci_layer_dir_then_symlink_leaves_host_alone(tmp_path, host):
    before = snapshot(host)
    layout = LayoutBuilder(tmp_path / "layout")
    first = tar_bytes([E("x", "dir", mode=0o6777), E("y", "dir", mode=0o6777)], gz=True)
    second = tar_bytes(
        [
            E(".wh.y"),
            E("y", "sym", str(host / "dir")),
            E("z", "dir", mode=0o6777),  # a dir and the link replacing it in one layer
            E("z", "sym", str(host / "file")),
            E("x/.wh..wh..opq"),
            E("x", "sym", str(host)),
        ]
    )
    layout.index([layout.image([first, second], {})])
    store = ImageStore(Paths(tmp_path / "state"))
    path = import_oci(layout.root, "img", store=store, progress=quiet())
    assert snapshot(host) == before
    assert os.readlink(path / "x") == str(host)


# --- links that end up pointing out ----------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [
        # the link's parent is a link to the root: "d/l -> ../x" really is "l -> ../x"
        [E("d", "sym", "."), E("d/l", "sym", "../x")],
        [E("d", "sym", "/"), E("d/up", "sym", "../../etc")],
        # a hard link moves a symlink that was fine where it was
        [E("a/b", "dir", mode=0o755), E("a/b/l", "sym", "../../x"), E("l2", "hard", "a/b/l")],
    ],
    ids=["via-dot-link", "via-root-link", "hardlink-to-symlink"],
)
def test_no_symlink_ends_up_climbing_out(tmp_path, entries):
    with pytest.raises(UnsafeEntry, match="outside"):
        unpack(tar_bytes(entries), tmp_path / "r")


def test_writes_through_links_stay_inside(tmp_path, host):
    """Every kind of entry through every kind of link lands inside the root."""
    before = snapshot(host)
    data = tar_bytes(
        [
            E("abs", "sym", str(host)),
            E("dot", "sym", "."),
            E("deep/up", "sym", "../.."),  # one level too many: refused
        ]
    )
    with pytest.raises(UnsafeEntry):
        unpack(data, tmp_path / "refused")
    data = tar_bytes(
        [
            E("abs", "sym", str(host)),
            E("deep", "dir", mode=0o755),
            E("deep/up", "sym", ".."),
            E("abs/file", data=b"image"),
            E("abs/dir", "dir", mode=0o777),
            E("deep/up/abs/dir/sub/deep", data=b"image"),
            E("abs/fifo", "fifo", mode=0o666),
            E("abs/dir/sub/hard", "hard", "abs/file"),
            E("deep/up/deep/up/abs/link", "sym", "file"),
        ]
    )
    r = tmp_path / "r"
    unpack(data, r)
    assert snapshot(host) == before
    inside = r / str(host).lstrip("/")
    assert (inside / "file").read_bytes() == b"image"
    assert (inside / "dir/sub/deep").read_bytes() == b"image"
    assert os.stat(inside / "dir/sub/hard").st_ino == os.stat(inside / "file").st_ino
    assert stat.S_IMODE(os.stat(inside / "dir").st_mode) == 0o777


# --- issue 15.11: a refusal is one line, exit 2, nothing left ------------------


@pytest.mark.parametrize(
    "entries",
    [
        [E("d", "sym", "/nonexistent"), E("h", "hard", "d/x")],
        [E("f", data=b"x"), E("h", "hard", "f/x")],
        [E("h", "hard", "missing")],
        [E("d", "dir", mode=0o755), E("h", "hard", "d")],
        [E("a/b/c", data=b"x"), E("a", "hard", "a/b/c")],
    ],
    ids=["through-dangling-dir-link", "through-a-file", "missing", "to-a-directory", "own-parent"],
)
def test_bad_hard_links_are_refusals(tmp_path, entries):
    with pytest.raises(UnsafeEntry, match="hard link"):
        unpack(tar_bytes(entries), tmp_path / "r")


def test_overlayfs_xattrs_are_not_set(tmp_path):
    """The image is an overlay lower layer: its own overlay xattrs would steer the mount."""
    xattrs = (("trusted.overlay.redirect", "/etc"), ("user.overlay.opaque", "y"), ("user.k", "v"))
    unpack(
        tar_bytes([E("d", "dir", mode=0o755, xattrs=xattrs), E("f", xattrs=xattrs)]), tmp_path / "r"
    )
    for name in ("d", "f"):
        try:
            assert os.listxattr(tmp_path / "r" / name) == ["user.k"]
        except OSError:  # a file system without user xattrs
            skip_or_fail("no user xattrs on the test file system")


def test_file_below_a_file_is_a_refusal(tmp_path):
    with pytest.raises(UnsafeEntry, match="not a directory"):
        unpack(tar_bytes([E("f", data=b"x"), E("f/g", data=b"y")]), tmp_path / "r")


@pytest.fixture
def store_env(tmp_path):
    root = tmp_path / "pm"
    return ImageStore(Paths(root)), {**os.environ, "PYMACHINE_ROOT": str(root)}


def pymachine(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "machined", *args], env=env, capture_output=True, text=True
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's error: exactly one ``pymachine:`` line on stderr, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pymachine:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def test_cli_import_refusal_is_one_line_exit_2_and_leaves_nothing(tmp_path, host, store_env):
    store, env = store_env
    before = snapshot(host)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(
        tar_bytes(
            [
                E("x", "dir", mode=0o4777),
                E("x", "sym", str(host / "file")),
                E("d", "sym", str(host / "nonexistent")),
                E("h", "hard", "d/x"),
            ]
        )
    )
    result = pymachine(env, "import-tar", str(archive), "bad")
    assert result.returncode == 2
    assert "hard link 'h'" in error_line(result)
    assert snapshot(host) == before
    assert os.listdir(store.directory) == []
    assert not store.meta_file("bad").exists()


def test_cli_import_of_dir_then_symlink_leaves_host_alone(tmp_path, host, store_env):
    store, env = store_env
    before = snapshot(host)
    archive = tmp_path / "x.tar"
    archive.write_bytes(tar_bytes([E("x", "dir", mode=0o6777), E("x", "sym", str(host / "dir"))]))
    result = pymachine(env, "import-tar", str(archive), "img")
    assert result.returncode == 0, result.stderr
    assert snapshot(host) == before
    assert os.readlink(store.path("img") / "x") == str(host / "dir")


# --- issue 15.7: sparse bombs and the space check ------------------------------


def sparse_tar(work: Path, size: int, *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar (made by GNU tar, which writes sparse members) with one ``size``-byte hole file."""
    src = work / f"sparse-src-{fmt}"
    src.mkdir()
    with open(src / "hole", "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"data in the middle")
    out = work / f"sparse-{fmt}.tar"
    form = "pax" if fmt == tarfile.PAX_FORMAT else "gnu"
    subprocess.run(
        ["tar", "--sparse", f"--format={form}", "-C", str(src), "-cf", str(out), "hole"],
        check=True,
    )
    shutil.rmtree(src)
    return out.read_bytes()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_sparse_member_is_written_sparsely(tmp_path, fmt):
    size = 256 << 20
    data = sparse_tar(tmp_path, size, fmt=fmt)
    assert len(data) < 64 << 10
    unpack(data, tmp_path / "r")
    hole = tmp_path / "r/hole"
    st = os.stat(hole)
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20  # the old code wrote all 256 MiB
    with open(hole, "rb") as f:
        f.seek(size // 2 - 4)
        assert f.read(22) == b"\0\0\0\0data in the middle"
        assert f.read(4) == b"\0\0\0\0"


def test_budget_refuses_an_archive_bigger_than_the_free_space(tmp_path):
    budget = SpaceBudget.for_path(tmp_path)
    budget.bytes_left = 1 << 20
    data = tar_bytes([E("a", data=b"x" * (600 << 10)), E("b", data=b"y" * (600 << 10))], gz=True)
    with pytest.raises(NoSpace, match="not enough space"):
        unpack(data, tmp_path / "r", budget=budget)
    assert not (tmp_path / "r/b").exists()  # refused before writing it


def test_refused_for_space_import_leaves_nothing(tmp_path, monkeypatch):
    store = ImageStore(Paths(tmp_path / "pm"))
    real = SpaceBudget.for_path

    def small(path):
        budget = real(path)
        budget.bytes_left = 1 << 20
        return budget

    monkeypatch.setattr(SpaceBudget, "for_path", staticmethod(small))
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(tar_bytes([E("zeros", data=bytes(4 << 20))], gz=True))
    with pytest.raises(NoSpace):
        import_tar(archive, "big", store=store, progress=quiet())
    assert os.listdir(store.directory) == []


def in_small_tmpfs(mountpoint: Path, env: dict, script: str) -> subprocess.CompletedProcess:
    """Run shell ``script`` in a mount namespace where ``mountpoint`` is an 8 MiB tmpfs."""
    if shutil.which("unshare") is None:
        skip_or_fail("unshare(1) is missing")
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size=8m pymachine-test {mountpoint}"
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
    probe = subprocess.run([*command, mount], capture_output=True, text=True)
    if probe.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.strip()}")
    return subprocess.run(
        [*command, f"{mount} && {script}"], env=env, capture_output=True, text=True
    )


def test_cli_import_on_a_small_file_system(tmp_path):
    """A 256 MiB sparse member fits an 8 MiB store; 12 MiB of data is one clear refusal."""
    paths = Paths(tmp_path / "pm")
    env = {**os.environ, "PYMACHINE_ROOT": str(paths.root)}
    sparse = tmp_path / "sparse.tar"
    sparse.write_bytes(sparse_tar(tmp_path, 256 << 20))
    big = tmp_path / "big.tar.gz"
    big.write_bytes(tar_bytes([E("random", data=random.Random(1).randbytes(12 << 20))], gz=True))
    cli = f"{sys.executable} -m machined"
    result = in_small_tmpfs(
        paths.images,
        env,
        f"{cli} import-tar {sparse} holes && stat -c %s:%b {paths.images}/holes/hole && "
        f"{cli} import-tar {big} big; echo rc=$?; ls -A {paths.images}",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    size, blocks = out[0].split(":")
    assert int(size) == 256 << 20 and int(blocks) * 512 < 1 << 20  # holes kept
    assert out[1] == "rc=1"  # refused, exit 1 …
    assert out[2:] == ["holes"]  # … and nothing of it left in the store
    assert "not enough space" in error_line(result)


# --- export-tar and image clone of a hostile image ------------------------------


def hostile_image(store: ImageStore, host: Path) -> None:
    """An image whose links aim at the host every way (as any tool might have made it)."""
    with store.staging("evil") as tmp:
        (tmp / "d").mkdir()
        os.symlink(str(host / "dir"), tmp / "etc")
        os.symlink(str(host / "file"), tmp / "d/file")
        os.symlink("../../../../../../../..", tmp / "d/up")
        os.symlink(os.path.relpath(host / "file", tmp / "d"), tmp / "d/rel")
        (tmp / "own").write_text("image file\n")
        os.link(tmp / "own", tmp / "d/own-link")
        store.commit("evil", tmp)


def test_export_and_clone_of_a_hostile_image_keep_links_as_links(tmp_path, host):
    store = ImageStore(Paths(tmp_path / "pm"))
    hostile_image(store, host)
    before = snapshot(host)
    archive = tmp_path / "evil.tar"
    export_tar("evil", archive, store=store, progress=quiet())
    with tarfile.open(archive) as t:
        members = {m.name: m for m in t.getmembers()}
        assert all(m.isdir() or m.issym() or m.islnk() or m.name == "own" for m in t)
        assert members["etc"].linkname == str(host / "dir")
        assert members["d/up"].issym() and members["d/file"].issym()
        assert t.extractfile("own").read() == b"image file\n"
    assert b"host secret" not in archive.read_bytes()
    store.clone("evil", "copy")
    copy = store.path("copy")
    assert os.readlink(copy / "etc") == str(host / "dir")
    assert os.readlink(copy / "d/up") == "../../../../../../../.."
    assert snapshot(host) == before


def test_too_deep_is_a_refusal(tmp_path):
    """Deep trees would exhaust fds and the recursion of rmtree when a failed import is removed."""
    with pytest.raises(UnsafeEntry, match="deep"):
        unpack(tar_bytes([E("d/" * 300 + "f")]), tmp_path / "r")


@pytest.mark.parametrize(
    "index",
    [
        {"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json"}]},
        {"manifests": [{"digest": 7}]},
        {"manifests": "nope"},
    ],
    ids=["no-digest", "digest-not-a-string", "manifests-not-a-list"],
)
def test_malformed_oci_layout_is_a_refusal(tmp_path, index):
    layout = LayoutBuilder(tmp_path / "layout")
    (layout.root / "index.json").write_text(json.dumps(index))
    store = ImageStore(Paths(tmp_path / "state"))
    with pytest.raises(InvalidInput):
        import_oci(layout.root, "img", store=store, progress=quiet())
    assert not store.directory.exists() or os.listdir(store.directory) == []


@pytest.mark.parametrize("kind", ["file", "dir", "sym", "chr"])
@pytest.mark.parametrize(
    "header",
    [{"mtime": "1e400"}, {"mtime": "-1e30"}, {"uid": str(2**70)}, {"gid": str(2**40)}],
    ids=["mtime-huge", "mtime-negative", "uid-huge", "gid-huge"],
)
def test_out_of_range_header_values_are_refusals(tmp_path, kind, header):
    """PAX headers carry numbers of any size: one line (exit 2), not an OverflowError."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("x")
        info.pax_headers = dict(header)
        if kind == "dir":
            info.type = tarfile.DIRTYPE
        elif kind == "sym":
            info.type, info.linkname = tarfile.SYMTYPE, "y"
        elif kind == "chr":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        t.addfile(info, io.BytesIO(b"") if kind == "file" else None)
    with pytest.raises(UnsafeEntry, match="out of range"):
        unpack(buf.getvalue(), tmp_path / "r", allow_devices=True)
