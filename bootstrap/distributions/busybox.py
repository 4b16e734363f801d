"""A tiny offline image from the host's static busybox (Debian: busybox-static).

No network and about a second: ``/bin/busybox``, a symlink per applet where
``busybox --list-full`` puts it (``/bin``, ``/sbin``, ``/usr/bin``,
``/usr/sbin``), the usual top-level directories and the few files in ``/etc``
that tools and a container manager expect. Post-configuration
(:mod:`bootstrap.postconfig`) adds hostname, hosts, resolv.conf and
machine-id like for every other distribution; ``os-release`` comes from the
``templates/rootfs/os-release.j2`` template.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

from bootstrap.distributions import BootstrapConfig, Context, Distribution, Installer
from bootstrap.postconfig import OsRelease
from bootstrap.run import MissingTool, find_tool, run
from machined.errors import InvalidInput

CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/sbin/busybox", "/usr/sbin/busybox")
DIRECTORIES = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "run": 0o755,
    "tmp": 0o1777,
    "etc": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
    "var/log": 0o755,
    "root": 0o700,
    "home": 0o755,
}
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
SHADOW = "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n"
PT_INTERP = 3


def find_busybox() -> str:
    for candidate in CANDIDATES:
        if os.path.isfile(candidate) and is_static_elf(candidate):
            return candidate
    found = find_tool("busybox")
    if found and is_static_elf(found):
        return found
    raise MissingTool(
        "a statically linked busybox is needed for --distro busybox (apt-get install busybox-static)"
    )


def is_static_elf(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is an ELF executable without a program interpreter."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF":
                return False
            is64 = header[4] == 2
            endian = "<" if header[5] == 1 else ">"
            if is64:
                (phoff,) = struct.unpack_from(endian + "Q", header, 0x20)
                phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
            else:
                (phoff,) = struct.unpack_from(endian + "I", header, 0x1C)
                phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x2A)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == PT_INTERP:
            return False
    return True


def busybox_version(busybox: str) -> str | None:
    """ "1.35.0" from the first line busybox prints ("BusyBox v1.35.0 (Debian …) multi-call …")."""
    first = run([busybox], capture=True, check=False).stdout.partition("\n")[0]
    match = re.search(r"BusyBox v(\d[\w.]*)", first)
    return match.group(1) if match else None


def applet_paths(listing: str) -> list[str]:
    """Relative paths from ``busybox --list-full`` output, unsafe ones dropped."""
    paths = []
    for line in listing.splitlines():
        rel = line.strip().lstrip("/")
        if not rel or "/" not in rel or ".." in rel.split("/"):  # drops /linuxrc
            continue
        paths.append(rel)
    return paths


class Busybox(Installer, distribution=Distribution.busybox):
    default_release = "static"
    tools = (("busybox", "busybox-static"),)

    @classmethod
    def validate(cls, config: BootstrapConfig) -> None:
        super().validate(config)
        if config.include:
            raise InvalidInput("--include makes no sense for --distro busybox (no package manager)")

    @classmethod
    def cache_key(cls, config: BootstrapConfig) -> str:
        return "busybox"

    @classmethod
    def source(cls, config: BootstrapConfig) -> str:
        return "busybox"

    @classmethod
    def os_release(cls, config: BootstrapConfig) -> OsRelease:
        version = busybox_version(find_busybox())
        return OsRelease(
            id="busybox",
            name="BusyBox",
            pretty_name=f"BusyBox {version}" if version else "BusyBox",
            version_id=version,
            home_url="https://busybox.net/",
        )

    @classmethod
    def commands(cls, context: Context) -> list[list[str]]:
        return [[find_busybox(), "--list-full"]]

    @classmethod
    def install(cls, context: Context) -> None:
        root = context.root
        busybox = find_busybox()
        progress = context.progress
        progress.step("installing busybox")
        for rel, mode in DIRECTORIES.items():
            path = root / rel
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)
        shutil.copy2(busybox, root / "bin/busybox")
        os.chmod(root / "bin/busybox", 0o755)
        progress.advance(1, (root / "bin/busybox").stat().st_size)

        listing = run([busybox, "--list-full"], capture=True).stdout
        for rel in applet_paths(listing):
            link = root / rel
            if link.name == "busybox" or link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
            progress.advance(1)
        if not (root / "bin/sh").exists():
            os.symlink("busybox", root / "bin/sh")

        etc = root / "etc"
        _write(etc / "passwd", PASSWD, 0o644)
        _write(etc / "group", GROUP, 0o644)
        _write(etc / "shadow", SHADOW, 0o640)
        _write(etc / "shells", "/bin/sh\n/bin/ash\n", 0o644)
        _write(etc / "profile", 'export PATH="/usr/sbin:/usr/bin:/sbin:/bin"\n', 0o644)


def _write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    os.chmod(path, mode)
