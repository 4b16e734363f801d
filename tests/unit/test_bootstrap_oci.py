"""OCI import: layouts built here (tar + sha256 + JSON), whiteouts, opaque dirs, config."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from bootstrap.oci import choose_manifest, import_oci
from bootstrap.progress import Progress
from machined.errors import InvalidInput
from machined.images import ImageStore
from machined.paths import Paths


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


def layer(entries, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif isinstance(content, tuple):  # ("sym", target)
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                t.addfile(info)
            else:
                data = content.encode()
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw) if gz else raw


class LayoutBuilder:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs/sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs/sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def image(self, layers: list[bytes], config: dict, platform: dict | None = None) -> dict:
        config_desc = self.blob(
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": config,
                    "rootfs": {"type": "layers", "diff_ids": []},
                }
            ).encode(),
            "application/vnd.oci.image.config.v1+json",
        )
        layer_descs = [
            self.blob(
                data,
                "application/vnd.oci.image.layer.v1.tar+gzip"
                if data[:2] == b"\x1f\x8b"
                else "application/vnd.oci.image.layer.v1.tar",
            )
            for data in layers
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layer_descs,
        }
        desc = self.blob(json.dumps(manifest).encode(), manifest["mediaType"])
        if platform:
            desc["platform"] = platform
        return desc

    def index(self, manifests: list[dict]) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": manifests})
        )


BASE = layer(
    [
        ("etc", None),
        ("etc/os-release", "ID=test\n"),
        ("etc/keep", "keep"),
        ("etc/remove-me", "gone"),
        ("var", None),
        ("var/cache", None),
        ("var/cache/a", "a"),
        ("var/cache/sub", None),
        ("var/cache/sub/b", "b"),
        ("opt", None),
        ("opt/dir", None),
        ("opt/dir/file", "x"),
        ("bin", ("sym", "usr/bin")),
        ("usr", None),
        ("usr/bin", None),
        ("usr/bin/app", "v1"),
    ]
)
TOP = layer(
    [
        ("etc/.wh.remove-me", ""),
        ("var/cache/new", "new"),  # before the opaque marker: must survive it
        ("var/cache/.wh..wh..opq", ""),
        ("opt/.wh.dir", ""),
        ("bin/app", "v2"),  # through the image's bin -> usr/bin symlink
        ("etc/added", "added"),
    ],
    gz=False,
)
CONFIG = {
    "Entrypoint": ["/usr/bin/app"],
    "Cmd": ["--serve", "8080"],
    "Env": ["PATH=/usr/bin:/bin", "MODE=prod"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path / "root"))
    return ImageStore(Paths(tmp_path / "root"))


def check_image(store: ImageStore, name: str) -> None:
    root = store.path(name)
    assert (root / "etc/keep").read_text() == "keep"
    assert not (root / "etc/remove-me").exists()
    assert (root / "etc/added").read_text() == "added"
    assert sorted(os.listdir(root / "var/cache")) == ["new"]
    assert (root / "opt").is_dir() and not (root / "opt/dir").exists()
    assert (root / "usr/bin/app").read_text() == "v2"
    assert os.readlink(root / "bin") == "usr/bin"
    assert not any(".wh." in n for _, d, f in os.walk(root) for n in d + f)
    config = store.config(name)
    assert config.command == ["/usr/bin/app", "--serve", "8080"]
    assert config.environment_dict == {"PATH": "/usr/bin:/bin", "MODE": "prod"}
    assert config.working_directory == "/srv"
    assert config.user == "1000:1000"


def test_import_oci_directory_with_whiteouts(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    b.index([b.image([BASE, TOP], CONFIG)])
    import_oci(tmp_path / "layout", "app", store=store, progress=quiet())
    check_image(store, "app")
    assert store.info("app").source.startswith("oci sha256:")


def test_import_oci_archive(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    b.index([b.image([BASE, TOP], CONFIG)])
    archive = tmp_path / "app.oci.tar"
    with tarfile.open(archive, "w") as t:
        t.add(tmp_path / "layout", arcname=".")
    import_oci(archive, "app", store=store, progress=quiet())
    check_image(store, "app")


def test_opaque_marker_first_keeps_layer_entries(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    top = layer([("var/cache/.wh..wh..opq", ""), ("var/cache/new", "new")])
    b.index([b.image([BASE, top], {})])
    import_oci(tmp_path / "layout", "o", store=store, progress=quiet())
    assert sorted(os.listdir(store.path("o") / "var/cache")) == ["new"]
    assert store.config("o").command == []


def test_platform_choice_and_nested_index(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    amd = b.image([BASE], {"Cmd": ["amd"]}, {"os": "linux", "architecture": "amd64"})
    arm = b.image([BASE], {"Cmd": ["arm"]}, {"os": "linux", "architecture": "arm64"})
    nested = b.blob(
        json.dumps({"schemaVersion": 2, "manifests": [arm, amd]}).encode(),
        "application/vnd.oci.image.index.v1+json",
    )
    b.index([nested])
    import_oci(tmp_path / "layout", "a", store=store, platform="linux/amd64", progress=quiet())
    assert store.config("a").cmd == ("amd",)
    import_oci(tmp_path / "layout", "b", store=store, platform="linux/arm64", progress=quiet())
    assert store.config("b").cmd == ("arm",)
    with pytest.raises(InvalidInput, match="no manifest for linux/s390x"):
        import_oci(tmp_path / "layout", "c", store=store, platform="linux/s390x", progress=quiet())


def test_choose_manifest_single_without_platform():
    assert choose_manifest([{"digest": "sha256:aa"}], None) == {"digest": "sha256:aa"}


def test_corrupt_blob_is_refused_and_leaves_nothing(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    desc = b.image([BASE, TOP], CONFIG)
    b.index([desc])
    manifest = json.loads((b.root / "blobs/sha256" / desc["digest"].split(":")[1]).read_text())
    victim = b.root / "blobs/sha256" / manifest["layers"][1]["digest"].split(":")[1]
    victim.write_bytes(layer([("etc/added", "tampered")], gz=False))
    with pytest.raises(InvalidInput, match="corrupt"):
        import_oci(tmp_path / "layout", "bad", store=store, progress=quiet())
    assert not store.exists("bad")
    assert [p for p in store.directory.iterdir()] == []


def test_escaping_layer_is_refused(store, tmp_path):
    b = LayoutBuilder(tmp_path / "layout")
    b.index([b.image([layer([("../../evil", "x")])], {})])
    with pytest.raises(InvalidInput, match="'..'"):
        import_oci(tmp_path / "layout", "evil", store=store, progress=quiet())
    assert not store.exists("evil")


def test_docker_save_archive(store, tmp_path):
    d = tmp_path / "docker"
    d.mkdir()
    (d / "l1").mkdir()
    (d / "l1/layer.tar").write_bytes(layer([("etc", None), ("etc/a", "1")], gz=False))
    (d / "l2").mkdir()
    (d / "l2/layer.tar").write_bytes(layer([("etc/.wh.a", ""), ("etc/b", "2")], gz=False))
    (d / "cfg.json").write_text(json.dumps({"config": {"Cmd": ["/bin/sh"]}}))
    (d / "manifest.json").write_text(
        json.dumps(
            [
                {
                    "Config": "cfg.json",
                    "RepoTags": ["x:1"],
                    "Layers": ["l1/layer.tar", "l2/layer.tar"],
                }
            ]
        )
    )
    archive = tmp_path / "docker.tar"
    with tarfile.open(archive, "w") as t:
        t.add(d, arcname=".")
    import_oci(archive, "dk", store=store, progress=quiet())
    assert sorted(os.listdir(store.path("dk") / "etc")) == ["b"]
    assert store.config("dk").cmd == ("/bin/sh",)


def test_not_a_layout(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="neither an OCI layout"):
        import_oci(tmp_path / "empty", "x", store=store, progress=quiet())
    with pytest.raises(InvalidInput, match="no such"):
        import_oci(tmp_path / "missing", "x", store=store, progress=quiet())


def test_cli_import_oci_and_show(store, tmp_path, capsys):
    from machined.cli import main

    b = LayoutBuilder(tmp_path / "layout")
    b.index([b.image([BASE, TOP], CONFIG)])
    assert main(["import-oci", str(tmp_path / "layout"), "cliapp"]) == 0
    assert main(["image", "show", "cliapp", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["entrypoint"] == ["/usr/bin/app"]
    assert shown["config"]["cmd"] == ["--serve", "8080"]
