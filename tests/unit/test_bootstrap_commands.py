"""The exact command lines every distribution backend runs (nothing is executed)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from bootstrap.distributions import BootstrapConfig, Context, Distribution, installer
from bootstrap.distributions.debian import _lists_fresh
from bootstrap.progress import Progress
from machined.errors import InvalidInput

ROOT = Path("/var/lib/machines/.#img.1.abc")
WORK = Path("/tmp/work")
CACHE = Path("/var/cache/pymachine/packages/x")


def ctx(distro, *, cache=CACHE, **kw):
    config = BootstrapConfig(Distribution(distro), architecture=kw.pop("arch", "amd64"), **kw)
    return Context(
        config=config, root=ROOT, workdir=WORK, cache=cache, progress=Progress(io.StringIO())
    )


def test_registry_is_lazy_and_complete():
    for d in Distribution:
        assert installer(d).distribution == d
    with pytest.raises(InvalidInput, match="unknown distribution"):
        installer("gentoo")


def test_debian_mmdebstrap_cold_cache():
    c = ctx("debian", include=("python3", "dbus"))
    [argv] = installer("debian").commands(c, tool="mmdebstrap", lists_fresh=False)
    a, lists = CACHE / "archives", CACHE / "lists"
    assert argv == [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        "--architectures=amd64",
        "--components=main",
        "--include=python3,dbus",
        "--skip=essential/unlink",
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives "$1"/var/lib/apt/lists {a} {lists}',
        f"--setup-hook=sync-in {a} /var/cache/apt/archives/",
        f"--setup-hook=sync-in {lists} /var/lib/apt/lists/",
        f"--customize-hook=sync-out /var/cache/apt/archives {a}",
        f"--customize-hook=sync-out /var/lib/apt/lists {lists}",
        "bookworm",
        str(ROOT),
        "http://deb.debian.org/debian",
    ]


def test_debian_mmdebstrap_warm_cache_skips_update():
    [argv] = installer("debian").commands(ctx("debian"), tool="mmdebstrap", lists_fresh=True)
    assert "--skip=update" in argv


def test_debian_mmdebstrap_no_cache():
    c = ctx("debian", cache=None, release="trixie", variant="standard", mirror="http://m/debian")
    [argv] = installer("debian").commands(c, tool="mmdebstrap")
    assert argv == [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=standard",
        "--architectures=amd64",
        "--components=main",
        "trixie",
        str(ROOT),
        "http://m/debian",
    ]


def test_debian_debootstrap_fallback():
    c = ctx("debian", include=("python3",))
    [argv] = installer("debian").commands(c, tool="debootstrap")
    assert argv == [
        "debootstrap",
        "--arch=amd64",
        "--variant=minbase",
        "--include=python3",
        f"--cache-dir={CACHE / 'archives'}",
        "bookworm",
        str(ROOT),
        "http://deb.debian.org/debian",
    ]
    [argv] = installer("debian").commands(
        ctx("debian", cache=None, variant="standard"), tool="debootstrap"
    )
    assert argv == [
        "debootstrap",
        "--arch=amd64",
        "bookworm",
        str(ROOT),
        "http://deb.debian.org/debian",
    ]


def test_ubuntu_uses_its_archive_keyring_and_components():
    [argv] = installer("ubuntu").commands(ctx("ubuntu", cache=None), tool="mmdebstrap")
    assert argv == [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=minbase",
        "--architectures=amd64",
        "--components=main,universe",
        "--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        "noble",
        str(ROOT),
        "http://archive.ubuntu.com/ubuntu",
    ]
    [argv] = installer("ubuntu").commands(
        ctx("ubuntu", cache=None, release="jammy"), tool="debootstrap"
    )
    assert argv == [
        "debootstrap",
        "--arch=amd64",
        "--variant=minbase",
        "--components=main,universe",
        "--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        "jammy",
        str(ROOT),
        "http://archive.ubuntu.com/ubuntu",
    ]


def test_arch_pacstrap(tmp_path):
    cache = tmp_path / "cache"
    c = ctx("arch", cache=cache, include=("vim",))
    arch = installer("arch")
    assert arch.commands(c) == [
        ["pacman-key", "--gpgdir", str(cache / "gnupg"), "--init"],
        ["pacman-key", "--gpgdir", str(cache / "gnupg"), "--populate", "archlinux"],
        [
            "pacstrap",
            "-C",
            str(WORK / "pacman.conf"),
            "-c",
            "-G",
            "-M",
            str(ROOT),
            "base",
            "vim",
            "--cachedir",
            str(cache / "pkg"),
            "--gpgdir",
            str(cache / "gnupg"),
        ],
    ]
    # Once the keyring is in the cache it is not initialised again.
    (cache / "gnupg").mkdir(parents=True)
    (cache / "gnupg/pubring.gpg").write_text("")
    assert [a[0] for a in arch.commands(c)] == ["pacstrap"]
    conf = arch.pacman_conf(ctx("arch", mirror="https://mirror.example/arch/"))
    assert "Architecture = x86_64" in conf
    assert "[core]\nServer = https://mirror.example/arch/$repo/os/$arch" in conf
    assert "[extra]" in conf


def test_fedora_dnf():
    c = ctx("fedora", release="40", include=("python3",))
    assert installer("fedora").commands(c) == [
        [
            "dnf",
            "--assumeyes",
            f"--installroot={ROOT}",
            "--releasever=40",
            "--forcearch=x86_64",
            f"--setopt=reposdir={WORK / 'repos'}",
            f"--setopt=cachedir={CACHE}",
            "--setopt=keepcache=True",
            "--setopt=install_weak_deps=False",
            "--setopt=tsflags=nodocs",
            "--nodocs",
            "install",
            "fedora-release",
            "bash",
            "coreutils",
            "glibc-minimal-langpack",
            "rpm",
            "python3",
        ]
    ]
    [argv] = installer("fedora").commands(
        ctx("fedora", cache=None, variant="standard", arch="arm64")
    )
    assert "--setopt=keepcache=False" in argv
    assert f"--setopt=cachedir={WORK / 'dnf-cache'}" in argv
    assert "--forcearch=aarch64" in argv
    assert argv[-2:] == ["install", "@core"]


def test_fedora_repo_file():
    fedora = installer("fedora")
    text = fedora.repo_file(BootstrapConfig(Distribution.fedora))
    assert (
        "metalink=https://mirrors.fedoraproject.org/metalink?repo=fedora-$releasever&arch=$basearch"
        in text
    )
    assert "[updates]" in text and "gpgcheck=1" in text
    text = fedora.repo_file(BootstrapConfig(Distribution.fedora, mirror="https://m/fedora/linux/"))
    assert "baseurl=https://m/fedora/linux/releases/$releasever/Everything/$basearch/os/" in text


def test_busybox_command_lists_applets():
    [argv] = installer("busybox").commands(ctx("busybox"))
    assert argv[1:] == ["--list-full"]
    assert argv[0].endswith("busybox")


@pytest.mark.parametrize(
    "config",
    [
        BootstrapConfig(Distribution.debian, variant="huge"),
        BootstrapConfig(Distribution.debian, include=("-oops",)),
        BootstrapConfig(Distribution.debian, include=("a b",)),
        BootstrapConfig(Distribution.debian, release="../x"),
        BootstrapConfig(Distribution.busybox, include=("vim",)),
    ],
)
def test_invalid_configs(config):
    with pytest.raises(InvalidInput):
        installer(config.distribution).validate(config)


def test_cache_keys_separate_distributions_and_releases():
    deb = installer("debian").cache_key(BootstrapConfig(Distribution.debian, architecture="amd64"))
    tri = installer("debian").cache_key(
        BootstrapConfig(Distribution.debian, release="trixie", architecture="amd64")
    )
    ubu = installer("ubuntu").cache_key(BootstrapConfig(Distribution.ubuntu, architecture="amd64"))
    assert deb == "debian/bookworm/amd64"
    assert len({deb, tri, ubu}) == 3


def test_lists_freshness(tmp_path):
    assert not _lists_fresh(tmp_path / "missing")
    (tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease").write_text("")
    assert not _lists_fresh(tmp_path)  # no Packages yet
    (tmp_path / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("")
    assert _lists_fresh(tmp_path)
    assert not _lists_fresh(tmp_path, max_age=-1)
    old = time.time() - 10 * 86400

    os.utime(tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease", (old, old))
    assert not _lists_fresh(tmp_path)


def test_cli_bootstrap_options_reach_the_config(monkeypatch, tmp_path):
    import bootstrap.build
    from bootstrap.build import cache_dir
    from machined.cli import main
    from machined.images import ImageStore
    from machined.paths import Paths

    seen = {}
    monkeypatch.setattr(
        bootstrap.build,
        "bootstrap_image",
        lambda name, config: seen.update(name=name, config=config),
    )
    assert (
        main(
            [
                "bootstrap",
                "--distro",
                "debian",
                "--release",
                "trixie",
                "--include",
                "python3,dbus",
                "--include",
                "iproute2",
                "--no-cache",
                "img",
            ]
        )
        == 0
    )
    config = seen["config"]
    assert seen["name"] == "img"
    assert config.release == "trixie" and config.variant == "minbase"
    assert config.include == ("python3", "dbus", "iproute2")
    assert config.use_cache is False
    store = ImageStore(Paths(tmp_path))
    assert cache_dir(store, config) is None
    warm = BootstrapConfig(Distribution.debian, architecture="amd64")
    assert cache_dir(store, warm) == tmp_path / "var/cache/pymachine/packages/debian/bookworm/amd64"
