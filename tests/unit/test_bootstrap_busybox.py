"""The offline busybox bootstrap, built for real from the host's busybox-static."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from bootstrap.distributions import BootstrapConfig, Distribution
from bootstrap.distributions.busybox import applet_paths, find_busybox, is_static_elf
from bootstrap.progress import Progress
from machined.images import ImageStore
from machined.paths import Paths


def _busybox_or_skip():
    try:
        return find_busybox()
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        print(f"skipping: {exc}")
        pytest.skip(str(exc))


def test_applet_paths_drop_unsafe_and_top_level():
    listing = "usr/bin/[\nsbin/ip\n../etc/x\nlinuxrc\n/bin/ls\n\n"
    assert applet_paths(listing) == ["usr/bin/[", "sbin/ip", "bin/ls"]


def test_is_static_elf(tmp_path):
    assert not is_static_elf(sys.executable) or "static" in sys.executable
    (tmp_path / "x").write_text("#!/bin/sh\n")
    assert not is_static_elf(tmp_path / "x")


def test_busybox_image(tmp_path, monkeypatch):
    _busybox_or_skip()
    from bootstrap.build import bootstrap_image

    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    store = ImageStore(Paths(tmp_path))
    progress = Progress(io.StringIO(), tty=False)
    path = bootstrap_image(
        "bb", BootstrapConfig(Distribution.busybox), store=store, progress=progress
    )
    assert path == tmp_path / "var/lib/machines/bb"
    assert os.readlink(path / "bin/sh") in ("busybox", "/bin/busybox")
    assert (path / "bin/busybox").stat().st_mode & 0o111
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "var", "root", "home"):
        assert (path / d).is_dir(), d
    assert (path / "etc/machine-id").read_text() == ""
    assert (path / "etc/hostname").read_text() == "bb\n"
    assert "127.0.1.1\tbb" in (path / "etc/hosts").read_text()
    assert "ID=busybox" in (path / "etc/os-release").read_text().splitlines()
    assert (path / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert (path / "etc/group").read_text().startswith("root:x:0:")
    assert os.readlink(path / "bin/ls") == "/bin/busybox"
    assert (path / "sbin").is_dir()
    assert store.info("bb").source == "busybox"
    # Nothing else was left in the store.
    assert sorted(os.listdir(tmp_path / "var/lib/machines")) == ["bb"]
    if os.geteuid() == 0:
        out = subprocess.run(
            ["chroot", str(path), "/bin/sh", "-c", "echo hello; /usr/bin/env true && echo ok"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out == "hello\nok\n"


def test_cli_bootstrap_busybox_and_images(tmp_path, monkeypatch, capsys):
    _busybox_or_skip()
    from machined.cli import main

    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    assert main(["bootstrap", "--distro", "busybox", "tiny"]) == 0
    assert main(["images"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "SIZE", "CREATED", "USED-BY"]
    assert out.splitlines()[1].startswith("tiny ")
    assert main(["bootstrap", "--distro", "busybox", "tiny"]) == 5  # exists: conflict
    assert main(["image", "rename", "tiny", "small"]) == 0
    assert main(["image", "clone", "small", "small2"]) == 0
    assert main(["image", "remove", "small", "small2"]) == 0
    assert main(["images", "--json"]) == 0
    assert capsys.readouterr().out.strip().endswith("[]")
