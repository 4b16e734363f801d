"""Debian through ``mmdebstrap`` (apt-based, fast), falling back to ``debootstrap``.

Caching: with mmdebstrap the package cache and the apt lists of the
distribution/release/architecture are synchronised into the new tree before
``apt-get update`` and back out after the install (mmdebstrap's own
``sync-in``/``sync-out`` hooks, ``--skip=essential/unlink`` so the essential
packages are kept for the sync). mmdebstrap's clean-up then drops both from
the image, so images carry no package cache. With fresh lists in the cache
(younger than :data:`LISTS_MAX_AGE`) ``apt-get update`` is skipped as well,
so a warm bootstrap downloads nothing at all. debootstrap keeps its ``.deb``
files through its own ``--cache-dir``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import ClassVar

from bootstrap.distributions import BootstrapConfig, Context, Distribution, Installer
from bootstrap.run import MissingTool, find_tool, run
from machined.errors import InvalidInput

LISTS_MAX_AGE = 6 * 3600  # seconds: older cached apt lists are refreshed with apt-get update


def _lists_fresh(lists: Path, max_age: float = LISTS_MAX_AGE) -> bool:
    """True if the cached apt lists hold a Release file younger than ``max_age``."""
    try:
        releases = [p for p in lists.iterdir() if p.name.endswith(("_InRelease", "_Release"))]
        packages = [p for p in lists.iterdir() if "_Packages" in p.name]
    except FileNotFoundError:
        return False
    if not releases or not packages:
        return False
    newest = max(p.stat().st_mtime for p in releases)
    return time.time() - newest < max_age


class Debian(Installer, distribution=Distribution.debian):
    default_release = "bookworm"
    default_mirror: ClassVar[str] = "http://deb.debian.org/debian"
    components: ClassVar[tuple[str, ...]] = ("main",)
    keyring: ClassVar[str | None] = None  # the host's default (debian-archive-keyring)
    tools = (("mmdebstrap", "mmdebstrap"),)  # or debootstrap: see check_tools

    # --- which tool --------------------------------------------------------
    @classmethod
    def tool(cls) -> str:
        """ "mmdebstrap" when installed, else "debootstrap"."""
        if find_tool("mmdebstrap"):
            return "mmdebstrap"
        if find_tool("debootstrap"):
            return "debootstrap"
        raise MissingTool(
            f"{cls.distribution} bootstrap needs mmdebstrap or debootstrap "
            "(apt-get install mmdebstrap)"
        )

    @classmethod
    def check_tools(cls) -> dict[str, str]:
        tool = cls.tool()
        return {tool: find_tool(tool) or tool}

    @classmethod
    def validate(cls, config: BootstrapConfig) -> None:
        super().validate(config)
        release = cls.release(config)
        if not release.replace("-", "").isalnum():
            raise InvalidInput(f"invalid release {release!r}")

    @classmethod
    def mirror(cls, config: BootstrapConfig) -> str:
        return config.mirror or cls.default_mirror

    # --- command lines (pure) -------------------------------------------------
    @classmethod
    def commands(
        cls, context: Context, *, tool: str | None = None, lists_fresh: bool | None = None
    ) -> list[list[str]]:
        tool = tool or cls.tool()
        if tool == "mmdebstrap":
            if lists_fresh is None:
                lists_fresh = context.cache is not None and _lists_fresh(context.cache / "lists")
            return [cls.mmdebstrap_command(context, skip_update=lists_fresh)]
        return [cls.debootstrap_command(context)]

    @classmethod
    def mmdebstrap_command(cls, context: Context, *, skip_update: bool = False) -> list[str]:
        config = context.config
        argv = [
            "mmdebstrap",
            "--mode=root",
            "--format=directory",
            f"--variant={config.variant}",
            f"--architectures={cls.architecture(config)}",
            f"--components={','.join(cls.components)}",
        ]
        if config.include:
            argv.append(f"--include={','.join(config.include)}")
        if cls.keyring:
            argv.append(f"--keyring={cls.keyring}")
        if context.cache is not None:
            archives, lists = context.cache / "archives", context.cache / "lists"
            argv += [
                "--skip=essential/unlink",
                f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives "$1"/var/lib/apt/lists'
                f" {archives} {lists}",
                f"--setup-hook=sync-in {archives} /var/cache/apt/archives/",
                f"--setup-hook=sync-in {lists} /var/lib/apt/lists/",
                f"--customize-hook=sync-out /var/cache/apt/archives {archives}",
                f"--customize-hook=sync-out /var/lib/apt/lists {lists}",
            ]
            if skip_update:
                argv.append("--skip=update")
        argv += [cls.release(config), str(context.root), cls.mirror(config)]
        return argv

    @classmethod
    def debootstrap_command(cls, context: Context) -> list[str]:
        config = context.config
        argv = ["debootstrap", f"--arch={cls.architecture(config)}"]
        if config.variant == "minbase":
            argv.append("--variant=minbase")  # "standard": debootstrap's default set
        if len(cls.components) > 1:
            argv.append(f"--components={','.join(cls.components)}")
        if config.include:
            argv.append(f"--include={','.join(config.include)}")
        if cls.keyring:
            argv.append(f"--keyring={cls.keyring}")
        if context.cache is not None:
            argv.append(f"--cache-dir={context.cache / 'archives'}")
        argv += [cls.release(config), str(context.root), cls.mirror(config)]
        return argv

    # --- running --------------------------------------------------------------
    @classmethod
    def install(cls, context: Context) -> None:
        tool = cls.tool()
        if context.cache is not None:
            for sub in ("archives", "lists"):
                (context.cache / sub).mkdir(parents=True, exist_ok=True)
            for path in (context.cache, context.root):
                if any(c.isspace() for c in str(path)):
                    raise InvalidInput(f"{tool} hooks cannot take a path with spaces: {path}")
        [argv] = cls.commands(context, tool=tool)
        cached = _count_debs(context.cache / "archives") if context.cache else (0, 0)
        if context.cache is not None:
            mode = "cached lists, no apt-get update" if "--skip=update" in argv else "cache"
            context.progress.message(f"{tool}: {cls.release(context.config)} ({mode})")
        context.progress.step(f"{tool} {cls.release(context.config)} {context.config.variant}")
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_downloads,
            args=(context, context.root / "var/cache/apt/archives", cached, stop),
            daemon=True,
        )
        watcher.start()
        try:
            run(argv, on_line=context.progress.line)
        finally:
            stop.set()
            watcher.join()


def _count_debs(directory: Path) -> tuple[int, int]:
    count = size = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".deb"):
                    count += 1
                    with contextlib.suppress(OSError):
                        size += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return count, size


def _watch_downloads(
    context: Context, archives: Path, cached: tuple[int, int], stop: threading.Event
) -> None:
    """Show packages/bytes arriving in the tree's apt cache while the tool runs."""
    progress = context.progress
    while not stop.wait(0.5):
        count, size = _count_debs(archives)
        if count:
            progress.done = count
            progress.set_bytes(size)
