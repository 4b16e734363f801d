"""The image store: directory trees under ``/var/lib/machines``.

Images live where ``machinectl list-images`` and ``systemd-nspawn -D`` look
for them, so the reference tools see pymachine's images too. They are
read-only lower layers: a machine only ever writes to its own overlay upper
layer under ``/var/lib/pymachine/machines/NAME``, so 100 machines from one
image cost the image once and creating a machine never copies an image.

pymachine's own facts about an image (where it came from, its size, the
default command of an OCI image) go to a JSON sidecar *outside* the tree,
``/var/lib/pymachine/images/NAME.json``, kept in step on rename, clone and
remove. Images that pymachine did not make (no sidecar) are listed all the same.

New images are built in a hidden temporary directory next to their final
place (``.#NAME.XXXX``, the prefix systemd uses for temporary files, so
``machinectl`` ignores it) and renamed into place at the end: a failed or
interrupted build never leaves a half image under the image's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from machined.errors import Conflict, InvalidInput, NotFound, PymachineError
from machined.names import validate_image_name
from machined.paths import Paths, private_dirs

TEMP_PREFIX = ".#"


@dataclass(frozen=True)
class ImageConfig:
    """What an image asks to run by default (from an OCI config); empty otherwise."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()  # "KEY=VALUE", in order
    working_directory: str | None = None
    user: str | None = None
    exposed_ports: tuple[str, ...] = ()  # "80/tcp", as the OCI config lists them
    stop_signal: str | None = None  # "SIGINT"

    @property
    def command(self) -> list[str]:
        """The default command line: Entrypoint followed by Cmd, as OCI runtimes do."""
        return [*self.entrypoint, *self.cmd]

    @property
    def environment_dict(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for item in self.environment:
            key, _, value = item.partition("=")
            result[key] = value
        return result

    def is_empty(self) -> bool:
        return self == ImageConfig()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("entrypoint", "cmd", "environment", "exposed_ports"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ImageConfig:
        if not data:
            return cls()

        def words(key: str) -> tuple[str, ...]:
            value = data.get(key) or []
            if not isinstance(value, list | tuple) or not all(isinstance(w, str) for w in value):
                raise InvalidInput(f"image config: {key} is not a list of strings: {value!r}")
            return tuple(value)

        def text(key: str) -> str | None:
            value = data.get(key) or None
            if value is not None and not isinstance(value, str):
                raise InvalidInput(f"image config: {key} is not a string: {value!r}")
            return value

        return cls(
            entrypoint=words("entrypoint"),
            cmd=words("cmd"),
            environment=words("environment"),
            working_directory=text("working_directory"),
            user=text("user"),
            exposed_ports=words("exposed_ports"),
            stop_signal=text("stop_signal"),
        )


@dataclass(frozen=True)
class ImageInfo:
    """An image of the store, as ``pymachine images`` shows it."""

    name: str
    path: Path
    size: int | None
    created: float
    used_by: list[str] = field(default_factory=list)
    source: str | None = None  # "busybox", "debian bookworm minbase", "tar FILE", "oci DIR" …
    origin: dict[str, Any] | None = None  # pull/pull-tar/commit: reference, digest, when

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "created": self.created,
            "used_by": list(self.used_by),
            "source": self.source,
            "origin": self.origin,
        }


class ImageStore:
    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.from_env()

    # --- locations ---------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.paths.images

    @property
    def meta_directory(self) -> Path:
        return self.paths.state / "images"

    def meta_file(self, name: str) -> Path:
        return self.meta_directory / f"{name}.json"

    # --- queries -----------------------------------------------------------
    def exists(self, name: str) -> bool:
        validate_image_name(name)
        return self.paths.image(name).is_dir()

    def path(self, name: str) -> Path:
        validate_image_name(name)
        path = self.paths.image(name)
        if not path.is_dir():
            raise NotFound(f"image '{name}' not found")
        return path

    def names(self) -> list[str]:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        return [
            e.name
            for e in entries
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
        ]

    def list(self) -> list[ImageInfo]:
        users = self.users()
        return [self._info(name, users.get(name, [])) for name in self.names()]

    def info(self, name: str) -> ImageInfo:
        self.path(name)
        return self._info(name, self.users().get(name, []))

    def _info(self, name: str, used_by: list[str]) -> ImageInfo:
        path = self.paths.image(name)
        meta = self.read_meta(name)
        st = path.stat()
        size = meta.get("size")
        if size is None or meta.get("size_mtime_ns") != st.st_mtime_ns:
            size = disk_usage(path)
            meta.update(size=size, size_mtime_ns=st.st_mtime_ns)
            with contextlib.suppress(OSError):
                self._write_meta(name, meta)
        created = meta.get("created") or st.st_mtime
        return ImageInfo(
            name=name,
            path=path,
            size=size,
            created=float(created),
            used_by=sorted(used_by),
            source=meta.get("source"),
            origin=meta.get("origin"),
        )

    def origin(self, name: str) -> dict[str, Any]:
        """Where a pulled or committed image came from ({} for others)."""
        self.path(name)
        origin = self.read_meta(name).get("origin")
        return origin if isinstance(origin, dict) else {}

    def origins(self) -> dict[str, dict[str, Any]]:
        """Image name → its origin, for every image that has one (the blob cache's roots)."""
        return {n: o for n in self.names() if (o := self.read_meta(n).get("origin"))}

    def config(self, name: str) -> ImageConfig:
        self.path(name)
        return ImageConfig.from_json(self.read_meta(name).get("config"))

    def users(self) -> dict[str, list[str]]:
        """Image name → machines whose definition names it."""
        try:
            from machined.definition import list_definitions
        except ImportError as exc:
            if exc.name not in ("machined.definition", None):
                raise
            return {}
        result: dict[str, list[str]] = {}
        for definition in list_definitions(self.paths):
            image = getattr(definition, "image", None)
            if image:
                result.setdefault(image, []).append(definition.name)
        return result

    def used_by(self, name: str) -> list[str]:
        return sorted(self.users().get(name, []))

    # --- changes -----------------------------------------------------------
    def remove(self, name: str) -> None:
        self.path(name)
        users = self.used_by(name)
        if users:
            raise Conflict(f"image '{name}' is used by machine(s): {', '.join(users)}")
        with self._lock():
            # Rename out of the way first: the name is free at once and a
            # removal that dies half-way leaves only a hidden temporary dir.
            doomed = self._aside(name)
            with contextlib.suppress(FileNotFoundError):
                self.meta_file(name).unlink()
        remove_tree(doomed)

    def rename(self, old: str, new: str) -> None:
        path = self.path(old)
        validate_image_name(new)
        users = self.used_by(old)
        if users:
            raise Conflict(f"image '{old}' is used by machine(s): {', '.join(users)}")
        with self._lock():
            target = self.paths.image(new)
            if target.exists() or target.is_symlink():
                raise Conflict(f"image '{new}' already exists")
            os.rename(path, target)
            meta = self.read_meta(old)
            if meta:
                meta["name"] = new
                self._write_meta(new, meta)
            with contextlib.suppress(FileNotFoundError):
                self.meta_file(old).unlink()

    def clone(self, source: str, new: str) -> Path:
        """A full, independent copy (``cp -a --reflink=auto``, so cheap on btrfs/xfs).

        Machines never need this (they are overlays); it is for deriving a new
        image to modify.
        """
        src = self.path(source)
        validate_image_name(new)
        if self.exists(new):
            raise Conflict(f"image '{new}' already exists")
        from bootstrap.run import run

        meta = self.read_meta(source)
        meta.pop("size_mtime_ns", None)
        meta["source"] = f"clone of {source}"
        with self.staging(new) as tmp:
            tmp.rmdir()
            run(["cp", "-a", "--reflink=auto", "--", str(src), str(tmp)], capture=True)
            self.commit(new, tmp, meta=meta)
        return self.paths.image(new)

    # --- building new images ----------------------------------------------
    @contextlib.contextmanager
    def staging(self, name: str, *, replace: bool = False) -> Iterator[Path]:
        """A fresh temporary directory next to where image ``name`` will go.

        Fill it, then call :meth:`commit`. If the block raises (or is
        interrupted), the directory is removed, mounts under it first.
        ``replace``: ``name`` may exist (``commit(replace=True)`` swaps it).
        """
        validate_image_name(name)
        if self.exists(name) and not replace:
            raise Conflict(f"image '{name}' already exists")
        private_dirs(self.directory)  # the new tree (set-user-ID files too) stays root's
        self.clean_stale()
        tmp = Path(
            tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}.{os.getpid()}.", dir=self.directory)
        )
        os.chmod(tmp, 0o755)  # the tree's root is the container's "/" (and apt's _apt reads it)
        try:
            yield tmp
        except BaseException:
            if tmp.exists() or tmp.is_symlink():
                remove_tree(tmp)
            raise

    def commit(
        self,
        name: str,
        tmp: Path,
        *,
        meta: dict[str, Any] | None = None,
        config: ImageConfig | None = None,
        replace: bool = False,
    ) -> Path:
        """Rename a filled staging dir to image ``name`` and write its sidecar.

        ``replace``: an existing image of that name is renamed out of the way
        first (the swap happens under the store's lock; a reader sees the old
        image or the new one, never a mix) and removed afterwards.
        """
        meta = dict(meta or {})
        meta["name"] = name
        meta.setdefault("created", time.time())
        if config is not None and not config.is_empty():
            meta["config"] = config.to_json()
        if stat.S_IMODE(os.lstat(tmp).st_mode) == 0o700:  # still mkdtemp's mode
            os.chmod(tmp, 0o755)
        meta["size"] = disk_usage(tmp)
        doomed = None
        with self._lock():
            target = self.paths.image(name)
            if target.exists() or target.is_symlink():
                if not replace:
                    raise Conflict(f"image '{name}' already exists")
                doomed = self._aside(name)
            self._write_meta(name, meta)
            os.rename(tmp, target)
            meta["size_mtime_ns"] = target.stat().st_mtime_ns
            self._write_meta(name, meta)
        if doomed is not None:
            remove_tree(doomed)
        return target

    def _aside(self, name: str) -> Path:
        """Rename image ``name`` to a hidden temporary name (caller holds the lock)."""
        doomed = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}.", dir=self.directory))
        doomed.rmdir()
        os.rename(self.paths.image(name), doomed)
        return doomed

    def clean_stale(self) -> None:
        """Remove temporary dirs left by builds that were killed (their PID is gone)."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX):
                continue
            parts = entry.name[len(TEMP_PREFIX) :].split(".")
            pid = next((int(p) for p in parts[1:] if p.isdigit()), None)
            if pid is not None and _pid_alive(pid):
                continue
            with contextlib.suppress(OSError, PymachineError):
                remove_tree(Path(entry.path))

    # --- sidecar -------------------------------------------------------------
    def read_meta(self, name: str) -> dict[str, Any]:
        try:
            with open(self.meta_file(name)) as f:
                data = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def set_config(self, name: str, config: ImageConfig) -> None:
        self.path(name)
        meta = self.read_meta(name)
        if config.is_empty():
            meta.pop("config", None)
        else:
            meta["config"] = config.to_json()
        self._write_meta(name, meta)

    def _write_meta(self, name: str, meta: dict[str, Any]) -> None:
        private_dirs(self.paths.state, self.meta_directory)
        target = self.meta_file(name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.meta_directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        private_dirs(self.paths.state, self.meta_directory, self.directory)
        with open(self.meta_directory / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


# --- helpers -----------------------------------------------------------------


def disk_usage(path: Path) -> int:
    """Bytes allocated to the tree (like ``du -s``), hard links counted once, one file system."""
    seen: set[tuple[int, int]] = set()
    total = 0
    root_dev = os.lstat(path).st_dev
    stack = [os.fspath(path)]
    total += os.lstat(path).st_blocks * 512
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != root_dev:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mount_point = line.split()[4]
                mount_point = (
                    mount_point.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                )
                if mount_point == prefix or mount_point.startswith(prefix + "/"):
                    found.append(mount_point)
    except FileNotFoundError:
        return []
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


_MNT_DETACH = 2
_libc: ctypes.CDLL | None = None


def _umount(target: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that first detaches anything mounted below ``path``.

    A failed debootstrap/mmdebstrap can leave /proc, /dev or a bind-mounted
    package cache mounted inside its target; a plain rmtree would descend into
    them (and empty the cache, or worse). If something stays mounted, refuse.
    """
    for mount_point in mounts_under(path):
        with contextlib.suppress(OSError):
            _umount(mount_point)
    left = mounts_under(path)
    if left:
        raise PymachineError(f"not removing {path}: still mounted below it: {', '.join(left)}")

    def onerror(func: Any, failed: str, exc_info: Any) -> None:
        # Make read-only dirs writable and retry once; ignore vanished entries.
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if isinstance(exc, PermissionError):
            parent = os.path.dirname(failed)
            with contextlib.suppress(OSError):
                os.chmod(parent, 0o700)
                func(failed)
                return
        raise exc

    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    for attempt in range(5):
        try:
            shutil.rmtree(path, onerror=onerror)
            return
        except OSError as exc:  # something still wrote into it (a dying tool's child)
            if attempt == 4 or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            time.sleep(0.2 * (attempt + 1))
