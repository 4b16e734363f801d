"""Images in a real systemd host (tier 1): bootstrap, machines from images, tar/OCI, refusals.

The Debian bootstrap talks to Debian's archive (deb.debian.org) once; its
packages are cached in the persistent test cache (``/var/cache/pymachine`` in
the host is ``/var/cache/pymachine-tests`` on the machine), so later runs
download nothing.
"""

from __future__ import annotations

import json
import os
import tarfile
import uuid

import pytest

from tests.unit.test_bootstrap_oci import BASE, CONFIG, TOP, LayoutBuilder
from tests.unit.test_bootstrap_tar import build_tree, make_tar, manifest

LOOP = ("/bin/sh", "-c", "while :; do sleep 1; done")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def images(host) -> dict[str, dict]:
    return {i["name"]: i for i in json.loads(host.pymachine("images", "--json").stdout)}


def machine_dirs(host) -> list[str]:
    return sorted(os.listdir(host.host_path("/var/lib/machines")))


def test_busybox_bootstrap_lists_and_runs(systemd_host):
    name = unique("bb")
    systemd_host.pymachine("bootstrap", "--distro", "busybox", name)
    try:
        info = images(systemd_host)[name]
        assert info["size"] > 500_000 and info["used_by"] == [] and info["source"] == "busybox"
        table = systemd_host.pymachine("images").stdout.splitlines()
        assert table[0].split() == ["NAME", "SIZE", "CREATED", "USED-BY"]
        # machinectl sees pymachine's images too.
        assert name in systemd_host.run(["machinectl", "list-images", "--no-legend"]).stdout
        out = systemd_host.run(
            [
                "chroot",
                f"/var/lib/machines/{name}",
                "/usr/bin/env",
                "-i",
                "/bin/sh",
                "-c",
                "cat /etc/os-release",
            ]
        ).stdout
        assert "ID=busybox" in out
    finally:
        systemd_host.pymachine("image", "remove", name, check=False)
    assert name not in images(systemd_host)


def test_debian_bootstrap_and_machine_runs_env(systemd_host, debian_image):
    root = systemd_host.host_path(f"/var/lib/machines/{debian_image}")
    assert "ID=debian" in (root / "etc/os-release").read_text()
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/hostname").read_text().strip() == debian_image
    assert not any((root / "var/cache/apt/archives").glob("*.deb"))  # no cache in the image
    info = images(systemd_host)[debian_image]
    assert info["source"] == "debian bookworm minbase"

    name = unique("deb")
    systemd_host.pymachine(
        "create", name, "--image", debian_image, "--network", "none", "--", *LOOP
    )
    try:
        systemd_host.pymachine("start", name)
        assert images(systemd_host)[debian_image]["used_by"] == [name]
        env = systemd_host.pymachine("exec", name, "--", "/usr/bin/env").stdout
        assert "PATH=" in env
        out = systemd_host.pymachine("exec", name, "--", "/bin/cat", "/etc/debian_version").stdout
        assert out.strip().startswith("12")
        # The machine writes to its own layer; the image stays untouched.
        systemd_host.pymachine("exec", name, "--", "/bin/sh", "-c", "echo x > /etc/written")
        assert not (root / "etc/written").exists()
    finally:
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)


def test_image_remove_refused_while_in_use(systemd_host):
    image = unique("inuse")
    systemd_host.pymachine("bootstrap", "--distro", "busybox", image)
    name = unique("user")
    systemd_host.pymachine("create", name, "--image", image, "--network", "none", "--", *LOOP)
    try:
        systemd_host.pymachine("start", name)
        refused = systemd_host.pymachine("image", "remove", image, check=False)
        assert refused.returncode == 5, refused
        assert f"used by machine(s): {name}" in refused.stderr
        assert images(systemd_host)[image]["used_by"] == [name]
        assert (
            systemd_host.pymachine("image", "rename", image, "x" + image, check=False).returncode
            == 5
        )
        systemd_host.pymachine("stop", name)
        assert systemd_host.pymachine("image", "remove", image, check=False).returncode == 5
    finally:
        systemd_host.pymachine("stop", name, check=False)
        systemd_host.pymachine("remove", name, check=False)
    systemd_host.pymachine("image", "remove", image)
    assert image not in images(systemd_host)


def test_tar_round_trip_in_host(systemd_host, tmp_path):
    src = unique("tarsrc")
    systemd_host.pymachine("bootstrap", "--distro", "busybox", src)
    copy = unique("tarcopy")
    try:
        # Add the awkward cases to the image: setuid, hard links, read-only dir, fifo, xattr.
        build_tree(systemd_host.host_path(f"/var/lib/machines/{src}/extra"))
        archive = "/tmp/" + unique("rt") + ".tar.xz"
        systemd_host.pymachine("export-tar", src, archive)
        systemd_host.pymachine("import-tar", archive, copy)
        a = manifest(systemd_host.host_path(f"/var/lib/machines/{src}"))
        b = manifest(systemd_host.host_path(f"/var/lib/machines/{copy}"))
        assert a == b
        # And through a pipe.
        piped = unique("tarpipe")
        systemd_host.run(
            [
                "sh",
                "-c",
                f"python3 -m machined export-tar {src} - | python3 -m machined import-tar - {piped}",
            ]
        )
        assert manifest(systemd_host.host_path(f"/var/lib/machines/{piped}")) == a
        systemd_host.pymachine("image", "remove", piped)
    finally:
        systemd_host.pymachine("image", "remove", src, copy, check=False)


@pytest.mark.parametrize(
    "entries",
    [
        [("../../../tmp/escaped", "file", "x")],
        [("/tmp/escaped", "file", "x")],
        [("link", "sym", "../../../../tmp"), ("ok", "file", "x")],
        [("dev/evil", "chr", None)],
        [("d", "sym", "/nonexistent"), ("h", "hard", "d/x")],  # issue 15.11: was a traceback
        [("d", "sym", "."), ("d/l", "sym", "../tmp")],  # issue 15: out from where it lands
    ],
    ids=["dotdot", "absolute", "symlink-out", "device", "hardlink-via-link", "symlink-via-link"],
)
def test_tar_import_refusals_in_host(systemd_host, entries):
    archive = "/tmp/" + unique("evil") + ".tar"
    systemd_host.host_path(archive).write_bytes(make_tar(entries))
    name = unique("evil")
    before = machine_dirs(systemd_host)
    result = systemd_host.pymachine("import-tar", archive, name, check=False)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("pymachine: refusing")
    assert machine_dirs(systemd_host) == before
    assert not systemd_host.host_path("/tmp/escaped").exists()


def test_device_nodes_on_request(systemd_host):
    archive = "/tmp/" + unique("dev") + ".tar"
    systemd_host.host_path(archive).write_bytes(make_tar([("dev/null", "chr", None)]))
    name = unique("dev")
    systemd_host.pymachine("import-tar", "--allow-devices", archive, name)
    out = systemd_host.run(["stat", "-c", "%F %t:%T", f"/var/lib/machines/{name}/dev/null"]).stdout
    assert out.strip() == "character special file 1:3"
    systemd_host.pymachine("image", "remove", name)


def test_oci_import_with_whiteouts_in_host(systemd_host):
    layout = systemd_host.host_path("/tmp/" + unique("oci"))
    b = LayoutBuilder(layout)
    b.index([b.image([BASE, TOP], CONFIG)])
    archive = f"{layout}.tar"
    with tarfile.open(archive, "w") as t:
        t.add(layout, arcname=".")
    inner = "/" + os.path.relpath(archive, systemd_host.host_path("/"))
    name = unique("oci")
    systemd_host.pymachine("import-oci", inner, name)
    try:
        root = systemd_host.host_path(f"/var/lib/machines/{name}")
        assert not (root / "etc/remove-me").exists()
        assert sorted(os.listdir(root / "var/cache")) == ["new"]
        assert not (root / "opt/dir").exists()
        assert (root / "usr/bin/app").read_text() == "v2"
        shown = json.loads(systemd_host.pymachine("image", "show", name, "--json").stdout)
        assert shown["config"]["entrypoint"] == ["/usr/bin/app"]
        assert shown["config"]["cmd"] == ["--serve", "8080"]
        assert shown["config"]["working_directory"] == "/srv"
    finally:
        systemd_host.pymachine("image", "remove", name, check=False)


def test_interrupted_bootstrap_leaves_nothing(systemd_host, debian_image):
    """SIGTERM in the middle of a (cached) Debian bootstrap: no image, no temp dir, no mounts."""
    name = unique("interrupted")
    before = machine_dirs(systemd_host)
    script = (
        f"python3 -m machined bootstrap --distro debian {name} >/tmp/{name}.log 2>&1 & pid=$!; "
        "sleep 6; kill -TERM $pid; wait $pid; echo rc=$?"
    )
    out = systemd_host.run(["sh", "-c", script], timeout=300).stdout
    assert "rc=" in out and "rc=0" not in out, out
    assert machine_dirs(systemd_host) == before
    mounts = systemd_host.run(["cat", "/proc/self/mountinfo"]).stdout
    assert "/var/lib/machines/.#" not in mounts
    assert name not in images(systemd_host)


def test_image_rename_and_clone_in_host(systemd_host):
    a, b, c = unique("ra"), unique("rb"), unique("rc")
    systemd_host.pymachine("bootstrap", "--distro", "busybox", a)
    systemd_host.pymachine("image", "rename", a, b)
    systemd_host.pymachine("image", "clone", b, c)
    listed = images(systemd_host)
    assert a not in listed and b in listed and c in listed
    assert listed[c]["source"] == f"clone of {b}"
    systemd_host.pymachine("image", "remove", b, c)
