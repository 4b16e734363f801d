"""``pymachine pull-tar URL NAME``: a tar image from a URL, verified as importctl does.

``--verify=checksum``: ``SHA256SUMS`` beside the URL must list the file's
name with the sha256 of what was downloaded; ``--verify=signature`` (the
default, as importctl's): ``SHA256SUMS.gpg`` must also be a good detached
signature of it by a key of the keyring (``gpgv``; ``--keyring`` or
systemd-importd's ``import-pubring.gpg``). Nothing is unpacked before the
checks pass, so nothing lands in the store otherwise.

The download goes to ``/var/cache/pymachine/downloads/`` under a name made
from the URL; an interrupted one is resumed by the next pull (an HTTP range
request), a finished one that failed its checksum is thrown away.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from bootstrap.progress import Progress
from bootstrap.run import require_tool
from bootstrap.tarimport import extract
from machined.errors import InvalidInput, NotFound, PymachineError
from machined.images import ImageStore
from machined.names import validate_image_name

KEYRINGS = ("/etc/systemd/import-pubring.gpg", "/usr/lib/systemd/import-pubring.gpg")
VERIFY_MODES = ("no", "checksum", "signature")
CHUNK = 1 << 20
TIMEOUT = 60


class VerificationFailed(PymachineError):
    """The checksum or signature did not check out (exit 1)."""


def check_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"invalid URL {url!r}: http:// or https:// only")
    name = parts.path.rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise InvalidInput(f"invalid URL {url!r}: it names no file")
    return parts


def beside(url: str, name: str) -> str:
    """The URL of ``name`` in the same directory as ``url`` (SHA256SUMS, SHA256SUMS.gpg)."""
    return urllib.parse.urljoin(url, name)


def expected_sha256(sums: str, filename: str) -> str:
    """The sha256 SHA256SUMS lists for ``filename`` (``HEX  NAME`` or ``HEX *NAME``)."""
    for line in sums.splitlines():
        fields = line.strip().split(None, 1)
        if len(fields) != 2:
            continue
        digest, name = fields
        if name.lstrip("*").removeprefix("./") == filename and len(digest) == 64:
            try:
                int(digest, 16)
            except ValueError:
                continue
            return digest.lower()
    raise VerificationFailed(f"SHA256SUMS does not list {filename}")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp:// too."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise PymachineError(f"{req.full_url}: redirected to {newurl}: http(s) only")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _open(url: str, offset: int = 0):
    request = urllib.request.Request(url, headers={"User-Agent": "pymachine"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url}: not found (404)") from exc
        if exc.code == 416 and offset:
            return None  # the partial file is already complete
        raise PymachineError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PymachineError(f"{url}: cannot download: {reason}") from exc


def fetch_small(url: str, limit: int = 1 << 20) -> bytes:
    response = _open(url)
    with response:
        data = response.read(limit + 1)
    if len(data) > limit:
        raise VerificationFailed(f"{url}: larger than {limit} bytes")
    return data


def download(url: str, partial: Path, progress: Progress) -> None:
    """Download ``url`` into ``partial``, continuing what an earlier try left there."""
    offset = partial.stat().st_size if partial.exists() else 0
    response = _open(url, offset)
    if response is None:
        return
    with response:
        resumed = offset and response.status == 206
        total = response.headers.get("Content-Length")
        total = int(total) + (offset if resumed else 0) if total and total.isdigit() else None
        progress.step(
            f"downloading {url}" + (f" (resuming at {offset} bytes)" if resumed else ""), total=None
        )
        progress.set_bytes(offset if resumed else 0)
        with open(partial, "ab" if resumed else "wb") as out:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    progress.add_bytes(len(chunk))
            except (http.client.HTTPException, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise
                raise PymachineError(
                    f"{url}: download interrupted ({exc!r}); pull again to resume"
                ) from exc
    size = partial.stat().st_size
    if total is not None and size != total:
        raise PymachineError(
            f"{url}: download ended early ({size} of {total} bytes); pull again to resume"
        )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_keyring() -> str:
    for candidate in KEYRINGS:
        if os.path.isfile(candidate):
            return candidate
    raise InvalidInput(
        "--verify=signature needs a keyring: none of "
        f"{', '.join(KEYRINGS)} exists (use --keyring FILE or --verify=checksum)"
    )


def verify_signature(sums: bytes, signature: bytes, keyring: str) -> None:
    """gpgv: a good signature of ``sums`` by a key of ``keyring``, or VerificationFailed."""
    gpgv = require_tool("gpgv", "gpgv")
    if not os.path.isfile(keyring):
        raise InvalidInput(f"keyring {keyring}: no such file")
    with tempfile.TemporaryDirectory(prefix="pymachine-verify.") as tmp:
        data, sig = Path(tmp) / "SHA256SUMS", Path(tmp) / "SHA256SUMS.gpg"
        data.write_bytes(sums)
        sig.write_bytes(signature)
        proc = subprocess.run(
            [gpgv, "--keyring", os.path.abspath(keyring), str(sig), str(data)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, "GNUPGHOME": tmp},
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["bad signature"])[-1]
        raise VerificationFailed(f"SHA256SUMS: the signature does not check out ({last})")


def pull_tar(
    url: str,
    name: str,
    *,
    verify: str = "signature",
    keyring: str | None = None,
    force: bool = False,
    allow_devices: bool = False,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Path:
    from bootstrap.pull import check_replaceable

    store = store or ImageStore()
    progress = progress or Progress()
    if verify not in VERIFY_MODES:
        raise InvalidInput(f"invalid --verify={verify}: use no, checksum or signature")
    parts = check_url(url)
    filename = parts.path.rsplit("/", 1)[-1]
    validate_image_name(name)
    check_replaceable(store, name, force)
    if verify == "signature":
        keyring = keyring or default_keyring()
    started = time.monotonic()

    expected = None
    if verify != "no":
        sums = fetch_small(beside(url, "SHA256SUMS"))
        if verify == "signature":
            assert keyring is not None
            verify_signature(sums, fetch_small(beside(url, "SHA256SUMS.gpg")), keyring)
        expected = expected_sha256(sums.decode(errors="replace"), filename)

    downloads = store.paths.cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".partial")
    download(url, partial, progress)
    digest = sha256_of(partial)
    if expected is not None and digest != expected:
        partial.unlink()  # a complete file with the wrong content: never resume it
        raise VerificationFailed(
            f"{filename}: sha256 {digest} does not match SHA256SUMS ({expected})"
        )
    try:
        with store.staging(name, replace=force) as staging:
            progress.step(f"unpacking {filename}")
            with open(partial, "rb") as f:
                stats = extract(f, staging, allow_devices=allow_devices, progress=progress)
            meta = {
                "source": f"url {url}",
                "origin": {
                    "url": url,
                    "sha256": digest,
                    "verify": verify,
                    "pulled_at": time.time(),
                },
            }
            check_replaceable(store, name, force)
            path = store.commit(name, staging, meta=meta, replace=force)
    finally:  # complete by now: nothing to resume
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    checked = {"no": "not verified", "checksum": "checksum verified"}.get(verify, "signed")
    progress.finish(
        f"image '{name}' pulled from {url} ({checked}): {stats.entries} entries in "
        f"{time.monotonic() - started:.1f}s"
    )
    return path
