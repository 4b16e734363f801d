"""Fedora through ``dnf --installroot`` with a generated repository file.

The host's own repositories are ignored (``--setopt=reposdir=`` points at a
directory we write, naming Fedora's metalink or ``--mirror``); downloaded RPMs
stay in the cache (``keepcache``), so a second bootstrap of the same release
downloads nothing but metadata checks.

``dnf`` is packaged for Debian, but Fedora's mirrors are not reachable from the
machines this project is tested on: only the command lines are tested here.
"""

from __future__ import annotations

from pathlib import Path

from bootstrap.distributions import BootstrapConfig, Context, Distribution, Installer
from bootstrap.run import run

ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64", "ppc64el": "ppc64le"}
PACKAGES = {
    "minbase": ("fedora-release", "bash", "coreutils", "glibc-minimal-langpack", "rpm"),
    "standard": ("@core",),
}
GPG_KEY = "https://src.fedoraproject.org/rpms/fedora-repos/raw/rawhide/f/RPM-GPG-KEY-fedora-$releasever-primary"


class Fedora(Installer, distribution=Distribution.fedora):
    default_release = "41"
    tools = (("dnf", "dnf"),)

    @classmethod
    def architecture(cls, config: BootstrapConfig) -> str:
        arch = super().architecture(config)
        return ARCHITECTURES.get(arch, arch)

    @classmethod
    def packages(cls, config: BootstrapConfig) -> list[str]:
        return [*PACKAGES[config.variant], *config.include]

    @classmethod
    def repo_file(cls, config: BootstrapConfig) -> str:
        sections = []
        for repo, path, metalink in (
            ("fedora", "releases", "fedora-$releasever"),
            ("updates", "updates", "updates-released-f$releasever"),
        ):
            if config.mirror:
                location = f"baseurl={config.mirror.rstrip('/')}/{path}/$releasever/" + (
                    "Everything/$basearch/os/" if repo == "fedora" else "Everything/$basearch/"
                )
            else:
                location = (
                    f"metalink=https://mirrors.fedoraproject.org/metalink?repo={metalink}"
                    "&arch=$basearch"
                )
            sections.append(
                f"[{repo}]\nname=Fedora $releasever {repo}\n{location}\n"
                f"enabled=1\ngpgcheck=1\ngpgkey={GPG_KEY}\n"
            )
        return "\n".join(sections)

    @classmethod
    def cache_path(cls, context: Context) -> Path:
        return context.cache if context.cache is not None else context.workdir / "dnf-cache"

    @classmethod
    def commands(cls, context: Context) -> list[list[str]]:
        config = context.config
        return [
            [
                "dnf",
                "--assumeyes",
                f"--installroot={context.root}",
                f"--releasever={cls.release(config)}",
                f"--forcearch={cls.architecture(config)}",
                f"--setopt=reposdir={context.workdir / 'repos'}",
                f"--setopt=cachedir={cls.cache_path(context)}",
                f"--setopt=keepcache={'True' if context.cache is not None else 'False'}",
                "--setopt=install_weak_deps=False",
                "--setopt=tsflags=nodocs",
                "--nodocs",
                "install",
                *cls.packages(config),
            ]
        ]

    @classmethod
    def install(cls, context: Context) -> None:
        cls.check_tools()
        repos = context.workdir / "repos"
        repos.mkdir(parents=True, exist_ok=True)
        (repos / "fedora.repo").write_text(cls.repo_file(context.config))
        cls.cache_path(context).mkdir(parents=True, exist_ok=True)
        context.progress.step(f"dnf install {' '.join(cls.packages(context.config))}")
        for argv in cls.commands(context):
            run(argv, on_line=context.progress.line)
