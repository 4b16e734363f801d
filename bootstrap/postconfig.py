"""Post-configuration of a fresh rootfs so it runs well as a container.

Done for every distribution after its own tool finished: an empty
``/etc/machine-id`` (systemd fills it at first boot, nspawn-style managers
pass one in), ``/etc/hostname``, ``/etc/hosts`` and ``/etc/resolv.conf``
rendered from ``templates/rootfs/``, an ``/etc/os-release`` when the
distribution has none (busybox), ``pts/N`` in ``/etc/securetty`` where that
file exists (logins on the container console), and systemd-networkd enabled
when the image has it (it ships ``80-container-host0.network`` and so
configures the container's ``host0`` veth by itself).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SECURETTY = ("console", *(f"pts/{i}" for i in range(10)))


@dataclass(frozen=True)
class OsRelease:
    id: str
    name: str
    pretty_name: str
    version_id: str | None = None
    home_url: str | None = None


def _environment():  # jinja2 costs ~80 ms to import: only when a rootfs is written
    import jinja2

    from machined.resources import templates_dir

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "rootfs")),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def render(template: str, **values: object) -> str:
    return _environment().get_template(template).render(**values)


def host_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The host's nameservers that also work from another network namespace (no loopback)."""
    servers = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if not address.is_loopback:
                servers.append(parts[1])
    return servers


def _replace(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``path`` inside a rootfs, replacing a symlink rather than following it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def configure(
    root: Path,
    *,
    hostname: str,
    nameservers: Sequence[str] | None = None,
    os_release: OsRelease | None = None,
    enable_networkd: bool = True,
) -> None:
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    env = _environment()

    _replace(etc / "machine-id", "", 0o444)
    _replace(etc / "hostname", env.get_template("hostname.j2").render(hostname=hostname))
    _replace(etc / "hosts", env.get_template("hosts.j2").render(hostname=hostname))
    if nameservers is None:
        nameservers = host_nameservers()
    _replace(
        etc / "resolv.conf",
        env.get_template("resolv.conf.j2").render(nameservers=list(nameservers), search=[]),
    )

    has_os_release = (etc / "os-release").exists() or (root / "usr/lib/os-release").exists()
    if not has_os_release and os_release is not None:
        _replace(
            etc / "os-release",
            env.get_template("os-release.j2").render(
                id=os_release.id,
                name=os_release.name,
                pretty_name=os_release.pretty_name,
                version_id=os_release.version_id,
                home_url=os_release.home_url,
            ),
        )

    securetty = etc / "securetty"
    if securetty.is_file() and not securetty.is_symlink():
        present = set(securetty.read_text().split())
        missing = [tty for tty in SECURETTY if tty not in present]
        if missing:
            with open(securetty, "a") as f:
                f.write("".join(f"{tty}\n" for tty in missing))

    if enable_networkd:
        _enable_unit(root, "systemd-networkd.service", "multi-user.target")


def _enable_unit(root: Path, unit: str, target: str) -> bool:
    """Enable a unit the image ships, as ``systemctl --root`` would, if it is there."""
    for directory in ("usr/lib/systemd/system", "lib/systemd/system"):
        candidate = root / directory / unit
        if candidate.is_file() and not candidate.is_symlink():
            break
    else:
        return False
    wants = root / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.is_symlink() and not link.exists():
        os.symlink(f"/{directory}/{unit}", link)
    return True
