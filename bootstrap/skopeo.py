"""skopeo, driven as the registry client (as mmdebstrap is driven for Debian).

skopeo does the registry protocol, auth files (``$REGISTRY_AUTH_FILE``,
``/run/containers/0/auth.json``, ``~/.docker/config.json``), token and basic
auth, TLS, mirrors from registries.conf, retries and the signature policy of
``/etc/containers/policy.json``; pymachine builds its argv (pure, unit-tested),
runs it, and turns its failures into the project's exit codes: a missing
repository, tag or digest is "not found" (4), a refused login or a corrupt
blob is a failure (1).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bootstrap.run import BootstrapError, require_tool, run
from machined.errors import InvalidInput, NotFound, PymachineError


@dataclass(frozen=True)
class Access:
    """How to reach a registry: TLS checking and credentials (skopeo finds the usual auth files itself)."""

    tls_verify: bool = True
    authfile: str | None = None
    creds: str | None = None  # "USER:PASSWORD", written to a private auth file, never on argv

    def options(self, side: str, authfile: str | None) -> list[str]:
        """skopeo options for one side of a copy (``src``/``dest``) or inspect (``""``)."""
        prefix = f"--{side}-" if side else "--"
        opts = []
        if not self.tls_verify:
            opts.append(f"{prefix}tls-verify=false")
        if authfile:
            opts.append(f"{prefix}authfile={authfile}")
        return opts


class AuthFailed(PymachineError):
    """The registry refused the credentials (or asked for some): exit 1."""


def classify(message: str, what: str) -> PymachineError:
    """One clear error for skopeo's stderr about ``what`` (a reference)."""
    text = message.lower()
    if any(
        s in text
        for s in (
            "manifest unknown",
            "name unknown",
            "repository name not known",
            "not found",
            "404",
            "no such host",
        )
    ) and not ("unauthorized" in text or "401" in text):
        return NotFound(f"{what}: no such image in the registry (manifest unknown)")
    if "unauthorized" in text or "authentication required" in text or "401" in text:
        return AuthFailed(f"{what}: the registry refused the credentials (401 unauthorized)")
    if "server gave http response to https client" in text:
        return PymachineError(f"{what}: the registry speaks plain HTTP: use --tls-verify=false")
    if "digest did not match" in text or "digest mismatch" in text:
        return PymachineError(f"{what}: a downloaded blob does not match its digest")
    if "connection refused" in text:
        return PymachineError(f"{what}: the registry refused the connection")
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return PymachineError(f"{what}: {lines[-1] if lines else 'skopeo failed'}")


def write_creds(path: str, registry: str, creds: str) -> None:
    token = base64.b64encode(creds.encode()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"auth": token}}}, f)


def inspect_argv(ref: str, access: Access, authfile: str | None) -> list[str]:
    return ["skopeo", "inspect", "--raw", "--retry-times", "2", *access.options("", authfile), ref]


def copy_argv(
    source: str,
    dest: str,
    *,
    src: Access | None = None,
    dst: Access | None = None,
    src_authfile: str | None = None,
    dst_authfile: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    argv = ["skopeo", "copy", "--retry-times", "2", *extra]
    if src is not None:
        argv += src.options("src", src_authfile)
    if dst is not None:
        argv += dst.options("dest", dst_authfile)
    return [*argv, source, dest]


class Skopeo:
    """Runs skopeo for one registry side; errors become :class:`PymachineError`s."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self.tool = require_tool("skopeo", "skopeo")

    @contextlib.contextmanager
    def session(self, registry: str) -> Iterator[str | None]:
        """The auth file for ``registry`` for the duration of a pull or push."""
        if self.access.creds is None:
            yield self.access.authfile
            return
        user, sep, _ = self.access.creds.partition(":")
        if not sep or not user:
            raise InvalidInput("--creds takes USER:PASSWORD")
        directory = tempfile.mkdtemp(prefix="pymachine-auth.")
        try:
            path = os.path.join(directory, "auth.json")
            write_creds(path, registry, self.access.creds)
            yield path
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def raw_manifest(self, ref: str, authfile: str | None) -> tuple[bytes, str]:
        """The manifest (or index) ``ref`` names, as the registry sent it, and its digest."""
        argv = inspect_argv(ref, self.access, authfile)
        argv[0] = self.tool
        # bytes, not text: the digest is of exactly what the registry sent
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise classify(proc.stderr.decode(errors="replace"), ref.removeprefix("docker://"))
        data = proc.stdout
        return data, "sha256:" + hashlib.sha256(data).hexdigest()

    def copy(
        self,
        argv: list[str],
        what: str,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        argv = [self.tool, *argv[1:]]
        lines: list[str] = []

        def collect(line: str) -> None:
            lines.append(line)
            if on_line is not None:
                on_line(line)

        try:
            run(argv, on_line=collect)
        except BootstrapError as exc:
            raise classify("\n".join(lines[-20:]), what) from exc


def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise PymachineError(f"{what}: the registry sent a manifest that is not JSON") from exc
