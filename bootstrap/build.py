"""Build an image: pick the backend, fill a staging dir, post-configure, rename into place."""

from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bootstrap.distributions import BootstrapConfig, Context, installer
from bootstrap.postconfig import configure
from bootstrap.progress import Progress
from machined.cli.output import human_bytes
from machined.images import ImageStore
from machined.names import validate_image_name
from machined.paths import private_dirs


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so the staging dir is removed."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def cache_dir(store: ImageStore, config: BootstrapConfig) -> Path | None:
    """Where this build's downloaded packages are kept (None with --no-cache)."""
    if not config.use_cache:
        return None
    private_dirs(store.paths.cache)  # root's, as the other state directories
    path = store.paths.cache / "packages" / installer(config.distribution).cache_key(config)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bootstrap_image(
    name: str,
    config: BootstrapConfig,
    *,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Path:
    """Make image ``name`` and return its path. Nothing is left behind on failure."""
    validate_image_name(name)
    store = store or ImageStore()
    progress = progress or Progress()
    backend = installer(config.distribution)
    backend.validate(config)
    backend.check_tools()
    started = time.monotonic()
    with (
        terminate_as_interrupt(),
        store.staging(name) as staging,
        tempfile.TemporaryDirectory(prefix="pymachine-bootstrap-") as workdir,
    ):
        context = Context(
            config=config,
            root=staging,
            workdir=Path(workdir),
            cache=cache_dir(store, config),
            progress=progress,
        )
        backend.install(context)
        progress.step("configuring for containers")
        configure(
            staging,
            hostname=config.hostname or name,
            os_release=backend.os_release(config),
        )
        meta = {
            "source": backend.source(config),
            "bootstrap": {
                "distribution": str(config.distribution),
                "release": backend.release(config),
                "variant": config.variant,
                "include": list(config.include),
                "architecture": backend.architecture(config),
                "mirror": config.mirror,
            },
        }
        path = store.commit(name, staging, meta=meta)
    size = store.read_meta(name).get("size")
    progress.finish(
        f"image '{name}' ready in {time.monotonic() - started:.1f}s"
        + (f" ({human_bytes(size)})" if size else "")
    )
    return path
