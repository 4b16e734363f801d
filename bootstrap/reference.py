"""Image references as podman and skopeo write them, and short-name resolution.

``alpine`` → each registry of ``unqualified-search-registries`` in
``/etc/containers/registries.conf`` (podman's order), else ``docker.io``;
``docker.io/alpine`` → ``docker.io/library/alpine``; no tag and no digest →
``:latest``. The grammar is the distribution project's (``reference.go``):
a domain is the first component when it holds a ``.`` or ``:`` or is
``localhost``; path components are lower case; tags are ``\\w[\\w.-]{0,127}``;
digests ``ALGO:HEX``. Pure logic: no network, nothing run.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from machined.errors import InvalidInput

DEFAULT_REGISTRY = "docker.io"
REGISTRIES_CONF = "/etc/containers/registries.conf"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


@dataclass(frozen=True)
class Reference:
    """A fully qualified reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def transport(self) -> str:
        """skopeo's name for it."""
        return f"docker://{self}"

    def pinned(self, digest: str) -> Reference:
        """The same repository at exactly ``digest`` (what a pull copies once it looked)."""
        return Reference(self.domain, self.path, None, digest)

    @property
    def default_name(self) -> str:
        """The image name a pull gives when no --name is given: the last path component."""
        return self.path.rsplit("/", 1)[-1]


def _split(text: str) -> tuple[str | None, str, str | None, str | None]:
    """(domain or None, path, tag, digest) of a reference, validated."""
    if not text or len(text) > 255 or text != text.strip() or text.startswith("-"):
        raise InvalidInput(f"invalid image reference {text!r}")
    if text.startswith(("docker://", "oci:", "dir:", "containers-storage:")):
        if not text.startswith("docker://"):
            raise InvalidInput(f"invalid image reference {text!r}: only registries (docker://)")
        text = text[len("docker://") :]
    remainder, _, digest = text.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise InvalidInput(f"invalid image reference {text!r}: bad digest {digest!r}")
    tag = None
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        remainder, _, tag = remainder.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise InvalidInput(f"invalid image reference {text!r}: bad tag {tag!r}")
    parts = remainder.split("/")
    domain = None
    if len(parts) > 1 and (
        "." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")
    ):
        domain = parts.pop(0)
        if not _DOMAIN.fullmatch(domain):
            raise InvalidInput(f"invalid image reference {text!r}: bad registry {domain!r}")
    if not parts or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise InvalidInput(
            f"invalid image reference {text!r}: repository names are lower-case "
            "letters, digits and separators (. _ __ -)"
        )
    return domain, "/".join(parts), tag or None, digest or None


def _qualify(domain: str, path: str, tag: str | None, digest: str | None) -> Reference:
    if domain in ("docker.io", "index.docker.io") and "/" not in path:
        path = f"library/{path}"
    if domain == "index.docker.io":
        domain = "docker.io"
    if tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def search_registries(conf: str | os.PathLike[str] = REGISTRIES_CONF) -> list[str]:
    """``unqualified-search-registries`` of registries.conf (v2 TOML), [] if none/unreadable."""
    try:
        with open(conf, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return []
    found = data.get("unqualified-search-registries") or []
    return [r for r in found if isinstance(r, str) and _DOMAIN.fullmatch(r)]


def candidates(text: str, conf: str | os.PathLike[str] = REGISTRIES_CONF) -> list[Reference]:
    """Where ``text`` may be: one reference if qualified, else one per search registry."""
    domain, path, tag, digest = _split(text)
    if domain is not None:
        return [_qualify(domain, path, tag, digest)]
    registries = search_registries(conf) or [DEFAULT_REGISTRY]
    return [_qualify(r, path, tag, digest) for r in registries]


def parse(text: str) -> Reference:
    """A qualified reference (push destinations must name their registry)."""
    domain, path, tag, digest = _split(text)
    if domain is None:
        raise InvalidInput(
            f"invalid destination {text!r}: name the registry (e.g. localhost:5000/{path})"
        )
    return _qualify(domain, path, tag, digest)
