"""Snapshots of a machine: its writable layer and its definition at one moment.

A snapshot lives in ``/var/lib/pymachine/machines/NAME/snapshots/SNAP/``
(``layer/``: the copy of ``upper/``; ``definition``; ``snapshot.json``;
``index.json``, the sources' inodes for the next snapshot's links), on the
layer's own file system, and goes with the machine on ``remove``. It is made
in a hidden directory and renamed into place, so a killed snapshot leaves no
half snapshot under its name. How data is shared without a later write ever
reaching a snapshot: :mod:`machined.treecopy`.

A running machine is copied while its cgroup is frozen (systemd's
``FreezeUnit``), so the copy is one moment of the machine; where the cgroup
freezer is missing (cgroup v1 or hybrid hosts) the snapshot is refused
unless ``stop`` is asked for (stop, copy, start again). A restore is refused
while the machine runs; it swaps the new ``upper/`` in atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from machined import treecopy
from machined.errors import Conflict, InvalidInput, NotFound
from machined.machines import Machines
from machined.names import validate_machine_name, validate_snapshot_name
from machined.quiesce import quiesced
from machined.runtime import userns

SNAPSHOTS = "snapshots"
LAYER = "layer"
META = "snapshot.json"
INDEX = "index.json"
DEFINITION = "definition"
AUTO_PREFIX = "auto-"
TEMP_PREFIX = ".#"
NOW_ENV = "PYMACHINE_TEST_NOW"  # a fake clock (epoch seconds), for the retention tests


def now() -> float:
    """The time snapshots are stamped with (:data:`NOW_ENV` when set)."""
    fake = os.environ.get(NOW_ENV)
    return float(fake) if fake else time.time()


class SnapshotInfo:
    """One snapshot as ``pymachine snapshots`` shows it."""

    def __init__(self, machine: str, name: str, meta: dict, path: Path) -> None:
        self.machine = machine
        self.name = name
        self.path = path
        self.created = float(meta.get("created", 0))
        self.auto = bool(meta.get("auto", False))
        self.uid_base = int(meta.get("uid_base", 0))
        self.entries = int(meta.get("entries", 0))
        self.copied_bytes = int(meta.get("copied_bytes", 0))
        self.method = str(meta.get("method", ""))
        self.linked = int(meta.get("linked", 0))
        self.started_ns = int(meta.get("started_ns", 0))  # the real clock's, for the links

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "name": self.name,
            "created": self.created,
            "auto": self.auto,
            "entries": self.entries,
            "copied_bytes": self.copied_bytes,
            "linked": self.linked,
            "method": self.method,
        }


class Snapshots:
    """Snapshots of the machines on this host."""

    def __init__(self, machines: Machines | None = None) -> None:
        self.machines = machines or Machines()
        self.paths = self.machines.paths

    # --- places --------------------------------------------------------------
    def directory(self, name: str) -> Path:
        return self.paths.machine_state(name) / SNAPSHOTS

    def path(self, name: str, snap: str) -> Path:
        return self.directory(name) / validate_snapshot_name(snap)

    def _machine(self, name: str):
        validate_machine_name(name)
        definition = self.machines.load(name)  # NotFound when there is no such machine
        if definition.ephemeral:
            raise InvalidInput(
                f"machine '{name}' is ephemeral (Ephemeral=yes): its writes are thrown away "
                "at stop, there is nothing to snapshot"
            )
        return definition

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One snapshot operation on a machine at a time (a timer's and a user's)."""
        directory = self.directory(name)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- queries ---------------------------------------------------------------
    def list(self, name: str) -> list[SnapshotInfo]:
        self._machine(name)
        result = []
        try:
            entries = list(os.scandir(self.directory(name)))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            result.append(self._info(name, entry.name))
        return sorted(result, key=lambda s: (s.created, s.name))

    def info(self, name: str, snap: str) -> SnapshotInfo:
        self._machine(name)
        if not self.path(name, snap).is_dir():
            raise NotFound(f"machine '{name}' has no snapshot '{snap}'")
        return self._info(name, snap)

    def _info(self, name: str, snap: str) -> SnapshotInfo:
        path = self.directory(name) / snap
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = {}
        return SnapshotInfo(name, snap, meta if isinstance(meta, dict) else {}, path)

    # --- create ------------------------------------------------------------------
    def create(
        self, name: str, snap: str | None = None, *, stop: bool = False, auto: bool = False
    ) -> SnapshotInfo:
        """Snapshot machine NAME as SNAP (default: its time, ``auto-`` for the
        scheduler's). Frozen while it is copied if it runs; STOP: stopped instead."""
        self._machine(name)
        stamp = now()
        if snap is None:
            snap = self._free_name(name, stamp, auto)
        validate_snapshot_name(snap)
        if self.path(name, snap).exists():
            raise Conflict(f"machine '{name}' already has a snapshot '{snap}'")
        with self._locked(name), quiesced(self.machines, name, stop=stop, what="snapshot"):
            return self._copy(name, snap, stamp, auto)

    def _free_name(self, name: str, stamp: float, auto: bool) -> str:
        base = (AUTO_PREFIX if auto else "") + time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))
        candidate, n = base, 1
        while (self.directory(name) / candidate).exists():
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def _copy(self, name: str, snap: str, stamp: float, auto: bool) -> SnapshotInfo:
        state = self.paths.machine_state(name)
        directory = self.directory(name)
        target = directory / snap
        if target.exists():
            raise Conflict(f"machine '{name}' already has a snapshot '{snap}'")
        definition_text = self.paths.definition_file(name).read_text()
        previous = self._latest(name)
        link_dest = link_index = None
        trusted_before = 0
        if previous is not None:
            with contextlib.suppress(OSError, ValueError):
                link_index = {
                    k: tuple(v) for k, v in json.loads((previous.path / INDEX).read_text()).items()
                }
                link_dest = previous.path / LAYER
                trusted_before = previous.started_ns - treecopy.CTIME_MARGIN_NS
        started_ns = time.time_ns()
        tmp = directory / f"{TEMP_PREFIX}{snap}.{os.getpid()}"
        _remove_stale(directory)
        tmp.mkdir(mode=0o700)
        try:
            upper = state / "upper"
            if not upper.is_dir():
                upper.mkdir(parents=True)
            copied = treecopy.copy_tree(
                upper,
                tmp / LAYER,
                link_dest=link_dest,
                link_index=link_index,
                trusted_before_ns=min(trusted_before, started_ns),
            )
            (tmp / DEFINITION).write_text(definition_text)
            (tmp / INDEX).write_text(json.dumps(copied.index))
            method = "reflink" if copied.reflinked else "copy"
            if copied.linked:
                method += "+links"
            meta = {
                "created": stamp,
                "started_ns": started_ns,
                "auto": auto,
                "uid_base": layer_base(state),
                "entries": copied.entries,
                "copied_bytes": copied.bytes,
                "linked": copied.linked,
                "method": method,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._info(name, snap)

    def _latest(self, name: str) -> SnapshotInfo | None:
        """The newest snapshot made from the layer (to link unchanged files to)."""
        made = [s for s in self.list(name) if (s.path / INDEX).is_file()]
        return max(made, key=lambda s: (s.created, s.name)) if made else None

    # --- restore, remove -------------------------------------------------------------
    def restore(self, name: str, snap: str) -> SnapshotInfo:
        """Make the machine's layer and definition the snapshot's again (refused while it runs)."""
        self._machine(name)
        info = self.info(name, snap)
        if self.machines.is_running(name):
            raise Conflict(f"machine '{name}' is running; stop it before restoring a snapshot")
        from machined import definition, unitfile
        from machined.runtime import linux

        text = (info.path / DEFINITION).read_text()
        definition.from_text(name, text, str(info.path / DEFINITION))  # still valid here?
        state = self.paths.machine_state(name)
        upper = state / "upper"
        with self._locked(name):
            for stale in state.glob(".upper.restore.*"):  # a restore killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            new = state / f".upper.restore.{os.getpid()}"
            try:
                treecopy.copy_tree(info.path / LAYER, new)  # a copy: later writes stay out of it
                if upper.exists():
                    linux.rename_exchange(new, upper)
                else:
                    os.rename(new, upper)
                (state / userns.SHIFT_FILE).write_text(f"{info.uid_base}\n")  # start shifts it
                unitfile.write_atomic(self.paths.definition_file(name), text)
            finally:
                shutil.rmtree(new, ignore_errors=True)
            work = state / "work"
            shutil.rmtree(work, ignore_errors=True)  # overlayfs' scratch of the old layer
            work.mkdir(exist_ok=True)
        return info

    def remove(self, name: str, snap: str) -> None:
        self.info(name, snap)
        with self._locked(name):
            path = self.path(name, snap)
            hidden = path.parent / f"{TEMP_PREFIX}{snap}.removing.{os.getpid()}"
            os.rename(path, hidden)  # gone from the list at once, even if the removal is killed
            shutil.rmtree(hidden)

    def prune(self, name: str, rule) -> list[str]:
        """Remove the scheduler's snapshots (``auto-``) that RULE does not keep;
        the names removed. Snapshots a user named are never pruned."""
        from machined import retention

        auto = [s for s in self.list(name) if s.auto]
        _kept, pruned = retention.select(
            [(s.name, datetime.fromtimestamp(s.created)) for s in auto], rule
        )
        for snap in pruned:
            self.remove(name, snap)
        return pruned


def layer_base(state: Path) -> int:
    """The UID base ``upper/`` is owned by (``userns.own_layer``'s record)."""
    try:
        return int((state / userns.SHIFT_FILE).read_text())
    except (OSError, ValueError):
        return 0


def _remove_stale(directory: Path) -> None:
    """Hidden directories of snapshots whose process is gone (killed mid-copy)."""
    for entry in os.scandir(directory):
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        pid = entry.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(entry.path)
