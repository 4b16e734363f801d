"""Tar import/export: the path checks, refusals and an exact round trip."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from bootstrap.progress import Progress
from bootstrap.tarimport import (
    UnsafeEntry,
    export_tar,
    extract,
    import_tar,
    member_path,
    resolve_in_root,
    symlink_escapes,
)
from machined.errors import Conflict
from machined.images import ImageStore
from machined.paths import Paths

ROOT = os.geteuid() == 0


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


def make_tar(entries, compression: str = "") -> bytes:
    """entries: (name, kind, payload) with kind file|dir|sym|hard|chr|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=tarfile.PAX_FORMAT) as t:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            data = None
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else (payload or b"")
                info.size = len(data)
                info.mode = 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 1, 3, 0o666
            elif kind == "fifo":
                info.type, info.mode = tarfile.FIFOTYPE, 0o600
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def unpack(data: bytes, root: Path, **kw):
    root.mkdir(exist_ok=True)
    return extract(io.BufferedReader(io.BytesIO(data)), root, **kw)


# --- pure checks -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("etc/passwd", "etc/passwd"), ("./etc//x/", "etc/x"), (".", ""), ("./", ""), ("a/./b", "a/b")],
)
def test_member_path_normalises(name, expected):
    assert member_path(name) == expected


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/..", "./../etc"])
def test_member_path_refuses_escapes(name):
    with pytest.raises(UnsafeEntry):
        member_path(name)


@pytest.mark.parametrize(
    "link, target, escapes",
    [
        ("bin", "usr/bin", False),
        ("etc/localtime", "/usr/share/zoneinfo/UTC", False),
        ("usr/lib/x", "../../lib/y", False),
        ("usr/lib/x", "../../../etc/shadow", True),
        ("x", "..", True),
        ("a/b", "../../b", True),
        ("a/b", "/../etc", True),
        ("a/b", "", True),
        ("a/b", "./c/../d", False),
    ],
)
def test_symlink_escapes(link, target, escapes):
    assert symlink_escapes(link, target) is escapes


def test_resolve_in_root_follows_links_inside(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    os.symlink("usr/bin", tmp_path / "bin")
    os.symlink("/usr", tmp_path / "abs")
    os.symlink("/", tmp_path / "evil")  # "/" of the image, not of the host
    os.symlink("../../../../..", tmp_path / "usr/up")
    assert resolve_in_root(tmp_path, "bin/sh") == tmp_path / "usr/bin/sh"
    assert resolve_in_root(tmp_path, "abs/bin/sh") == tmp_path / "usr/bin/sh"
    assert resolve_in_root(tmp_path, "evil/etc/passwd", create=True) == tmp_path / "etc/passwd"
    assert resolve_in_root(tmp_path, "usr/up/tmp/x", create=True) == tmp_path / "tmp/x"
    assert resolve_in_root(tmp_path, "bin") == tmp_path / "bin"  # last component not followed


def test_resolve_in_root_symlink_loop(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(UnsafeEntry, match="too many levels"):
        resolve_in_root(tmp_path, "a/x")


# --- extraction ----------------------------------------------------------------


def test_extract_basic_tree(tmp_path):
    data = make_tar(
        [
            (".", "dir", None),
            ("usr", "dir", None),
            ("usr/bin", "dir", None),
            ("usr/bin/tool", "file", "#!/bin/sh\n"),
            ("bin", "sym", "usr/bin"),
            ("usr/bin/tool2", "hard", "usr/bin/tool"),
            ("etc/localtime", "sym", "/usr/share/zoneinfo/UTC"),
            ("run/fifo", "fifo", None),
        ]
    )
    stats = unpack(data, tmp_path / "r")
    r = tmp_path / "r"
    assert (r / "usr/bin/tool").read_text() == "#!/bin/sh\n"
    assert os.readlink(r / "bin") == "usr/bin"
    assert os.stat(r / "usr/bin/tool2").st_ino == os.stat(r / "usr/bin/tool").st_ino
    assert os.readlink(r / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert stat.S_ISFIFO(os.lstat(r / "run/fifo").st_mode)
    assert os.stat(r / "usr/bin/tool").st_mtime == 1_700_000_000
    assert stats.entries == 7


def test_extract_through_image_symlink_stays_inside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = make_tar([("lib", "sym", "/usr/lib"), ("lib/libx.so", "file", "x")])
    unpack(data, tmp_path / "r")
    assert (tmp_path / "r/usr/lib/libx.so").read_text() == "x"
    # An absolute link to the host's /tmp is the image's /tmp, not the host's.
    data = make_tar([("t", "sym", str(outside)), ("t/pwned", "file", "x")])
    unpack(data, tmp_path / "r2")
    assert not (outside / "pwned").exists()
    assert (tmp_path / "r2" / str(outside).lstrip("/") / "pwned").exists()


@pytest.mark.parametrize(
    "entries, message",
    [
        ([("../evil", "file", "x")], "'..'"),
        ([("/etc/evil", "file", "x")], "absolute"),
        ([("a/../../evil", "file", "x")], "'..'"),
        ([("link", "sym", "../../../etc")], "pointing outside"),
        ([("d", "dir", None), ("d/link", "sym", "../../x")], "pointing outside"),
        ([("h", "hard", "../../etc/passwd")], "'..'"),
        ([("h", "hard", "/etc/passwd")], "absolute"),
        ([("dev/null", "chr", None)], "device node"),
    ],
)
def test_extract_refusals(tmp_path, entries, message):
    with pytest.raises(UnsafeEntry, match=message):
        unpack(make_tar(entries), tmp_path / "r")
    assert not (tmp_path / "evil").exists()


@pytest.mark.skipif(not ROOT, reason="mknod needs root")
def test_devices_allowed_on_request(tmp_path):
    unpack(make_tar([("dev/null", "chr", None)]), tmp_path / "r", allow_devices=True)
    st = os.lstat(tmp_path / "r/dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_compressed_archives(tmp_path):
    for compression in ("gz", "bz2", "xz"):
        data = make_tar([("f", "file", compression)], compression)
        unpack(data, tmp_path / compression)
        assert (tmp_path / compression / "f").read_text() == compression


# --- verbs: import, export, round trip -------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    return ImageStore(Paths(tmp_path))


def manifest(root: Path) -> dict[str, tuple]:
    """Everything that must survive a round trip, per path."""
    out: dict[str, tuple] = {".": (stat.S_IMODE(os.lstat(root).st_mode),)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry: tuple = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                entry += (digest, int(st.st_mtime), st.st_nlink)
            elif stat.S_ISDIR(st.st_mode):
                entry += (int(st.st_mtime),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry += (st.st_rdev,)
            xattrs = sorted(
                (x, os.getxattr(path, x, follow_symlinks=False))
                for x in os.listxattr(path, follow_symlinks=False)
            )
            entry += (tuple(xattrs),)
            out[os.path.relpath(path, root)] = entry
    return out


def build_tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/bin/tool").write_bytes(os.urandom(3000))
    os.chmod(root / "usr/bin/tool", 0o4755)  # setuid survives
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/etc/hostname", root / "usr/hostname-link")
    (root / "etc/hostname").write_text("x\n")
    (root / "etc/secret").write_text("s")
    os.chmod(root / "etc/secret", 0o600)
    (root / "ro").mkdir()
    (root / "ro/file").write_text("f")
    os.chmod(root / "ro", 0o555)
    os.mkfifo(root / "fifo")
    (root / "empty").write_bytes(b"")
    if ROOT:
        os.chown(root / "etc/secret", 1234, 5678)
    with contextlib.suppress(OSError):  # file systems without user xattrs
        os.setxattr(root / "etc/hostname", "user.pymachine", b"\x00\xffvalue")


def test_tar_round_trip_is_identical(store, tmp_path):
    with store.staging("src") as tmp:
        build_tree(tmp)
        store.commit("src", tmp)
    archive = tmp_path / "src.tar.gz"
    export_tar("src", archive, store=store, progress=quiet())
    import_tar(archive, "copy", store=store, progress=quiet())
    assert manifest(store.path("copy")) == manifest(store.path("src"))
    assert store.info("copy").source == f"tar {archive}"


def test_import_refused_leaves_no_image(store, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(make_tar([("ok", "file", "x"), ("../../escape", "file", "x")]))
    with pytest.raises(UnsafeEntry):
        import_tar(bad, "bad", store=store, progress=quiet())
    assert not store.exists("bad")
    assert list(store.directory.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_import_onto_existing_conflicts(store, tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(make_tar([("f", "file", "x")]))
    import_tar(good, "img", store=store, progress=quiet())
    with pytest.raises(Conflict):
        import_tar(good, "img", store=store, progress=quiet())


def test_not_a_tar(store, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    from machined.errors import InvalidInput

    with pytest.raises(InvalidInput):
        import_tar(junk, "junk", store=store, progress=quiet())
    assert not store.exists("junk")


def test_cli_export_import_via_pipe(store, tmp_path):
    import subprocess
    import sys

    with store.staging("src") as tmp:
        build_tree(tmp)
        store.commit("src", tmp)
    env = {**os.environ, "PYMACHINE_ROOT": str(tmp_path)}
    cli = [sys.executable, "-m", "machined"]
    export = subprocess.Popen([*cli, "export-tar", "src", "-"], stdout=subprocess.PIPE, env=env)
    imported = subprocess.run(
        [*cli, "import-tar", "-", "piped"], stdin=export.stdout, env=env, capture_output=True
    )
    export.stdout.close()
    assert export.wait() == 0
    assert imported.returncode == 0, imported.stderr
    assert manifest(store.path("piped")) == manifest(store.path("src"))
