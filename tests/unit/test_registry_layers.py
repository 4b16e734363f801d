"""Commit's overlay application, the OCI layers commit/push write and pull reads back,
zstd layers, the blob cache's pruning, and pull-tar's checksum parsing.

File-system tests on tmp_path (as root: whiteouts are 0/0 character devices,
overlay markers trusted.* xattrs)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import tarfile
from pathlib import Path

import pytest

from bootstrap import ociwrite
from bootstrap.blobcache import BlobCache
from bootstrap.oci import apply_layers
from bootstrap.pull import CacheLayout, layers_of
from bootstrap.urlpull import VerificationFailed, beside, check_url, expected_sha256
from machined.commit import Applier, Shift
from machined.errors import InvalidInput, PymachineError
from machined.paths import Paths
from tests.harness import skip_or_fail


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("whiteouts (device nodes) and trusted.* xattrs need root")


SHIFT = 0x80000


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(path: Path) -> None:
    os.setxattr(path, "trusted.overlay.opaque", b"y")


def tree(root: Path) -> dict[str, str]:
    """rel path -> 'd' / 'l:TARGET' / file content, for comparing trees."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "l:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "d"
            else:
                out[rel] = p.read_text()
    return out


def base_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/keep").write_text("keep")
    (root / "etc/change").write_text("old")
    (root / "etc/gone").write_text("gone")
    (root / "app/sub").mkdir(parents=True)
    (root / "app/sub/x").write_text("x")
    (root / "lib").mkdir()
    os.symlink("lib", root / "lib64")


def hardlinked_copy(base: Path, target: Path) -> None:
    os.system(f"cp -al {base} {target}")  # noqa: S605 (test paths)


@pytest.fixture
def layers(tmp_path):
    base, upper, new = tmp_path / "base", tmp_path / "upper", tmp_path / "new"
    base_tree(base)
    upper.mkdir()
    (upper / "etc").mkdir()
    (upper / "etc/change").write_text("new")
    whiteout(upper / "etc/gone")
    (upper / "app").mkdir()
    opaque(upper / "app")
    (upper / "app/only").write_text("only")
    (upper / "lib64").mkdir()  # a directory replacing the base's symlink
    (upper / "lib64/ld.so").write_text("ld")
    (upper / "data").mkdir()
    (upper / "data/f").write_text("mine")
    for p in (upper, upper / "etc", upper / "app", upper / "lib64", upper / "data"):
        os.chown(p, SHIFT, SHIFT)
    os.chown(upper / "data/f", SHIFT + 1000, SHIFT + 1000)
    os.chmod(upper / "data/f", 0o4750)
    os.chown(upper / "etc/change", SHIFT, SHIFT)
    hardlinked_copy(base, new)
    return base, upper, new


def test_the_upper_layer_applies_as_overlayfs_shows_it(layers, tmp_path):
    base, upper, new = layers
    before = tree(base)
    Applier(upper, new, Shift(SHIFT, 0x10000), None).run()
    assert tree(new) == {
        "etc": "d",
        "etc/keep": "keep",
        "etc/change": "new",
        "app": "d",
        "app/only": "only",
        "lib": "d",
        "lib64": "d",
        "lib64/ld.so": "ld",
        "data": "d",
        "data/f": "mine",
    }
    st = os.stat(new / "data/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o4750)
    assert os.stat(new / "etc/change").st_uid == 0
    # the base is as it was: the changed file replaced its hard link, never wrote through it
    assert tree(base) == before
    assert os.stat(new / "etc/keep").st_ino == os.stat(base / "etc/keep").st_ino


def test_ids_outside_the_range_become_nobody():
    shift = Shift(SHIFT, 0x10000)
    assert shift(SHIFT) == 0 and shift(SHIFT + 65535) == 65535
    assert shift(0) == 65534 and shift(SHIFT + 0x10000) == 65534
    assert Shift(0, 0x10000)(1234) == 1234  # PrivateUsers=no: ids are the image's


def test_device_nodes_are_left_out_and_overlay_redirects_refused(tmp_path):
    upper, new = tmp_path / "upper", tmp_path / "new"
    upper.mkdir()
    new.mkdir()
    os.mknod(upper / "sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    applier = Applier(upper, new, Shift(0, 0), None)
    applier.run()
    assert applier.skipped == ["sda"] and not (new / "sda").exists()
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", "trusted.overlay.redirect", b"/old")
    with pytest.raises(PymachineError, match="redirect"):
        Applier(upper, new, Shift(0, 0), None).run()


def test_the_change_layer_pull_reads_back_gives_the_same_tree(layers, tmp_path):
    """commit's OCI layer over the base's own layer == the committed directory."""
    base, upper, new = layers
    cache = BlobCache(Paths(tmp_path / "root"))
    written: list[ociwrite.WrittenLayer] = []
    with ociwrite.layer_stream(cache, written) as stream:
        from bootstrap.tarimport import write_tar

        write_tar(base, stream)
    with ociwrite.layer(cache, written) as tar:
        Applier(upper, new, Shift(SHIFT, 0x10000), tar).run()
    for w in written:
        data = cache.blob(w.digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == w.digest
    manifest = {"layers": [w.descriptor for w in written]}
    out = tmp_path / "out"
    out.mkdir()
    found, zstd = layers_of(manifest)
    apply_layers(CacheLayout(cache.root, zstd), found, out)
    assert tree(out) == tree(new)
    assert os.stat(out / "data/f").st_uid == 1000


def test_zstd_layers_are_read_and_their_digest_checked(tmp_path):
    import zstandard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("hello")
        info.size = 5
        t.addfile(info, io.BytesIO(b"world"))
    blob = zstandard.ZstdCompressor().compress(buf.getvalue())
    cache = BlobCache(Paths(tmp_path / "root"))
    digest = cache.put(blob)
    manifest = {
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                "digest": digest,
                "size": len(blob),
            }
        ]
    }
    out = tmp_path / "out"
    out.mkdir()
    found, zstd = layers_of(manifest)
    apply_layers(CacheLayout(cache.root, zstd), found, out)
    assert (out / "hello").read_text() == "world"
    # the same bytes under a digest they do not have: refused
    bad = cache.blob(digest)
    fake = "sha256:" + "0" * 64
    os.rename(bad, cache.blob(fake))
    manifest["layers"][0]["digest"] = fake
    found, zstd = layers_of(manifest)
    with pytest.raises(InvalidInput, match="corrupt"):
        apply_layers(CacheLayout(cache.root, zstd), found, tmp_path / "out")


def test_prune_keeps_what_a_root_reaches(tmp_path):
    cache = BlobCache(Paths(tmp_path / "root"))
    layer = cache.put(b"layer")
    config_a = ociwrite.put_image(cache, {"a": 1}, [{"digest": layer, "size": 5}])
    orphan_layer = cache.put(b"orphan")
    config_b = ociwrite.put_image(cache, {"b": 1}, [{"digest": orphan_layer, "size": 6}])
    cache.tag("handle", {"digest": config_b, "size": 1})
    kept = cache.reachable(config_a)
    assert layer in kept and len(kept) == 3
    (cache.root / "oci-put-blob123").write_bytes(b"half a download")  # a killed skopeo's
    removed, freed = cache.prune([config_a])
    assert removed == 4 and freed > 0  # b's manifest, config and layer, the leftover
    assert not (cache.root / "oci-put-blob123").exists()
    assert all(cache.has(d) for d in kept) and not cache.has(orphan_layer)
    assert json.loads((cache.root / "index.json").read_text())["manifests"] == []


def test_sha256sums_parsing():
    sums = f"{'a' * 64}  other.tar\n{'B' * 64} *rootfs.tar.xz\ngarbage line\n{'z' * 64}  zz.tar\n"
    assert expected_sha256(sums, "rootfs.tar.xz") == "b" * 64
    with pytest.raises(VerificationFailed):
        expected_sha256(sums, "zz.tar")  # not hex
    with pytest.raises(VerificationFailed):
        expected_sha256(sums, "missing.tar")
    assert beside("http://h/a/b/rootfs.tar.xz", "SHA256SUMS") == "http://h/a/b/SHA256SUMS"


@pytest.mark.parametrize(
    "url", ["ftp://h/x.tar", "file:///etc/passwd", "http:///x.tar", "http://h/", "/tmp/x.tar"]
)
def test_pull_tar_urls_are_checked(url):
    with pytest.raises(InvalidInput):
        check_url(url)


def test_random_upper_layers_apply_like_the_overlay_model(tmp_path):
    """Fuzz: random changes (modify, add, delete, replace a dir wholesale) as an
    overlay would record them, applied to a hard-linked copy, match a model —
    and the base never changes."""
    rng = random.Random(7)
    for round_ in range(25):
        work = tmp_path / f"r{round_}"
        base, upper, new = work / "base", work / "upper", work / "new"
        model: dict[str, str] = {}
        for d in ("a", "b", "a/c"):
            (base / d).mkdir(parents=True)
            model[d] = "d"
        for i in range(12):
            rel = f"{rng.choice(['a', 'b', 'a/c'])}/f{i}"
            (base / rel).write_text(f"base{i}")
            model[rel] = f"base{i}"
        before = tree(base)
        upper.mkdir()
        for _ in range(10):
            files = [k for k, v in model.items() if v != "d"]
            op = rng.choice(["modify", "add", "delete", "opaque"])
            if op in ("modify", "delete") and files:
                rel = rng.choice(files)
                (upper / rel).parent.mkdir(parents=True, exist_ok=True)
                if (upper / rel).exists() or (upper / rel).is_char_device():
                    os.unlink(upper / rel)
                if op == "modify":
                    (upper / rel).write_text(f"new-{rng.random()}")
                    model[rel] = (upper / rel).read_text()
                else:
                    whiteout(upper / rel)
                    del model[rel]
            elif op == "add":
                rel = f"{rng.choice(['a', 'b', 'a/c'])}/n{rng.randrange(100)}"
                if model.get(rel.rsplit("/", 1)[0]) != "d":
                    continue
                (upper / rel).parent.mkdir(parents=True, exist_ok=True)
                if (upper / rel).is_char_device():
                    os.unlink(upper / rel)
                (upper / rel).write_text("added")
                model[rel] = "added"
            else:
                if (upper / "a/c").exists():
                    continue
                (upper / "a/c").mkdir(parents=True)
                opaque(upper / "a/c")
                for k in [k for k in model if k.startswith("a/c/")]:
                    del model[k]
                (upper / "a/c/fresh").write_text("fresh")
                model["a/c/fresh"] = "fresh"
        hardlinked_copy(base, new)
        Applier(upper, new, Shift(0, 0), None).run()
        assert tree(new) == model, round_
        assert tree(base) == before
