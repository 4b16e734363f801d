"""Distribution backends: one module per distribution, one small interface (as mkosi).

Each backend is an :class:`Installer` subclass registered with
``class Debian(Installer, distribution=Distribution.debian)`` and looked up
lazily by :func:`installer`, so a Debian bootstrap never imports the Fedora
module. Installers are namespaces of classmethods; all state of one build is
in :class:`Context`. ``commands(context)`` is pure (it builds the argv lists
the backend will run) so the unit tests check every backend's exact command
lines without running anything; ``install(context)`` runs them through
:mod:`bootstrap.run`.
"""

from __future__ import annotations

import enum
import importlib
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bootstrap.postconfig import OsRelease
from bootstrap.progress import Progress
from bootstrap.run import MissingTool, find_tool, run
from machined.errors import InvalidInput


class Distribution(enum.StrEnum):
    debian = "debian"
    ubuntu = "ubuntu"
    arch = "arch"
    fedora = "fedora"
    busybox = "busybox"


VARIANTS = ("minbase", "standard")


@dataclass(frozen=True)
class BootstrapConfig:
    distribution: Distribution
    release: str | None = None  # None: the backend's default
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    mirror: str | None = None
    architecture: str | None = None  # None: the host's
    use_cache: bool = True
    hostname: str | None = None  # None: the image name


@dataclass
class Context:
    config: BootstrapConfig
    root: Path  # the (temporary) directory being filled
    workdir: Path  # scratch space outside the root (generated config files)
    cache: Path | None  # this distribution/release's package cache; None = --no-cache
    progress: Progress = field(default_factory=Progress)

    @property
    def release(self) -> str:
        return installer(self.config.distribution).release(self.config)


def host_architecture() -> str:
    """The host's architecture in Debian's spelling (amd64, arm64 …)."""
    machine = platform.machine()
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "armhf",
        "i686": "i386",
        "ppc64le": "ppc64el",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)


class Installer:
    """The interface every distribution backend implements."""

    distribution: ClassVar[Distribution]
    default_release: ClassVar[str] = ""
    # (binary, Debian package that provides it) — checked before a build.
    tools: ClassVar[Sequence[tuple[str, str]]] = ()
    _registry: ClassVar[dict[Distribution, type[Installer]]] = {}

    def __init_subclass__(cls, distribution: Distribution | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if distribution is not None:
            cls.distribution = distribution
            Installer._registry[distribution] = cls

    # --- what a backend provides -------------------------------------------
    @classmethod
    def release(cls, config: BootstrapConfig) -> str:
        return config.release or cls.default_release

    @classmethod
    def architecture(cls, config: BootstrapConfig) -> str:
        return config.architecture or host_architecture()

    @classmethod
    def validate(cls, config: BootstrapConfig) -> None:
        if config.variant not in VARIANTS:
            raise InvalidInput(
                f"unknown variant {config.variant!r}: use one of {', '.join(VARIANTS)}"
            )
        for package in config.include:
            if not package or package.startswith("-") or any(c.isspace() for c in package):
                raise InvalidInput(f"invalid package name {package!r}")

    @classmethod
    def check_tools(cls) -> dict[str, str]:
        """Absolute paths of the tools this backend needs; MissingTool if one is absent."""
        found: dict[str, str] = {}
        for tool, package in cls.tools:
            path = find_tool(tool)
            if path is None:
                raise MissingTool(
                    f"{cls.distribution} bootstrap needs '{tool}' (apt-get install {package})"
                )
            found[tool] = path
        return found

    @classmethod
    def cache_key(cls, config: BootstrapConfig) -> str:
        """Sub-directory of the cache for this build's packages."""
        return os.path.join(cls.distribution.value, cls.release(config), cls.architecture(config))

    @classmethod
    def source(cls, config: BootstrapConfig) -> str:
        """One line saying where an image came from (shown by ``images``)."""
        return f"{cls.distribution} {cls.release(config)} {config.variant}".strip()

    @classmethod
    def os_release(cls, config: BootstrapConfig) -> OsRelease | None:
        """An os-release to write when the tree has none (only busybox needs one)."""
        return None

    @classmethod
    def commands(cls, context: Context) -> list[list[str]]:
        raise NotImplementedError

    @classmethod
    def install(cls, context: Context) -> None:
        """Fill ``context.root``. The default runs :meth:`commands` one after another."""
        cls.check_tools()
        for argv in cls.commands(context):
            run(argv, on_line=context.progress.line)


def installer(distribution: Distribution | str) -> type[Installer]:
    try:
        distribution = Distribution(distribution)
    except ValueError:
        names = ", ".join(d.value for d in Distribution)
        raise InvalidInput(f"unknown distribution {distribution!r}: use one of {names}") from None
    if distribution not in Installer._registry:
        importlib.import_module(f"bootstrap.distributions.{distribution.value}")
    return Installer._registry[distribution]
