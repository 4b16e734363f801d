"""Writing OCI images into the blob cache: layers, configs and manifests.

What ``commit`` and ``push`` make must be what any registry client reads and
what ``pull`` reads back: a gzip layer (PAX tar, numeric owners, xattrs)
whose config lists the sha256 of the uncompressed tar as its ``diff_id``,
the image's defaults under ``config`` (Entrypoint, Cmd, Env, WorkingDir,
User, ExposedPorts, StopSignal), and an OCI image manifest.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from bootstrap.blobcache import BlobCache, BlobWriter
from machined.images import ImageConfig

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class WrittenLayer:
    digest: str  # of the gzip blob
    diff_id: str  # of the tar inside it
    size: int

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": LAYER_TYPE, "digest": self.digest, "size": self.size}


class _Tee:
    """Hashes the uncompressed tar on its way into gzip (the layer's diff_id)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def layer_stream(cache: BlobCache, result: list[WrittenLayer]) -> Iterator[IO[bytes]]:
    """Where to write a layer's tar; on exit it is a gzip blob in the cache, appended to ``result``."""
    blob: BlobWriter
    with cache.writer() as blob:
        gz = gzip.GzipFile(fileobj=blob, mode="wb", mtime=0, compresslevel=6)  # type: ignore[arg-type]
        tee = _Tee(gz)
        yield tee  # type: ignore[misc]
        gz.close()
    result.append(WrittenLayer(blob.digest, "sha256:" + tee.hash.hexdigest(), blob.size))


@contextlib.contextmanager
def layer(cache: BlobCache, result: list[WrittenLayer]) -> Iterator[tarfile.TarFile]:
    """:func:`layer_stream` as a PAX tar to add entries to."""
    with (
        layer_stream(cache, result) as stream,
        tarfile.open(
            fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT,
            encoding="utf-8", errors="surrogateescape",
        ) as tar,
    ):  # fmt: skip
        yield tar


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def config_section(config: ImageConfig) -> dict[str, Any]:
    """The ``config`` of an OCI image config for pymachine's ImageConfig."""
    section: dict[str, Any] = {}
    if config.entrypoint:
        section["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        section["Cmd"] = list(config.cmd)
    if config.environment:
        section["Env"] = list(config.environment)
    if config.working_directory:
        section["WorkingDir"] = config.working_directory
    if config.user:
        section["User"] = config.user
    if config.exposed_ports:
        section["ExposedPorts"] = {p: {} for p in config.exposed_ports}
    if config.stop_signal:
        section["StopSignal"] = config.stop_signal
    return section


def new_config(config: ImageConfig, architecture: str, diff_ids: list[str], why: str) -> dict:
    created = now_rfc3339()
    return {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": config_section(config),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": why}],
    }


def extended_config(base: dict[str, Any], added: WrittenLayer, why: str) -> dict[str, Any]:
    """The base image's config with one more layer (its defaults kept)."""
    config = copy.deepcopy(base)
    created = now_rfc3339()
    config["created"] = created
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("diff_ids", []).append(added.diff_id)
    config.setdefault("history", []).append({"created": created, "created_by": why})
    return config


def put_image(cache: BlobCache, config: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    """Store config and manifest; returns the manifest's digest."""
    data = json.dumps(config, sort_keys=True).encode()
    config_digest = cache.put(data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(data)},
        "layers": layers,
    }
    return cache.put(json.dumps(manifest, sort_keys=True).encode())
