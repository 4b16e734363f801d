"""``pymachine pull``: an image from a registry, through skopeo and the shared blob cache.

1. ``skopeo inspect --raw`` of the reference (each search registry in turn
   for a short name): the manifest or index the tag names, and its digest.
   If the image of that name already came from exactly that, nothing is
   downloaded.
2. An index is resolved to the platform's manifest here (the host's, or
   ``--platform``), then ``skopeo copy docker://REPO@DIGEST oci:CACHE:TAG``
   copies exactly what was looked at into the shared OCI layout, skipping
   every blob the cache already holds.
3. The layers are applied from the cache with :mod:`bootstrap.oci`'s safe
   extraction (whiteouts, escapes refused, every blob's sha256 checked;
   zstd layers decompressed with ``zstandard``) into a staging directory that
   becomes the image at the very end: a failed or killed pull leaves the
   store as it was, and its finished blobs for the next pull.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bootstrap.blobcache import BlobCache
from bootstrap.oci import (
    INDEX_TYPES,
    ZSTD_TYPES,
    HashingReader,
    Layer,
    Layout,
    apply_layers,
    choose_manifest,
    image_config,
    parse_platform,
)
from bootstrap.progress import Progress
from bootstrap.reference import DIGEST, Reference, candidates
from bootstrap.skopeo import Access, AuthFailed, Skopeo, copy_argv, parse_json
from machined.cli.output import human_bytes
from machined.errors import Conflict, InvalidInput, NotFound, PymachineError
from machined.images import ImageConfig, ImageStore
from machined.names import validate_image_name


class CacheLayout(Layout):
    """The blob cache as a :class:`Layout` whose zstd blobs read decompressed.

    The compressed blob's sha256 is checked here (``apply_layers`` is given no
    digest for them: it would hash the decompressed stream).
    """

    def __init__(self, root: Path, zstd: dict[str, str]) -> None:
        super().__init__(root)
        self.zstd = zstd  # blob path -> digest

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Any]:
        digest = self.zstd.get(name)
        if digest is None:
            with super().open(name) as f:
                yield f
            return
        import zstandard

        with super().open(name) as f:
            reader = HashingReader(f, digest)
            with zstandard.ZstdDecompressor().stream_reader(reader, closefd=False) as stream:
                yield stream
            reader.verify()


def layers_of(manifest: dict[str, Any]) -> tuple[list[Layer], dict[str, str]]:
    """The manifest's layers for ``apply_layers``, and which of them are zstd."""
    layers, zstd = [], {}
    for d in manifest.get("layers") or []:
        digest, media_type = d["digest"], d.get("mediaType", "")
        path = Layout.blob_path(digest)
        if media_type.endswith(ZSTD_TYPES):
            zstd[path] = digest
            layers.append(Layer(path, None, media_type.rsplit("+", 1)[0], d.get("size")))
        else:
            layers.append(Layer(path, digest, media_type, d.get("size")))
    return layers, zstd


def config_of(config: dict[str, Any]) -> ImageConfig:
    """What ``create`` takes from an image: bootstrap.oci's fields plus ports and stop signal."""
    c = config.get("config") or {}
    ports, signal = c.get("ExposedPorts") or {}, c.get("StopSignal") or None
    if not isinstance(ports, dict) or not all(isinstance(p, str) for p in ports):
        raise InvalidInput(f"image config: ExposedPorts is not a map of ports: {ports!r}")
    if signal is not None and not isinstance(signal, str):
        raise InvalidInput(f"image config: StopSignal is not a string: {signal!r}")
    # through the sidecar's own checks (ImageConfig.from_json) like every stored config
    return ImageConfig.from_json(
        replace(
            image_config(config), exposed_ports=tuple(sorted(ports)), stop_signal=signal
        ).to_json()
    )


def platform_text(platform: str | None) -> str:
    os_, arch, variant = parse_platform(platform)
    return "/".join(p for p in (os_, arch, variant) if p)


def check_replaceable(store: ImageStore, name: str, force: bool) -> None:
    """An existing image is replaced only with --force, and never under a running machine."""
    if not store.exists(name):
        return
    if not force:
        raise Conflict(f"image '{name}' already exists (use --force to replace it)")
    users = store.used_by(name)
    if users:
        from machined.machines import Machines

        with Machines(store.paths) as machines:
            running = [m for m in users if machines.is_running(m)]
        if running:
            raise Conflict(
                f"image '{name}' is in use by running machine(s): {', '.join(running)}; "
                "stop them first"
            )


def pull(
    text: str,
    name: str | None = None,
    *,
    platform: str | None = None,
    access: Access | None = None,
    force: bool = False,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Path:
    store = store or ImageStore()
    progress = progress or Progress()
    access = access or Access()
    if name is not None:
        validate_image_name(name)
    parse_platform(platform)  # bad input before any network
    started = time.monotonic()
    skopeo = Skopeo(access)
    # As podman: each search registry in turn; one that lacks the image or
    # refuses us is skipped. If none has it, a refusal says more than a 404.
    errors: list[PymachineError] = []
    for ref in candidates(text):
        with skopeo.session(ref.domain) as authfile:
            try:
                raw, digest = skopeo.raw_manifest(ref.transport, authfile)
            except (NotFound, AuthFailed) as exc:
                errors.append(exc)
                continue
            return _pull(
                skopeo, ref, raw, digest, authfile, name or ref.default_name,
                platform=platform, force=force, store=store, progress=progress, started=started,
            )  # fmt: skip
    raise next((e for e in errors if not isinstance(e, NotFound)), errors[-1])


def _pull(
    skopeo: Skopeo,
    ref: Reference,
    raw: bytes,
    digest: str,
    authfile: str | None,
    name: str,
    *,
    platform: str | None,
    force: bool,
    store: ImageStore,
    progress: Progress,
    started: float,
) -> Path:
    validate_image_name(name)
    wanted = platform_text(platform)
    if store.exists(name):
        origin = store.origin(name)
        if (
            origin.get("repository") == ref.repository
            and origin.get("digest") == digest
            and origin.get("platform") == wanted
        ):
            progress.finish(f"image '{name}' is up to date ({digest[:19]}): nothing downloaded")
            return store.path(name)
    check_replaceable(store, name, force)

    manifest_digest, manifest = resolve_manifest(skopeo, ref, raw, digest, authfile, platform)
    cache = BlobCache(store.paths)
    blobs = manifest["layers"]
    missing = [d for d in blobs if not cache.has(d["digest"])]
    size = sum(int(d.get("size") or 0) for d in missing)
    progress.message(
        f"pulling {ref} ({wanted}): {len(blobs)} layers, {len(missing)} to download "
        f"({human_bytes(size)}), {len(blobs) - len(missing)} cached"
    )
    tag = f"pull-{os.getpid()}-{name}"
    with cache.locked():
        try:
            progress.step("downloading")
            skopeo.copy(
                copy_argv(
                    ref.pinned(manifest_digest).transport,
                    cache.transport(tag),
                    src=skopeo.access,
                    src_authfile=authfile,
                ),
                str(ref),
                on_line=progress.line,
            )
            cached = cache.tagged(tag)["digest"]  # differs from the registry's for Docker v2
        finally:
            cache.untag(tag)
        manifest = cache.read_json(cached)
        config = cache.read_json(manifest["config"]["digest"])
        if platform is not None:
            _check_platform(config, platform, ref)
        layers, zstd = layers_of(manifest)
        layout = CacheLayout(cache.root, zstd)
        with store.staging(name, replace=force) as staging:
            apply_layers(layout, layers, staging, progress=progress)
            meta = {
                "source": f"registry {ref}",
                "origin": {
                    "reference": str(ref),
                    "repository": ref.repository,
                    "digest": digest,
                    "manifest": cached,
                    "platform": wanted,
                    "pulled_at": time.time(),
                },
            }
            check_replaceable(store, name, force)  # again: a machine may have started meanwhile
            path = store.commit(name, staging, meta=meta, config=config_of(config), replace=force)
    progress.finish(
        f"image '{name}' pulled: {ref}@{digest[:19]}, {len(layers)} layers "
        f"({len(missing)} downloaded, {human_bytes(size)}) in {time.monotonic() - started:.1f}s"
    )
    return path


def checked_manifest(document: Any, what: str) -> dict[str, Any]:
    """An image manifest whose descriptors have well-formed digests, or a clear error."""
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise PymachineError(f"{what}: unsupported manifest (schema 1 or not an image)")
    for d in [document.get("config"), *document["layers"]]:
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str):
            raise PymachineError(f"{what}: malformed manifest (a descriptor without a digest)")
        checked_digest(d["digest"], what)
        if not isinstance(d.get("size", 0), int):
            raise PymachineError(f"{what}: malformed manifest (a size that is not a number)")
    return document


def checked_digest(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise PymachineError(f"{what}: malformed digest {str(digest)[:80]!r} in the manifest")
    return digest


def resolve_manifest(
    skopeo: Skopeo,
    ref: Reference,
    raw: bytes,
    digest: str,
    authfile: str | None,
    platform: str | None,
) -> tuple[str, dict[str, Any]]:
    """The platform's manifest (and its digest) for what the reference names."""
    document = parse_json(raw, str(ref))
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(document, dict) and (
        (isinstance(media_type, str) and media_type in INDEX_TYPES) or "manifests" in document
    ):
        manifests = document.get("manifests")
        if not isinstance(manifests, list) or not all(
            isinstance(d, dict) and isinstance(d.get("platform") or {}, dict) for d in manifests
        ):
            raise PymachineError(f"{ref}: malformed image index")
        try:
            descriptor = choose_manifest(manifests, platform)
        except InvalidInput as exc:
            raise NotFound(f"{ref}: {exc}") from exc
        manifest_digest = checked_digest(descriptor.get("digest"), str(ref))
        data, got = skopeo.raw_manifest(ref.pinned(manifest_digest).transport, authfile)
        if got != manifest_digest:
            raise PymachineError(
                f"{ref}: the registry sent a manifest that does not match its digest"
            )
        return manifest_digest, checked_manifest(parse_json(data, str(ref)), str(ref))
    return digest, checked_manifest(document, str(ref))


def _check_platform(config: dict[str, Any], platform: str, ref: Reference) -> None:
    want_os, want_arch, _ = parse_platform(platform)
    got = (config.get("os"), config.get("architecture"))
    if None not in got and got != (want_os, want_arch):
        raise NotFound(f"{ref}: the image is {got[0]}/{got[1]}, not {want_os}/{want_arch}")


def prune(store: ImageStore | None = None) -> tuple[int, int]:
    """Drop cached blobs no image uses (their recorded manifests are the roots)."""
    store = store or ImageStore()
    roots = [o["manifest"] for o in store.origins().values() if isinstance(o.get("manifest"), str)]
    return BlobCache(store.paths).prune(roots)
