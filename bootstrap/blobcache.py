"""The content-addressed blob cache every pulled, committed and pushed image shares.

One OCI image layout, ``/var/lib/pymachine/oci`` (state, not cache: a
committed image's push needs its base layers from here). skopeo copies into
it (``oci:DIR:TAG``) and skips every blob it already holds, so a second image
on the same base downloads only its own layers; a pull killed half-way leaves
its finished blobs for the next pull to reuse. Images record the manifest
digest they came from in their sidecar (:mod:`machined.images`); a blob no
recorded manifest reaches is garbage for :meth:`BlobCache.prune`.

Tags in ``index.json`` are only handles for one skopeo run (``pull-…``,
``push-…``) and are dropped right after; the sidecars are the roots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bootstrap.oci import INDEX_TYPES, Layout
from machined.errors import InvalidInput, PymachineError
from machined.paths import Paths

LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


class BlobCache:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()
        self.root = self.paths.state / "oci"

    # --- the layout ------------------------------------------------------------
    def ensure(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # blobs of private images too
        if not (self.root / "oci-layout").exists():
            (self.root / "oci-layout").write_text(json.dumps(LAYOUT_VERSION))
        if not (self.root / "index.json").exists():
            self._write_index({"schemaVersion": 2, "manifests": []})

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer of index.json (and one pruner) at a time."""
        self.ensure()
        with open(self.paths.state / ".oci.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def transport(self, tag: str) -> str:
        return f"oci:{self.root}:{tag}"

    def layout(self) -> Layout:
        return Layout(self.root)

    # --- blobs -----------------------------------------------------------------
    def blob(self, digest: str) -> Path:
        return self.root / Layout.blob_path(digest)

    def has(self, digest: str) -> bool:
        return self.blob(digest).is_file()

    def read_json(self, digest: str) -> Any:
        return self.layout().read_json(Layout.blob_path(digest), digest)

    def put(self, data: bytes) -> str:
        """Store ``data`` (a manifest or config) and return its digest."""
        with self.writer() as w:
            w.write(data)
        return w.digest

    @contextlib.contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        """A blob written through a hidden temporary file, renamed to its digest at the end."""
        self.ensure()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root / "blobs" / "sha256")
        writer = BlobWriter(os.fdopen(fd, "wb"))
        try:
            yield writer
            writer.file.close()
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.blob(writer.digest))
        finally:
            writer.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- index.json --------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "index.json").read_text())
        except (OSError, ValueError):
            return {"schemaVersion": 2, "manifests": []}
        return data if isinstance(data, dict) else {"schemaVersion": 2, "manifests": []}

    def _write_index(self, index: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".index.", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.root / "index.json")

    def tagged(self, tag: str) -> dict[str, Any]:
        """The descriptor ``tag`` names (after a skopeo copy into the cache)."""
        for descriptor in self._read_index().get("manifests") or []:
            if (descriptor.get("annotations") or {}).get(REF_NAME) == tag:
                return descriptor
        raise PymachineError(f"the blob cache lost tag {tag!r}")

    def tag(self, tag: str, descriptor: dict[str, Any]) -> None:
        index = self._read_index()
        self._drop(index, tag)
        entry = {k: v for k, v in descriptor.items() if k in ("mediaType", "digest", "size")}
        entry["annotations"] = {REF_NAME: tag}
        index.setdefault("manifests", []).append(entry)
        self._write_index(index)

    def untag(self, tag: str) -> None:
        index = self._read_index()
        if self._drop(index, tag):
            self._write_index(index)

    @staticmethod
    def _drop(index: dict[str, Any], tag: str) -> bool:
        before = index.get("manifests") or []
        after = [d for d in before if (d.get("annotations") or {}).get(REF_NAME) != tag]
        index["manifests"] = after
        return len(after) != len(before)

    # --- reachability and pruning ----------------------------------------------------
    def reachable(self, digest: str) -> set[str]:
        """Every blob a manifest (or index) reaches, itself included; missing ones skipped."""
        seen: set[str] = set()
        pending = [digest]
        while pending:
            current = pending.pop()
            if current in seen or not self.has(current):
                continue
            seen.add(current)
            try:
                document = self.read_json(current)
            except InvalidInput:
                continue
            if not isinstance(document, dict):
                continue
            if document.get("mediaType") in INDEX_TYPES or "manifests" in document:
                pending += [d["digest"] for d in document.get("manifests") or []]
            elif "layers" in document:
                config = document.get("config") or {}
                if "digest" in config:
                    seen.add(config["digest"])
                seen.update(d["digest"] for d in document.get("layers") or [] if "digest" in d)
        return seen

    def prune(self, roots: list[str]) -> tuple[int, int]:
        """Remove blobs no root manifest reaches, and dead tags. Returns (blobs, bytes)."""
        removed = freed = 0
        with self.locked():
            keep: set[str] = set()
            for digest in roots:
                keep |= self.reachable(digest)
            index = self._read_index()
            index["manifests"] = [
                d for d in index.get("manifests") or [] if d.get("digest") in keep
            ]
            self._write_index(index)
            # what a killed skopeo left: its temporary blob files in the layout's root
            for leftover in self.root.glob("oci-put-blob*"):
                with contextlib.suppress(FileNotFoundError):
                    freed += leftover.stat().st_size
                    leftover.unlink()
                    removed += 1
            directory = self.root / "blobs" / "sha256"
            for entry in os.scandir(directory):
                if f"sha256:{entry.name}" in keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    size = entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    removed += 1
                    freed += size
        return removed, freed


REF_NAME = "org.opencontainers.image.ref.name"


class BlobWriter:
    """A file that hashes what is written to it (the blob's digest is its sha256)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()
