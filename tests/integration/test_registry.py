"""Images from registries and URLs, against real parts (tier 1).

A throwaway systemd host with a network namespace of its own runs Debian's
``docker-registry`` on its loopback twice (open on :5000, htpasswd/bcrypt
basic auth on :5001) as transient units; images are built with ``umoci`` and
pushed with ``skopeo copy`` (a multi-platform index, a zstd image, a Docker v2
image, and a hand-made hostile layer among them). pymachine pulls them and
runs them; what ``pymachine push`` writes is read back by skopeo and podman.
URL pulls come from ``python3 -m http.server`` in the same namespace, with a
SHA256SUMS signed by a throwaway GnuPG key.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import skip_or_fail
from tests.harness.systemd_host import SystemdHost, private_network_host
from tests.unit.test_bootstrap_oci import LayoutBuilder

PLAIN = "127.0.0.1:5000"
AUTHED = "127.0.0.1:5001"
USER, PASSWORD = "alice", "s3cret-pw"
SRV = "/srv/pymtest-registry"  # in the host
BUSYBOX_APPLETS = ("sh", "echo", "cat", "sleep", "true", "ls", "test")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- the registries -------------------------------------------------------------------


def registry_config(port: int, data: str, htpasswd: str | None) -> str:
    auth = f"auth:\n  htpasswd:\n    realm: pymtest\n    path: {htpasswd}\n" if htpasswd else ""
    return (
        "version: 0.1\nlog:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )


def start_registry(host: SystemdHost, port: int, htpasswd: str | None) -> str:
    unit = f"pymtest-registry-{port}"
    data = f"{SRV}/data-{port}"
    host.run(["mkdir", "-p", data])
    config = host.host_path(f"{SRV}/registry-{port}.yml")
    config.write_text(registry_config(port, data, htpasswd))
    host.run(
        [
            "systemd-run",
            f"--unit={unit}",
            "--",
            "docker-registry",
            "serve",
            f"{SRV}/registry-{port}.yml",
        ]
    )
    wait = (
        "import socket,time\n"
        "for _ in range(200):\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1',{port}),1).close(); break\n"
        "    except OSError: time.sleep(0.05)\n"
        "else: raise SystemExit('registry did not come up')\n"
    )
    host.run(["python3", "-c", wait])
    return unit


def skopeo_in(host: SystemdHost, *args: str, check: bool = True):
    return host.run(["skopeo", *args], check=check, timeout=300)


def push_layout(host: SystemdHost, layout: str, tag: str, dest: str, *extra: str) -> None:
    """skopeo copy of an OCI layout (in-host path) into the open registry."""
    skopeo_in(
        host,
        "copy",
        "--dest-tls-verify=false",
        *extra,
        f"oci:{layout}:{tag}",
        f"docker://{PLAIN}/{dest}",
    )


# --- images built with umoci -----------------------------------------------------------


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True)


def busybox_tree(rootfs: Path, marker: str) -> None:
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", rootfs / "bin" / applet)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc/marker").write_text(marker)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    (rootfs / "hello").write_text("from the base layer\n")


def build_images(layout: Path, scratch: Path) -> dict[str, str]:
    """An OCI layout with tags base, app (base + a layer), arm (fake arm64), multi (index)."""
    image = str(layout)
    umoci("init", "--layout", image)
    umoci("new", "--image", f"{image}:base")
    umoci("unpack", "--image", f"{image}:base", str(scratch / "b1"))
    busybox_tree(scratch / "b1/rootfs", "amd64")
    umoci("repack", "--image", f"{image}:base", str(scratch / "b1"))
    umoci(
        "config", "--image", f"{image}:base", "--architecture", "amd64",
        "--config.cmd", "/bin/sh", "--config.cmd", "-c",
        "--config.cmd", "echo hello from $GREETING in $(pwd)",
        "--config.env", "GREETING=the-registry", "--config.workingdir", "/etc",
        "--config.exposedports", "80/tcp", "--config.stopsignal", "SIGINT",
    )  # fmt: skip
    # app: the base plus one layer that adds /app/hello and deletes /hello (a whiteout)
    umoci("unpack", "--image", f"{image}:base", str(scratch / "b2"))
    (scratch / "b2/rootfs/app").mkdir()
    (scratch / "b2/rootfs/app/hello").write_text("from the app layer\n")
    (scratch / "b2/rootfs/hello").unlink()
    umoci("repack", "--image", f"{image}:app", str(scratch / "b2"))
    # arm: a foreign image we only extract, never run
    umoci("new", "--image", f"{image}:arm")
    umoci("unpack", "--image", f"{image}:arm", str(scratch / "b3"))
    busybox_tree(scratch / "b3/rootfs", "arm64")
    umoci("repack", "--image", f"{image}:arm", str(scratch / "b3"))
    umoci(
        "config", "--image", f"{image}:arm", "--architecture", "arm64", "--config.cmd", "/bin/true"
    )
    # zs: content of its own, for the zstd image
    umoci("new", "--image", f"{image}:zs")
    umoci("unpack", "--image", f"{image}:zs", str(scratch / "b4"))
    busybox_tree(scratch / "b4/rootfs", "zstd")
    umoci("repack", "--image", f"{image}:zs", str(scratch / "b4"))
    umoci("config", "--image", f"{image}:zs", "--architecture", "amd64")
    # multi: an image index of the two platforms (written as the layout's own index.json entry)
    index = json.loads((layout / "index.json").read_text())
    by_tag = {d["annotations"]["org.opencontainers.image.ref.name"]: d for d in index["manifests"]}

    def entry(tag: str, arch: str) -> dict:
        d = {k: v for k, v in by_tag[tag].items() if k != "annotations"}
        return {**d, "platform": {"os": "linux", "architecture": arch}}

    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [entry("base", "amd64"), entry("arm", "arm64")],
        }
    ).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": f"sha256:{digest}",
            "size": len(data),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }
    )
    (layout / "index.json").write_text(json.dumps(index))
    return {d: d for d in ("base", "app", "arm", "multi")}


def tar_bytes(entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def hostile_layout(path: Path) -> None:
    """A layout whose one layer tries to write above the image root."""
    builder = LayoutBuilder(path)
    desc = builder.image(
        [tar_bytes([("etc", None), ("../../escaped", b"pwned\n")])], {"Cmd": ["/x"]}
    )
    desc["annotations"] = {"org.opencontainers.image.ref.name": "evil"}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> SystemdHost:
    from tests.harness import require_tier1

    require_tier1()
    for tool in ("skopeo", "umoci", "docker-registry", "htpasswd"):
        if not shutil.which(tool):
            skip_or_fail(f"{tool} is not installed (dev/setup installs it)")
    with private_network_host(tmp_path_factory.mktemp("registry-host"), "pymreg") as host:
        host.run(["mkdir", "-p", SRV])
        srv = host.host_path(SRV)
        hashed = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
        ).stdout
        (srv / "htpasswd").write_text(hashed)
        start_registry(host, 5000, None)
        start_registry(host, 5001, f"{SRV}/htpasswd")
        build_images(srv / "layout", tmp_path_factory.mktemp("bundles"))
        for tag in ("base", "app", "arm"):
            push_layout(host, f"{SRV}/layout", tag, f"team/{tag}:1")
        push_layout(host, f"{SRV}/layout", "multi", "team/multi:1", "--all")
        # zstd: a layer of its own (skopeo would reuse a gzip blob of the same content),
        # decompressed to a dir: layout and compressed again with zstd on the way up
        skopeo_in(host, "copy", "--dest-decompress", f"oci:{SRV}/layout:zs", f"dir:{SRV}/zs-dir")
        skopeo_in(host, "copy", "--dest-tls-verify=false", "--dest-compress", "--dest-compress-format",
                  "zstd", f"dir:{SRV}/zs-dir", f"docker://{PLAIN}/team/zstd:1")  # fmt: skip
        push_layout(host, f"{SRV}/layout", "base", "team/docker:1", "--format", "v2s2")
        skopeo_in(
            host, "copy", "--dest-tls-verify=false", f"--dest-creds={USER}:{PASSWORD}",
            f"oci:{SRV}/layout:base", f"docker://{AUTHED}/private/base:1",
        )  # fmt: skip
        hostile_layout(srv / "evil")
        push_layout(host, f"{SRV}/evil", "evil", "team/evil:1")
        yield host


def pm(host: SystemdHost, *args: str, **kw):
    return host.pymachine(*args, check=False, timeout=300, **kw)


def images(host: SystemdHost) -> dict[str, dict]:
    return {i["name"]: i for i in json.loads(host.pymachine("images", "--json").stdout)}


def store_entries(host: SystemdHost) -> list[str]:
    return sorted(os.listdir(host.host_path("/var/lib/machines")))


def blob_requests(host: SystemdHost, port: int = 5000) -> list[str]:
    """The blob digests the registry served so far (from its access log in the journal).

    The registry logs a request after answering it: a sentinel request made
    now, once it shows in the journal, means every earlier one shows too."""
    sentinel = f"/v2/pymtest-sentinel-{uuid.uuid4().hex[:8]}/tags/list"
    host.run(["python3", "-c", "import sys, urllib.request\ntry: urllib.request.urlopen(sys.argv[1])\nexcept Exception: pass",
              f"http://127.0.0.1:{port}{sentinel}"])  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        log = host.journal(f"pymtest-registry-{port}.service", lines=100000)
        if sentinel in log or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    found = []
    for line in log.splitlines():
        if '"GET /v2/' in line and "/blobs/sha256:" in line:
            found.append(line.split("/blobs/")[1].split()[0])
    return found


def run_image(host: SystemdHost, image: str) -> str:
    machine = unique("m")
    host.pymachine("create", machine, "--image", image, "--network", "none")
    try:
        return host.pymachine("run", machine, timeout=120).stdout
    finally:
        pm(host, "remove", machine)


# --- pull -----------------------------------------------------------------------------


def test_pull_runs_at_once_and_a_second_pull_downloads_nothing(host):
    ref = f"{PLAIN}/team/base:1"
    out = host.pymachine("pull", "--tls-verify=false", ref, timeout=300)
    assert "1 to download" in out.stdout + out.stderr
    info = images(host)["base"]
    origin = info["origin"]
    assert origin["reference"] == ref and origin["digest"].startswith("sha256:")
    assert origin["platform"] == "linux/amd64" and origin["pulled_at"] > 0
    shown = json.loads(host.pymachine("image", "show", "base", "--json").stdout)
    assert shown["origin"] == origin
    assert (
        shown["config"]["exposed_ports"] == ["80/tcp"]
        and shown["config"]["stop_signal"] == "SIGINT"
    )
    # runnable at once: the image's Cmd, Env and WorkingDir are the machine's defaults
    assert "hello from the-registry in /etc" in run_image(host, "base")
    served = len(blob_requests(host))
    again = host.pymachine("pull", "--tls-verify=false", ref, timeout=300)
    assert "up to date" in again.stdout + again.stderr and "nothing downloaded" in again.stderr
    assert len(blob_requests(host)) == served
    assert images(host)["base"]["origin"] == origin


def test_second_image_on_the_same_base_downloads_only_its_new_layer(host):
    if "base" not in images(host):
        host.pymachine("pull", "--tls-verify=false", f"{PLAIN}/team/base:1", timeout=300)
    base_layer = json.loads(
        skopeo_in(
            host, "inspect", "--raw", "--tls-verify=false", f"docker://{PLAIN}/team/base:1"
        ).stdout
    )["layers"][0]["digest"]
    before = len(blob_requests(host))
    out = host.pymachine(
        "pull", "--tls-verify=false", "--name", "app", f"{PLAIN}/team/app:1", timeout=300
    )
    assert "2 layers, 1 to download" in out.stderr
    fetched = blob_requests(host)[before:]
    assert base_layer not in fetched and len(fetched) == 2  # the new layer and the config
    root = host.host_path("/var/lib/machines/app")
    assert (root / "app/hello").read_text() == "from the app layer\n"
    assert not (root / "hello").exists()  # the whiteout of the second layer


def test_index_picks_the_host_platform_or_the_asked_one(host):
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "multi", f"{PLAIN}/team/multi:1", timeout=300
    )
    assert (host.host_path("/var/lib/machines/multi") / "etc/marker").read_text() == "amd64"
    host.pymachine(
        "pull", "--tls-verify=false", "--platform", "linux/arm64", "--name", "multi-arm",
        f"{PLAIN}/team/multi:1", timeout=300,
    )  # fmt: skip
    assert (host.host_path("/var/lib/machines/multi-arm") / "etc/marker").read_text() == "arm64"
    assert images(host)["multi-arm"]["origin"]["platform"] == "linux/arm64"
    before = store_entries(host)
    missing = pm(
        host,
        "pull",
        "--tls-verify=false",
        "--platform",
        "linux/s390x",
        "--name",
        "x",
        f"{PLAIN}/team/multi:1",
    )
    assert missing.returncode == 4 and "s390x" in missing.stderr
    assert store_entries(host) == before


def test_zstd_and_docker_v2_images(host):
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "zs", f"{PLAIN}/team/zstd:1", timeout=300
    )
    media = json.loads(
        skopeo_in(
            host, "inspect", "--raw", "--tls-verify=false", f"docker://{PLAIN}/team/zstd:1"
        ).stdout
    )["layers"][0]["mediaType"]
    assert media.endswith("+zstd")
    assert (host.host_path("/var/lib/machines/zs") / "etc/marker").read_text() == "zstd"
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "dk", f"{PLAIN}/team/docker:1", timeout=300
    )
    assert "hello from the-registry" in run_image(host, "dk")


@pytest.mark.parametrize(
    ("ref", "flags", "code", "says"),
    [
        (f"{PLAIN}/team/base:nope", ("--tls-verify=false",), 4, "no such image"),
        (f"{PLAIN}/team/nothing:1", ("--tls-verify=false",), 4, "no such image"),
        (f"{PLAIN}/team/base:1", (), 1, "--tls-verify=false"),
        (f"{PLAIN}/team/evil:1", ("--tls-verify=false",), 2, "refusing"),
        ("Not/A Reference", ("--tls-verify=false",), 2, "invalid image reference"),
    ],
)
def test_bad_pulls_fail_clearly_and_change_nothing(host, ref, flags, code, says):
    before, listed = store_entries(host), set(images(host))
    result = pm(host, "pull", *flags, "--name", unique("bad"), ref)
    assert result.returncode == code, result.stderr
    assert says in result.stderr and len(result.stderr.strip().splitlines()[-1]) < 300
    assert store_entries(host) == before and set(images(host)) == listed
    assert not list(Path(host.host_path("/")).glob("escaped"))


def test_a_corrupt_blob_in_the_registry_is_refused(host, tmp_path):
    own_image(host, "team/corrupt")  # its layer then damaged on the registry's disk
    manifest = json.loads(
        skopeo_in(
            host, "inspect", "--raw", "--tls-verify=false", f"docker://{PLAIN}/team/corrupt:1"
        ).stdout
    )
    digest = manifest["layers"][0]["digest"]
    hexd = digest.split(":")[1]
    blob = host.host_path(f"{SRV}/data-5000/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = store_entries(host)
    result = pm(host, "pull", "--tls-verify=false", "--name", "corrupt", f"{PLAIN}/team/corrupt:1")
    assert result.returncode == 1 and "digest" in result.stderr, result.stderr
    assert store_entries(host) == before and "corrupt" not in images(host)


def test_basic_auth_from_flags_and_from_the_auth_files(host, tmp_path):
    ref = f"{AUTHED}/private/base:1"
    before = store_entries(host)
    anonymous = pm(host, "pull", "--tls-verify=false", "--name", "priv", ref)
    assert anonymous.returncode == 1 and "401" in anonymous.stderr, anonymous.stderr
    wrong = pm(
        host, "pull", "--tls-verify=false", "--creds", f"{USER}:wrong", "--name", "priv", ref
    )
    assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
    assert store_entries(host) == before
    host.pymachine(
        "pull",
        "--tls-verify=false",
        "--creds",
        f"{USER}:{PASSWORD}",
        "--name",
        "priv",
        ref,
        timeout=300,
    )
    # the auth file podman and skopeo use ($REGISTRY_AUTH_FILE), written by skopeo login
    authfile = f"{SRV}/auth-{uuid.uuid4().hex[:6]}.json"
    host.run(["skopeo", "login", "--tls-verify=false", "--authfile", authfile, "-u", USER,
              "--password-stdin", AUTHED], input=PASSWORD)  # fmt: skip
    host.pymachine(
        "pull", "--tls-verify=false", "--force", "--name", "priv", f"{AUTHED}/private/base:1",
        env={"REGISTRY_AUTH_FILE": authfile}, timeout=300,
    )  # fmt: skip
    assert images(host)["priv"]["origin"]["repository"] == f"{AUTHED}/private/base"


def test_existing_name_needs_force_and_never_under_a_running_machine(host):
    name = unique("forced")
    host.pymachine(
        "pull", "--tls-verify=false", "--name", name, f"{PLAIN}/team/base:1", timeout=300
    )
    other = pm(host, "pull", "--tls-verify=false", "--name", name, f"{PLAIN}/team/app:1")
    assert other.returncode == 5 and "--force" in other.stderr
    machine = unique("user")
    host.pymachine("create", machine, "--image", name, "--network", "none",
                   "--", "/bin/sh", "-c", "while :; do sleep 1; done")  # fmt: skip
    host.pymachine("start", machine)
    try:
        busy = pm(
            host, "pull", "--tls-verify=false", "--force", "--name", name, f"{PLAIN}/team/app:1"
        )
        assert busy.returncode == 5 and machine in busy.stderr
        assert images(host)[name]["origin"]["reference"] == f"{PLAIN}/team/base:1"
    finally:
        host.pymachine("stop", machine)
    host.pymachine(
        "pull", "--tls-verify=false", "--force", "--name", name, f"{PLAIN}/team/app:1", timeout=300
    )
    assert images(host)[name]["origin"]["reference"] == f"{PLAIN}/team/app:1"
    assert (host.host_path(f"/var/lib/machines/{name}") / "app/hello").exists()
    host.pymachine("remove", machine)


def test_an_interrupted_pull_leaves_nothing_visible_and_the_next_one_finishes(host, tmp_path):
    # a big layer (random data does not compress) so the pull is still extracting when killed
    scratch = tmp_path / "big"
    image = str(host.host_path(f"{SRV}/big"))
    umoci("init", "--layout", image)
    umoci("new", "--image", f"{image}:big")
    umoci("unpack", "--image", f"{image}:big", str(scratch))
    for i in range(4):
        (scratch / f"rootfs/blob{i}").write_bytes(os.urandom(48 << 20))
    umoci("repack", "--image", f"{image}:big", str(scratch))
    push_layout(host, f"{SRV}/big", "big", "team/big:1")
    proc = host.popen(
        [sys.executable, "-m", "machined", "pull", "--tls-verify=false", "--name", "big", f"{PLAIN}/team/big:1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    store = host.host_path("/var/lib/machines")
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".#big.") for p in store.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the pull ended before extracting"
        )
        time.sleep(0.01)
    staging = next(p.name for p in store.iterdir() if p.name.startswith(".#big."))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pid = staging.split(".")[2]  # .#big.PID.XXXX: the killed pull, in the host's PID namespace
    while host.run(["test", "-e", f"/proc/{pid}"], check=False).returncode == 0:
        time.sleep(0.05)  # until the host's init has reaped it
    assert "big" not in images(host)
    out = host.pymachine(
        "pull", "--tls-verify=false", "--name", "big", f"{PLAIN}/team/big:1", timeout=300
    )
    assert "0 to download" in out.stderr  # the killed pull's blobs are reused
    assert not [p.name for p in store.iterdir() if p.name.startswith(".#")]
    assert (store / "big/blob3").stat().st_size == 48 << 20


def own_image(host: SystemdHost, repo: str) -> None:
    """An image no other test shares a blob with (random content), pushed as REPO:1."""
    name = repo.replace("/", "-")
    layout = host.host_path(f"{SRV}/{name}")
    builder = LayoutBuilder(layout)
    desc = builder.image([tar_bytes([("data", os.urandom(4096))])], {"Cmd": ["/x"]})
    desc["annotations"] = {"org.opencontainers.image.ref.name": "t"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    push_layout(host, f"{SRV}/{name}", "t", f"{repo}:1")


def test_prune_drops_only_blobs_no_image_uses(host):
    own_image(host, "team/prunable")
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "keep", f"{PLAIN}/team/base:1", timeout=300
    )
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "drop", f"{PLAIN}/team/prunable:1", timeout=300
    )
    host.pymachine("image", "remove", "drop")
    out = host.pymachine("image", "prune").stdout
    assert int(out.split()[0]) >= 3  # its manifest, config and layer
    again = host.pymachine(
        "pull",
        "--tls-verify=false",
        "--force",
        "--name",
        "keep2",
        f"{PLAIN}/team/base:1",
        timeout=300,
    )
    assert "0 to download" in again.stderr
    back = host.pymachine(
        "pull", "--tls-verify=false", "--name", "drop", f"{PLAIN}/team/prunable:1", timeout=300
    )
    assert "1 to download" in back.stderr


# --- pull-tar: URLs, checksums, signatures --------------------------------------------------

HTTP = "127.0.0.1:5080"
WEB = f"{SRV}/web"

#: A static server with range requests; the first GET of an archive under /flaky/ is cut
#: in half (its Content-Length promises the whole), as a dropped connection would.
#: Every request is logged (path and Range) to requests.log.
SERVER = r"""
import http.server, os, sys
root, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)
cut = set()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(root, self.path.lstrip("/"))
        log.write(f"{self.path} {self.headers.get('Range', '-')}\n")
        if not os.path.isfile(path):
            self.send_error(404); return
        data = open(path, "rb").read()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/flaky/") and self.path.endswith(".xz") and self.path not in cut:
            cut.add(self.path)
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), H).serve_forever()
"""


def rootfs_tar(marker: str, extra: list[tuple[str, bytes | None]] = ()) -> bytes:
    """A small rootfs (busybox) as .tar.xz bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as t:
        t.add("/bin/busybox", arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
        for name, data in [
            ("etc/marker", marker.encode()),
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
            *extra,
        ]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sums_for(files: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()).encode()


@pytest.fixture(scope="module")
def web(host, tmp_path_factory):
    """A directory tree served on HTTP, a throwaway GnuPG key and its keyring (in-host paths)."""
    if not shutil.which("gpg"):
        skip_or_fail("gpg is not installed (dev/setup installs gnupg)")
    root = host.host_path(WEB)
    good = rootfs_tar("from-a-url")
    layout = {
        "plain/rootfs.tar.xz": good,
        "signed/rootfs.tar.xz": good,
        "tampered/rootfs.tar.xz": good,
        "forged/rootfs.tar.xz": good,
        "flaky/rootfs.tar.xz": good,
        "evil/rootfs.tar.xz": rootfs_tar("evil", [("../../escaped-url", b"x")]),
    }
    for rel, data in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for d in ("plain", "signed", "forged", "flaky", "evil"):
        (root / d / "SHA256SUMS").write_bytes(
            sums_for({"rootfs.tar.xz": good if d != "evil" else layout["evil/rootfs.tar.xz"]})
        )
    (root / "tampered/SHA256SUMS").write_bytes(sums_for({"rootfs.tar.xz": b"something else"}))
    gnupg = tmp_path_factory.mktemp("gnupg")
    os.chmod(gnupg, 0o700)

    def gpg(*args: str, home: Path = gnupg) -> None:
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                       check=True, capture_output=True)  # fmt: skip

    gpg("--quick-gen-key", "pymtest signer <signer@pymtest.invalid>", "ed25519", "sign", "never")
    gpg("--output", str(root / "keyring.gpg"), "--export")
    gpg(
        "--output",
        str(root / "signed/SHA256SUMS.gpg"),
        "--detach-sign",
        str(root / "signed/SHA256SUMS"),
    )
    other = tmp_path_factory.mktemp("gnupg-other")
    os.chmod(other, 0o700)
    gpg(
        "--quick-gen-key",
        "someone else <other@pymtest.invalid>",
        "ed25519",
        "sign",
        "never",
        home=other,
    )
    gpg(
        "--output",
        str(root / "forged/SHA256SUMS.gpg"),
        "--detach-sign",
        str(root / "forged/SHA256SUMS"),
        home=other,
    )
    (root / "server.py").write_text(SERVER)
    host.run(
        [
            "systemd-run",
            "--unit=pymtest-web",
            "--",
            "python3",
            f"{WEB}/server.py",
            WEB,
            f"{WEB}/requests.log",
            HTTP.split(":")[1],
        ]
    )
    host.run(
        [
            "python3",
            "-c",
            f"import socket,time\nfor _ in range(200):\n    try:\n        socket.create_connection(('127.0.0.1',{HTTP.split(':')[1]}),1).close(); break\n    except OSError: time.sleep(0.05)",
        ]
    )
    return root


def test_pull_tar_with_a_good_checksum_and_a_good_signature(host, web):
    url = f"http://{HTTP}/plain/rootfs.tar.xz"
    host.pymachine("pull-tar", url, "fromurl", "--verify=checksum", timeout=300)
    info = images(host)["fromurl"]
    assert info["origin"]["url"] == url and info["origin"]["verify"] == "checksum"
    assert (
        info["origin"]["sha256"]
        == hashlib.sha256((web / "plain/rootfs.tar.xz").read_bytes()).hexdigest()
    )
    assert (host.host_path("/var/lib/machines/fromurl") / "etc/marker").read_text() == "from-a-url"
    machine = unique("u")
    host.pymachine(
        "create",
        machine,
        "--image",
        "fromurl",
        "--network",
        "none",
        "--",
        "/bin/cat",
        "/etc/marker",
    )
    assert host.pymachine("run", machine).stdout.strip() == "from-a-url"
    host.pymachine("remove", machine)
    host.pymachine(
        "pull-tar", f"http://{HTTP}/signed/rootfs.tar.xz", "signed", "--verify=signature",
        f"--keyring={WEB}/keyring.gpg", timeout=300,
    )  # fmt: skip
    assert images(host)["signed"]["origin"]["verify"] == "signature"


@pytest.mark.parametrize(
    ("path", "flags", "code", "says"),
    [
        ("tampered", ("--verify=checksum",), 1, "does not match SHA256SUMS"),
        (
            "forged",
            ("--verify=signature", f"--keyring={WEB}/keyring.gpg"),
            1,
            "signature does not check out",
        ),
        ("nothing-here", ("--verify=no",), 4, "404"),
        ("evil", ("--verify=checksum",), 2, "refusing"),
        (
            "signed",
            ("--verify=signature", f"--keyring={WEB}/no-such-keyring"),
            2,
            "no-such-keyring",
        ),
    ],
)
def test_pull_tar_that_does_not_check_out_changes_nothing(host, web, path, flags, code, says):
    before, listed = store_entries(host), set(images(host))
    result = pm(host, "pull-tar", f"http://{HTTP}/{path}/rootfs.tar.xz", unique("u"), *flags)
    assert result.returncode == code, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # the error: one line, after the progress
    assert last.startswith("pymachine: ") and says in last, result.stderr
    assert store_entries(host) == before and set(images(host)) == listed
    assert os.listdir(host.host_path("/var/cache/pymachine/downloads")) == []


def test_a_truncated_download_fails_and_the_next_pull_resumes_it(host, web):
    url = f"http://{HTTP}/flaky/rootfs.tar.xz"
    before = store_entries(host)
    first = pm(host, "pull-tar", url, "flaky", "--verify=checksum")
    assert first.returncode == 1 and "pull again to resume" in first.stderr, first.stderr
    assert store_entries(host) == before
    host.pymachine("pull-tar", url, "flaky", "--verify=checksum", timeout=300)
    size = len((web / "flaky/rootfs.tar.xz").read_bytes())
    requests = [line.split() for line in (web / "requests.log").read_text().splitlines()]
    tries = [r for r in requests if r[0] == "/flaky/rootfs.tar.xz"]
    assert tries[0][1] == "-" and tries[1][1] == f"bytes={size // 2}-", tries
    assert (host.host_path("/var/lib/machines/flaky") / "etc/marker").read_text() == "from-a-url"


# --- commit and push -----------------------------------------------------------------------

CHANGES = (
    "echo changed >> /etc/marker; rm /bin/ls; rm -rf /app; mkdir /app; echo fresh > /app/new; "
    "mkdir /data; echo mine > /data/f; chown 1000:1000 /data/f; chmod 4750 /data/f"
)


def committed_machine(host: SystemdHost, base: str) -> str:
    """A stopped machine on BASE (user namespace on: its layer is owned by its range) with CHANGES."""
    machine = unique("c")
    host.pymachine(
        "create", machine, "--image", base, "--network", "none", "--", "/bin/sh", "-c", CHANGES
    )
    host.pymachine("run", machine, timeout=120)
    return machine


def test_commit_makes_an_image_of_the_changes_only(host):
    base = unique("cbase")
    host.pymachine("pull", "--tls-verify=false", "--name", base, f"{PLAIN}/team/app:1", timeout=300)
    machine = committed_machine(host, base)
    upper_owner = os.stat(
        host.host_path(f"/var/lib/pymachine/machines/{machine}/upper/data/f")
    ).st_uid
    assert upper_owner != 1000  # shifted into the machine's range
    new = unique("committed")
    out = host.pymachine("commit", machine, new, timeout=300)
    root, base_root = (host.host_path(f"/var/lib/machines/{n}") for n in (new, base))
    assert (root / "etc/marker").read_text() == "amd64changed\n"
    assert not (root / "bin/ls").exists() and (root / "bin/cat").is_symlink()
    assert sorted(os.listdir(root / "app")) == ["new"]  # the opaque directory
    st = os.stat(root / "data/f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o4750)
    assert os.stat(root / "etc/marker").st_uid == 0
    # the base is untouched, and unchanged files are shared with it, not copied
    assert (base_root / "etc/marker").read_text() == "amd64" and (base_root / "bin/ls").exists()
    assert sorted(os.listdir(base_root / "app")) == ["hello"]
    if "hard links" in out.stderr:
        assert os.stat(root / "bin/busybox").st_ino == os.stat(base_root / "bin/busybox").st_ino
        assert os.stat(root / "etc/marker").st_ino != os.stat(base_root / "etc/marker").st_ino
    origin = images(host)[new]["origin"]
    assert origin["committed_from"] == machine and origin["base"] == base
    # a plain directory the reference tools use, and a machine runs it
    assert new in host.run(["machinectl", "list-images", "--no-legend"]).stdout
    user = unique("u")
    host.pymachine("create", user, "--image", new, "--network", "none", "--", "/bin/cat", "/data/f")
    assert host.pymachine("run", user).stdout == "mine\n"
    for m in (user, machine):
        host.pymachine("remove", m)


def test_commit_of_a_running_machine_freezes_it_for_the_copy(host):
    """A running machine is frozen while its writable layer is read (systemd's
    FreezeUnit), then thawed: the image has what it wrote, and it runs on."""
    machine = unique("run")
    host.pymachine("create", machine, "--image", "base" if "base" in images(host) else _pulled(host), "--network", "none",
                   "--", "/bin/sh", "-c", "echo live > /written; while :; do sleep 1; done")  # fmt: skip
    host.pymachine("start", machine)
    new = unique("live")
    try:
        for _ in range(100):  # the payload's first line has run
            if host.run(["test", "-e", f"/var/lib/pymachine/machines/{machine}/upper/written"],
                        check=False).returncode == 0:  # fmt: skip
                break
            time.sleep(0.05)
        host.pymachine("commit", machine, new)
        assert host.host_path(f"/var/lib/machines/{new}/written").read_text() == "live\n"
        state = host.run(
            ["systemctl", "show", "-P", "FreezerState", f"pymachine-{machine}.service"]
        )
        assert state.stdout.strip() == "running"
        assert host.pymachine("exec", machine, "--", "echo", "still").stdout == "still\n"
        stopped = unique("stopped")
        host.pymachine("commit", "--stop", machine, stopped)  # stopped for the copy, started again
        assert host.pymachine("exec", machine, "--", "cat", "/written").stdout == "live\n"
        host.pymachine("image", "remove", stopped)
    finally:
        host.pymachine("stop", machine)
        host.pymachine("image", "remove", new, check=False)
    before = store_entries(host)
    taken = pm(host, "commit", machine, "base")
    assert taken.returncode == 5 and "already exists" in taken.stderr
    missing = pm(host, "commit", "no-such-machine", unique("no"))
    assert missing.returncode == 4
    assert store_entries(host) == before
    host.pymachine("remove", machine)


def _pulled(host: SystemdHost) -> str:
    host.pymachine(
        "pull", "--tls-verify=false", "--name", "base", f"{PLAIN}/team/base:1", timeout=300
    )
    return "base"


def test_push_of_a_committed_image_sends_the_base_layers_plus_the_change(host):
    base = unique("pbase")
    host.pymachine("pull", "--tls-verify=false", "--name", base, f"{PLAIN}/team/app:1", timeout=300)
    machine = committed_machine(host, base)
    new = unique("pushed")
    host.pymachine("commit", machine, new, timeout=300)
    dest = f"{PLAIN}/team/committed:v2"
    host.pymachine("push", "--tls-verify=false", new, dest, timeout=300)
    # skopeo (not ours) reads it: the app image's two layers plus one
    manifest = json.loads(
        skopeo_in(host, "inspect", "--raw", "--tls-verify=false", f"docker://{dest}").stdout
    )
    original = json.loads(
        skopeo_in(
            host, "inspect", "--raw", "--tls-verify=false", f"docker://{PLAIN}/team/app:1"
        ).stdout
    )
    assert [d["digest"] for d in manifest["layers"][:2]] == [
        d["digest"] for d in original["layers"]
    ]
    assert len(manifest["layers"]) == 3
    config = json.loads(
        skopeo_in(host, "inspect", "--config", "--tls-verify=false", f"docker://{dest}").stdout
    )
    assert len(config["rootfs"]["diff_ids"]) == 3 and config["config"]["Env"] == [
        "GREETING=the-registry"
    ]
    skopeo_in(
        host, "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{SRV}/copied-{new}:x"
    )
    # and pull reads back the same tree and defaults
    back = unique("back")
    host.pymachine("pull", "--tls-verify=false", "--name", back, dest, timeout=300)
    root = host.host_path(f"/var/lib/machines/{back}")
    assert (root / "etc/marker").read_text() == "amd64changed\n" and not (root / "bin/ls").exists()
    assert sorted(os.listdir(root / "app")) == ["new"] and os.stat(root / "data/f").st_uid == 1000
    assert "hello from the-registry in /etc" in run_image(host, back)
    host.pymachine("remove", machine)


def test_push_of_a_bootstrapped_image_is_one_layer_podman_pulls(host):
    name = unique("bb")
    host.pymachine("bootstrap", "--distro", "busybox", name)
    dest = f"{AUTHED}/private/{name}:1"
    denied = pm(host, "push", "--tls-verify=false", name, dest)
    assert denied.returncode == 1 and "401" in denied.stderr
    host.pymachine(
        "push", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", name, dest, timeout=300
    )
    manifest = json.loads(
        skopeo_in(
            host,
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"--creds={USER}:{PASSWORD}",
            f"docker://{dest}",
        ).stdout
    )
    assert len(manifest["layers"]) == 1
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # podman (not ours) pulls it into its own storage
    if shutil.which("podman"):
        podman = [
            "podman",
            "--root",
            f"{SRV}/podman-{name}",
            "--runroot",
            f"/run/podman-{name}",
            "--storage-driver",
            "vfs",
        ]
        host.run(
            [*podman, "pull", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", dest],
            timeout=300,
        )
        listed = host.run([*podman, "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout
        assert f"{AUTHED}/private/{name}:1" in listed
    back = unique("bback")
    host.pymachine(
        "pull",
        "--tls-verify=false",
        "--creds",
        f"{USER}:{PASSWORD}",
        "--name",
        back,
        dest,
        timeout=300,
    )
    machine = unique("b")
    host.pymachine(
        "create", machine, "--image", back, "--network", "none", "--", "/bin/cat", "/etc/os-release"
    )
    assert "busybox" in host.pymachine("run", machine).stdout
    host.pymachine("remove", machine)


def test_no_space_left_is_one_line_and_leaves_nothing(host):
    """The store on a 1 MiB tmpfs: the base image (2 MiB unpacked) does not fit."""
    host.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pymtest-full", "/var/lib/machines"])
    try:
        full = pm(
            host, "pull", "--tls-verify=false", "--force", "--name", "full", f"{PLAIN}/team/base:1"
        )
        assert full.returncode == 1, full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("pymachine: ") and "space" in last, full.stderr
        assert os.listdir(host.host_path("/var/lib/machines")) == []
        assert "full" not in images(host)
    finally:
        host.run(["umount", "/var/lib/machines"])


def test_short_names_resolve_through_registries_conf(host):
    """`pymachine pull team/base:1` tries each unqualified-search registry in order."""
    conf = host.host_path("/etc/containers/registries.conf")
    original = conf.read_text()
    conf.write_text(f'unqualified-search-registries = ["{AUTHED}", "{PLAIN}"]\n')
    try:
        # the first registry has no team/base (and wants a login): the second one does
        out = host.pymachine(
            "pull", "--tls-verify=false", "--name", "short", "team/base:1", timeout=300
        )
        assert images(host)["short"]["origin"]["reference"] == f"{PLAIN}/team/base:1", out.stderr
        missing = pm(host, "pull", "--tls-verify=false", "--name", "short2", "team/nothing:1")
        assert missing.returncode in (1, 4) and "short2" not in images(host)
    finally:
        conf.write_text(original)


def test_a_user_pulls_through_pymachined_anonymously(host):
    """With pymachined installed, a user allowed to manage images pulls (a
    job of the daemon's); the pull is anonymous, though root has a login for
    that registry, which root's own pull through the daemon uses."""
    from machined.daemon import install
    from tests.integration.test_daemon import IMAGES_RULE, RULES

    root_auth = "/run/containers/0/auth.json"  # skopeo's default for root
    host.run(
        "set -e; getent group pymachine >/dev/null || groupadd pymachine; "
        "id carol >/dev/null 2>&1 || useradd -m -G pymachine carol; "
        "chmod 711 /root; mkdir -p /etc/polkit-1/rules.d /run/containers/0"
    )
    host.run(
        ["cp", "/dev/stdin", "/etc/polkit-1/rules.d/50-pymachine.rules"], input=RULES.read_text()
    )
    host.run(["cp", "/dev/stdin", "/etc/polkit-1/rules.d/51-images.rules"], input=IMAGES_RULE)
    host.run("chmod 644 /etc/polkit-1/rules.d/5*-*.rules")
    host.run(["skopeo", "login", "--tls-verify=false", "--authfile", root_auth, "-u", USER,
              "--password-stdin", AUTHED], input=PASSWORD)  # fmt: skip
    host.pymachine("install-units")
    mine, refused, roots = unique("carol"), unique("carol"), unique("root")
    try:
        as_carol = ["runuser", "-u", "carol", "--", sys.executable, "-m", "machined"]
        pulled = host.run([*as_carol, "pull", "--tls-verify=false", "--name", mine,
                           f"{PLAIN}/team/base:1"], check=False, timeout=300)  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr
        assert images(host)[mine]["origin"]["repository"] == f"{PLAIN}/team/base"
        before = store_entries(host)
        private = host.run([*as_carol, "pull", "--tls-verify=false", "--name", refused,
                            f"{AUTHED}/private/base:1"], check=False, timeout=300)  # fmt: skip
        assert private.returncode == 1, private.stderr
        assert store_entries(host) == before
        host.pymachine("pull", "--tls-verify=false", "--name", roots, f"{AUTHED}/private/base:1",
                       timeout=300)  # fmt: skip
        assert roots in images(host)
    finally:
        targets = [f"/{target}" for _source, target in install.FILES]
        host.run(["rm", "-f", root_auth, *targets])
        host.run("systemctl daemon-reload; systemctl stop pymachined.service", check=False)
        for image in (mine, roots):
            host.pymachine("image", "remove", image, check=False)
