"""Pull and commit: pymachine against podman and skopeo, one run each.

Inside a systemd host with its own network namespace (the registry listens
on its loopback only)::

    .venv/bin/python3 -m tests.harness run -q --private-network --timeout 120 \\
        -- sh -c "cd $PWD && exec .venv/bin/python3 -m bench.pull"

A multi-layer image is built with umoci (busybox plus the host's Python
standard library, 20 MB of random data, a small top layer) and pushed with
skopeo into Debian's ``docker-registry`` on 127.0.0.1:5010. Then, each once:

* cold (every tool's storage empty): ``pymachine pull`` (download into the
  blob cache + extraction into an image), ``podman pull`` (download +
  extraction into its overlay storage), ``skopeo copy docker://… oci:DIR``
  alone (download only: the floor under both);
* warm (the same image again): pymachine (up to date: one manifest request),
  podman, skopeo into the same layout; and pymachine under a new name (blobs
  cached, extraction again);
* a second image on the same base: bytes the registry served to each tool
  (its access log);
* ``pymachine commit`` of a machine that wrote 10 MB over the image against
  ``cp -a`` of the image: seconds and extra disk (statvfs of the store).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, pymachine, run
from tests.integration.test_registry import busybox_tree, registry_config, umoci

PORT = 5010
REGISTRY = f"127.0.0.1:{PORT}"
WORK = Path("/var/lib/pymachine/bench-pull")  # a real directory in the host (overlay-capable)
PODMAN = ["podman", "--root", str(WORK / "podman"), "--runroot", "/run/bench-podman"]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    run(argv, timeout=900)
    return time.perf_counter() - start


def registry_log() -> Path:
    return WORK / "registry.log"


def served_bytes(since: int) -> int:
    """Bytes of blobs the registry served since byte ``since`` of its access log."""
    with open(registry_log(), "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    total = 0
    for line in text.splitlines():
        if '"GET /v2/' in line and "/blobs/sha256:" in line:
            parts = line.split('"GET ')[1].split('"')[1].split()  # ... HTTP/1.1" 200 SIZE "
            if parts and parts[0] == "200":
                total += int(parts[1])
    return total


def log_length() -> int:
    return registry_log().stat().st_size


def du_mib(*paths: str) -> float:
    """Disk of the trees together, a hard-linked file counted once (du's rule)."""
    out = run(["du", "-s", "--block-size=1", "-c", *paths]).stdout.splitlines()[-1]
    return int(out.split()[0]) / 2**20


def build(layout: Path, scratch: Path) -> None:
    image = str(layout)
    umoci("init", "--layout", image)
    umoci("new", "--image", f"{image}:base")
    umoci("unpack", "--image", f"{image}:base", str(scratch / "b"))
    rootfs = scratch / "b/rootfs"
    busybox_tree(rootfs, "bench")
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    stdlib = Path(os.__file__).parent
    shutil.copytree(
        stdlib, rootfs / "usr/lib/python", ignore=shutil.ignore_patterns("site-packages")
    )
    # --refresh-bundle: the next repack of this bundle stacks a layer on this one
    umoci("repack", "--refresh-bundle", "--image", f"{image}:base", str(scratch / "b"))
    (rootfs / "data").mkdir()
    (rootfs / "data/random").write_bytes(os.urandom(20 << 20))
    umoci("repack", "--refresh-bundle", "--image", f"{image}:app", str(scratch / "b"))
    (rootfs / "etc/app.conf").write_text("top layer\n")
    umoci("repack", "--image", f"{image}:app", str(scratch / "b"))
    umoci("config", "--image", f"{image}:app", "--config.cmd", "/bin/true")
    # the second image: the same base plus a layer of its own
    umoci("unpack", "--image", f"{image}:base", str(scratch / "c"))
    (scratch / "c/rootfs/other").write_bytes(os.urandom(2 << 20))
    umoci("repack", "--image", f"{image}:other", str(scratch / "c"))


def main() -> int:
    for tool in ("skopeo", "umoci", "docker-registry", "podman"):
        if not shutil.which(tool):
            print(f"bench.pull: {tool} is not installed", file=sys.stderr)
            return 1
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    (WORK / "registry.yml").write_text(registry_config(PORT, str(WORK / "registry"), None))
    run(
        [
            "systemd-run",
            f"--unit=bench-registry-{PORT}",
            f"--property=StandardOutput=append:{registry_log()}",
            f"--property=StandardError=append:{registry_log()}",
            "--",
            "docker-registry",
            "serve",
            str(WORK / "registry.yml"),
        ]
    )
    time.sleep(1)
    with tempfile.TemporaryDirectory(dir=WORK) as scratch:
        build(WORK / "layout", Path(scratch))
    for tag in ("app", "other"):
        run(
            [
                "skopeo",
                "copy",
                "--dest-tls-verify=false",
                f"oci:{WORK}/layout:{tag}",
                f"docker://{REGISTRY}/bench/{tag}:1",
            ],
            timeout=600,
        )
    ref = f"{REGISTRY}/bench/app:1"
    other = f"{REGISTRY}/bench/other:1"
    results: dict[str, float | int | str] = {}

    def pym_clean() -> None:
        for name in ("bench-app", "bench-app2", "bench-other"):
            run(pymachine("image", "remove", name), check=False)
        run(pymachine("image", "prune"))

    def podman_clean() -> None:
        run([*PODMAN, "rmi", "-a", "-f"], check=False)

    pym_clean()
    podman_clean()
    run(["sync"])
    results["cold pymachine"] = timed(
        pymachine("pull", "--tls-verify=false", "--name", "bench-app", ref)
    )
    results["cold podman"] = timed([*PODMAN, "pull", "-q", "--tls-verify=false", ref])
    layout = WORK / "skopeo-layout"
    results["cold skopeo"] = timed(
        ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:x"]
    )
    results["warm pymachine (up to date)"] = timed(
        pymachine("pull", "--tls-verify=false", "--name", "bench-app", ref)
    )
    results["warm podman"] = timed([*PODMAN, "pull", "-q", "--tls-verify=false", ref])
    results["warm skopeo"] = timed(
        ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:y"]
    )
    results["warm pymachine (new name: cached blobs, extraction)"] = timed(
        pymachine("pull", "--tls-verify=false", "--name", "bench-app2", ref)
    )
    # the second image on the same base
    mark = log_length()
    run(pymachine("pull", "--tls-verify=false", "--name", "bench-other", other))
    results["second image bytes pymachine"] = served_bytes(mark)
    mark = log_length()
    run([*PODMAN, "pull", "-q", "--tls-verify=false", other])
    results["second image bytes podman"] = served_bytes(mark)
    mark = log_length()
    run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            f"docker://{other}",
            f"oci:{WORK}/other-layout:x",
        ]
    )
    results["second image bytes skopeo (empty layout)"] = served_bytes(mark)
    # commit: 10 MB of changes over the image
    machine = "bench-commit"
    run(pymachine("remove", machine), check=False)
    run(pymachine("create", machine, "--image", "bench-app", "--network", "none", "--", "/bin/sh", "-c",
                  "cat /data/random /data/random > /dev/null; head -c 10485760 /data/random > /data/changed"))  # fmt: skip
    run(pymachine("run", machine), timeout=300)
    run(["sync"])
    image = "/var/lib/machines/bench-app"
    cache = "/var/lib/pymachine/oci"
    base_mib, cache_mib = du_mib(image), du_mib(cache)
    results["commit pymachine s"] = timed(pymachine("commit", machine, "bench-committed"))
    results["commit pymachine extra MiB (image)"] = (
        du_mib(image, "/var/lib/machines/bench-committed") - base_mib
    )
    results["commit pymachine extra MiB (change layer in the blob cache)"] = (
        du_mib(cache) - cache_mib
    )
    results["cp -a s"] = timed(["cp", "-a", image, "/var/lib/machines/.bench-cp"])
    results["cp -a extra MiB"] = du_mib(image, "/var/lib/machines/.bench-cp") - base_mib
    results["image MiB"] = base_mib
    shutil.rmtree("/var/lib/machines/.bench-cp", ignore_errors=True)
    run(pymachine("remove", machine), check=False)
    run(pymachine("image", "remove", "bench-committed"), check=False)
    pym_clean()
    podman_clean()
    run(["systemctl", "stop", f"bench-registry-{PORT}"], check=False)

    print("| what | seconds / bytes |\n| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    cold = (
        results["cold pymachine"] / results["cold skopeo"],
        results["cold pymachine"] / results["cold podman"],
    )
    print(f"\ncold: pymachine / skopeo alone = {cold[0]:.2f}, pymachine / podman = {cold[1]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pull.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
