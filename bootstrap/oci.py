"""Import an OCI image layout (a directory or a tar of one), or a ``docker save`` archive.

The manifest is found through ``index.json`` (nested indexes are followed; with
several platforms the host's, or ``--platform os/arch``, is chosen), every
blob read is checked against its sha256 digest, and the layers are applied in
order onto one directory with :mod:`bootstrap.tarimport`'s safe extraction,
honouring whiteouts: ``.wh.NAME`` removes ``NAME`` from the layers below,
``.wh..wh..opq`` hides everything the layers below put in that directory.
The config's ``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir`` and ``User``
become the image's default command (:class:`machined.images.ImageConfig`, kept
in the store's sidecar, not in the tree).

No registry access: pulling is left to ``skopeo copy docker://… oci:DIR`` or
``podman save --format oci-archive``, whose output this reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bootstrap.distributions import host_architecture
from bootstrap.progress import Progress
from bootstrap.space import SpaceBudget
from bootstrap.tarimport import extract
from machined.errors import InvalidInput
from machined.images import ImageConfig, ImageStore

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
ZSTD_TYPES = ("+zstd", ".zstd")


class HashingReader(io.RawIOBase):
    """Reads through to ``raw`` while hashing; :meth:`verify` checks the digest at the end."""

    def __init__(self, raw: IO[bytes], digest: str | None) -> None:
        self.raw = raw
        self.digest = digest
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.count += n
        return n

    def verify(self) -> None:
        while self.raw.read(1 << 20):  # a tar may end before the blob does (padding)
            pass
        if self.digest is None:
            return
        algorithm, _, expected = self.digest.partition(":")
        if algorithm != "sha256":
            return  # only sha256 is used in practice; others are not checked
        if self.hash.hexdigest() != expected:
            raise InvalidInput(f"blob {self.digest} is corrupt (sha256 {self.hash.hexdigest()})")


class Layout:
    """Blobs and files of an OCI layout, from a directory or a tar archive."""

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.source = Path(source)
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if self.source.is_dir():
            return
        if not self.source.is_file():
            raise InvalidInput(f"{source}: no such OCI layout directory or archive")
        try:
            self._tar = tarfile.open(self.source, "r:*")  # noqa: SIM115 (closed by close())
        except tarfile.TarError as exc:
            raise InvalidInput(f"{source}: not an OCI layout archive: {exc}") from exc
        for member in self._tar.getmembers():
            name = os.path.normpath(member.name.lstrip("/"))
            if member.isreg() or member.islnk():
                self._members[name] = member

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def has(self, name: str) -> bool:
        if self._tar is None:
            return (self.source / name).is_file()
        return os.path.normpath(name) in self._members

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        name = os.path.normpath(name)
        if name.startswith("..") or os.path.isabs(name):
            raise InvalidInput(f"refusing path outside the layout: {name!r}")
        if self._tar is None:
            path = self.source / name
            if not path.is_file():
                raise InvalidInput(f"{self.source}: missing {name}")
            with open(path, "rb") as f:
                yield f
            return
        member = self._members.get(name)
        if member is None:
            raise InvalidInput(f"{self.source}: missing {name}")
        f = self._tar.extractfile(member)
        assert f is not None
        with f:
            yield f

    def read_json(self, name: str, digest: str | None = None) -> Any:
        with self.open(name) as f:
            reader = HashingReader(f, digest)
            data = reader.read()
            reader.verify()
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"{self.source}: {name} is not JSON: {exc}") from exc

    @staticmethod
    def blob_path(digest: str) -> str:
        algorithm, _, encoded = digest.partition(":")
        if not algorithm.isalnum() or not encoded.isalnum():
            raise InvalidInput(f"invalid digest {digest!r}")
        return f"blobs/{algorithm}/{encoded}"


@dataclass(frozen=True)
class Layer:
    path: str  # inside the layout
    digest: str | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class Resolved:
    layers: list[Layer]
    config: ImageConfig
    description: str


def parse_platform(platform: str | None) -> tuple[str, str, str | None]:
    if not platform:
        return "linux", host_architecture(), None
    parts = platform.split("/")
    if len(parts) not in (2, 3):
        raise InvalidInput(f"invalid platform {platform!r}: use OS/ARCH[/VARIANT]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def choose_manifest(manifests: list[dict[str, Any]], platform: str | None) -> dict[str, Any]:
    if not manifests:
        raise InvalidInput("the image index lists no manifests")
    if len(manifests) == 1 and platform is None:
        return manifests[0]
    want_os, want_arch, want_variant = parse_platform(platform)
    for descriptor in manifests:
        p = descriptor.get("platform") or {}
        if (
            p.get("os", want_os) == want_os
            and p.get("architecture", want_arch) == want_arch
            and (want_variant is None or p.get("variant") == want_variant)
        ):
            return descriptor
    available = ", ".join(
        f"{(d.get('platform') or {}).get('os', '?')}/{(d.get('platform') or {}).get('architecture', '?')}"
        for d in manifests
    )
    raise InvalidInput(f"no manifest for {want_os}/{want_arch} in the index (has: {available})")


def image_config(config: dict[str, Any]) -> ImageConfig:
    c = config.get("config") or {}
    return ImageConfig(
        entrypoint=tuple(c.get("Entrypoint") or ()),
        cmd=tuple(c.get("Cmd") or ()),
        environment=tuple(c.get("Env") or ()),
        working_directory=c.get("WorkingDir") or None,
        user=c.get("User") or None,
    )


def resolve(layout: Layout, platform: str | None = None) -> Resolved:
    """Find the layers and config of the (platform's) image in ``layout``."""
    if layout.has("index.json"):
        index = layout.read_json("index.json")
        descriptor = choose_manifest(index.get("manifests") or [], platform)
        for _ in range(8):  # nested indexes
            manifest = layout.read_json(
                Layout.blob_path(descriptor["digest"]), descriptor["digest"]
            )
            if descriptor.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
                descriptor = choose_manifest(manifest.get("manifests") or [], platform)
                continue
            break
        else:
            raise InvalidInput("image indexes nested too deeply")
        config_digest = manifest["config"]["digest"]
        config = layout.read_json(Layout.blob_path(config_digest), config_digest)
        layers = [
            Layer(
                path=Layout.blob_path(d["digest"]),
                digest=d["digest"],
                media_type=d.get("mediaType", ""),
                size=d.get("size"),
            )
            for d in manifest.get("layers") or []
        ]
        return Resolved(layers, image_config(config), f"oci {descriptor['digest'][:19]}")
    if layout.has("manifest.json"):  # docker save
        entries = layout.read_json("manifest.json")
        if not entries:
            raise InvalidInput("manifest.json lists no images")
        entry = entries[0]
        config = layout.read_json(entry["Config"])
        layers = [Layer(path=p, digest=None, media_type="", size=None) for p in entry["Layers"]]
        tags = entry.get("RepoTags") or []
        return Resolved(layers, image_config(config), f"docker-archive {tags[0] if tags else ''}")
    raise InvalidInput(f"{layout.source}: neither an OCI layout (index.json) nor a docker archive")


def apply_layers(
    layout: Layout,
    layers: list[Layer],
    root: Path,
    *,
    allow_devices: bool = False,
    progress: Progress | None = None,
) -> None:
    """Extract ``layers`` in order onto ``root``, whiteouts honoured.

    One space budget for all of them: what a layer deletes is not counted
    back, so a stack of layers cannot fill the disk layer by layer.
    """
    budget = SpaceBudget.for_path(root)
    for number, layer in enumerate(layers, 1):
        if layer.media_type.endswith(ZSTD_TYPES):
            raise InvalidInput(f"layer {layer.digest}: zstd-compressed layers are not supported")
        if progress is not None:
            short = (layer.digest or layer.path).split(":")[-1][:12]
            progress.step(f"layer {number}/{len(layers)} {short}")
        with layout.open(layer.path) as f:
            reader = HashingReader(f, layer.digest)
            stream = io.BufferedReader(reader, 1 << 20)
            extract(
                stream,
                root,
                allow_devices=allow_devices,
                whiteouts=True,
                progress=progress,
                budget=budget,
            )
            reader.verify()


def import_oci(
    source: str | os.PathLike[str],
    name: str,
    *,
    allow_devices: bool = False,
    platform: str | None = None,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Path:
    store = store or ImageStore()
    progress = progress or Progress()
    started = time.monotonic()
    layout = Layout(source)
    try:
        try:
            resolved = resolve(layout, platform)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            # A hostile or broken layout: one line, exit 2, not a traceback.
            raise InvalidInput(f"{source}: malformed image metadata ({exc!r})") from exc
        with store.staging(name) as staging:
            apply_layers(
                layout, resolved.layers, staging, allow_devices=allow_devices, progress=progress
            )
            path = store.commit(
                name,
                staging,
                meta={"source": f"{resolved.description} from {os.path.abspath(source)}"},
                config=resolved.config,
            )
    finally:
        layout.close()
    progress.finish(
        f"image '{name}' imported: {len(resolved.layers)} layers in "
        f"{time.monotonic() - started:.1f}s"
    )
    return path
