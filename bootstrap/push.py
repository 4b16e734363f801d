"""``pymachine push IMAGE DESTINATION``: an image to a registry, as an OCI image.

An image that came from ``pull`` or from ``commit`` over a pulled image has
its manifest in the blob cache already (the base layers, plus one layer for
the change): that is what is pushed. Any other image (bootstrap, import,
pull-tar) is written as one gzip layer of the whole tree with a config
holding its defaults, so that ``pull`` reads back the same image and
command. skopeo does the upload (``oci:CACHE:TAG`` → ``docker://…``).
"""

from __future__ import annotations

import json
import os
import time

from bootstrap.blobcache import BlobCache
from bootstrap.progress import Progress
from bootstrap.reference import parse
from bootstrap.skopeo import Access, Skopeo, copy_argv
from machined.images import ImageStore


def single_layer(store: ImageStore, name: str, cache: BlobCache, progress: Progress) -> str:
    """The whole image as one layer; returns the manifest's digest (caller holds the lock)."""
    from bootstrap import ociwrite
    from bootstrap.distributions import host_architecture
    from bootstrap.tarimport import write_tar

    root = store.path(name)
    progress.step(f"writing image '{name}' as one layer")
    written: list[ociwrite.WrittenLayer] = []
    with ociwrite.layer_stream(cache, written) as stream:
        write_tar(root, stream, "w|", progress)
    config = ociwrite.new_config(
        store.config(name), host_architecture(), [written[0].diff_id], f"pymachine push {name}"
    )
    return ociwrite.put_image(cache, config, [written[0].descriptor])


def push(
    name: str,
    destination: str,
    *,
    access: Access | None = None,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> str:
    """Push image ``name``; returns the manifest digest pushed."""
    store = store or ImageStore()
    progress = progress or Progress()
    access = access or Access()
    ref = parse(destination)
    store.path(name)
    started = time.monotonic()
    skopeo = Skopeo(access)
    cache = BlobCache(store.paths)
    with cache.locked():
        manifest = store.origin(name).get("manifest")
        if not (isinstance(manifest, str) and cache.has(manifest)):
            manifest = single_layer(store, name, cache, progress)
        data = cache.blob(manifest).read_bytes()
        media_type = (
            json.loads(data).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
        )
        tag = f"push-{os.getpid()}"
        cache.tag(tag, {"mediaType": media_type, "digest": manifest, "size": len(data)})
        try:
            progress.step(f"pushing to {ref}")
            with skopeo.session(ref.domain) as authfile:
                skopeo.copy(
                    copy_argv(
                        cache.transport(tag), ref.transport, dst=access, dst_authfile=authfile
                    ),
                    str(ref),
                    on_line=progress.line,
                )
        finally:
            cache.untag(tag)
    progress.finish(f"image '{name}' pushed to {ref} in {time.monotonic() - started:.1f}s")
    return manifest
