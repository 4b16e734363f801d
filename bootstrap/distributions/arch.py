"""Arch Linux through ``pacstrap`` (arch-install-scripts) with a generated pacman.conf.

pacstrap gets ``-C`` (our pacman.conf naming the mirror), ``-c`` (use the
cache we name instead of the new root's), ``-G`` and ``-M`` (copy neither the
host's keyring nor its mirror list: the host is usually not Arch); pacman's
own ``--cachedir``/``--gpgdir`` follow the package list. The keyring lives in
the cache (``pacman-key --init`` / ``--populate archlinux`` once).

On Debian the tools are packaged (``arch-install-scripts``,
``pacman-package-manager``, ``archlinux-keyring``), but Arch mirrors are not
reachable from the machines this project is tested on: only the command lines
are tested here.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bootstrap.distributions import BootstrapConfig, Context, Distribution, Installer
from bootstrap.run import run

ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}
PACKAGES = {
    "minbase": ("base",),
    "standard": ("base", "iproute2", "iputils", "less", "nano", "procps-ng"),
}


class Arch(Installer, distribution=Distribution.arch):
    default_release = "rolling"
    default_mirror: ClassVar[str] = "https://geo.mirror.pkgbuild.com"
    tools = (("pacstrap", "arch-install-scripts"), ("pacman-key", "pacman-package-manager"))

    @classmethod
    def architecture(cls, config: BootstrapConfig) -> str:
        arch = super().architecture(config)
        return ARCHITECTURES.get(arch, arch)

    @classmethod
    def packages(cls, config: BootstrapConfig) -> list[str]:
        return [*PACKAGES[config.variant], *config.include]

    @classmethod
    def pacman_conf(cls, context: Context) -> str:
        mirror = (context.config.mirror or cls.default_mirror).rstrip("/")
        lines = [
            "[options]",
            f"Architecture = {cls.architecture(context.config)}",
            "SigLevel = Required DatabaseOptional",
            "LocalFileSigLevel = Optional",
            "ParallelDownloads = 5",
            "NoExtract = usr/share/help/* usr/share/doc/* usr/share/man/* usr/share/info/*",
            "",
        ]
        for repo in ("core", "extra"):
            lines += [f"[{repo}]", f"Server = {mirror}/$repo/os/$arch", ""]
        return "\n".join(lines)

    @classmethod
    def dirs(cls, context: Context) -> tuple[Path, Path]:
        base = context.cache if context.cache is not None else context.workdir
        return base / "pkg", base / "gnupg"

    @classmethod
    def commands(cls, context: Context) -> list[list[str]]:
        pkg, gnupg = cls.dirs(context)
        conf = context.workdir / "pacman.conf"
        argv: list[list[str]] = []
        if not (gnupg / "pubring.gpg").exists():
            argv += [
                ["pacman-key", "--gpgdir", str(gnupg), "--init"],
                ["pacman-key", "--gpgdir", str(gnupg), "--populate", "archlinux"],
            ]
        argv.append(
            [
                "pacstrap",
                "-C",
                str(conf),
                "-c",
                "-G",
                "-M",
                str(context.root),
                *cls.packages(context.config),
                "--cachedir",
                str(pkg),
                "--gpgdir",
                str(gnupg),
            ]
        )
        return argv

    @classmethod
    def install(cls, context: Context) -> None:
        cls.check_tools()
        pkg, gnupg = cls.dirs(context)
        pkg.mkdir(parents=True, exist_ok=True)
        gnupg.mkdir(parents=True, exist_ok=True, mode=0o700)
        (context.workdir / "pacman.conf").write_text(cls.pacman_conf(context))
        context.progress.step(f"pacstrap {' '.join(cls.packages(context.config))}")
        for argv in cls.commands(context):
            run(argv, on_line=context.progress.line)
