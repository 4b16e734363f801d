"""Scheduled snapshots and backups, as systemd timers, pruned by a retention rule.

``pymachine schedule NAME --every daily --keep 7d,4w,12m`` records the rule
in ``/etc/pymachine/schedules/NAME.json`` and enables
``pymachine-snapshot@NAME.timer`` (the templates shipped in ``units/``, an
``OnCalendar=`` drop-in per machine), so ``systemctl list-timers`` shows it
and systemd keeps the time (``Persistent=yes``: a run missed while the host
was off happens at the next boot). Each run is ``pymachine snapshot
--scheduled NAME`` (or ``backup --scheduled``): a snapshot ``auto-TIME`` (a
backup ``DIR/NAME-auto-TIME.tar.zst``), then every earlier one of the
schedule's that the rule does not keep is removed (:mod:`machined.retention`);
what a user made by hand is never pruned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from machined.errors import InvalidInput, NotFound, PymachineError
from machined.machines import Machines
from machined.names import validate_machine_name
from machined.paths import Paths

KINDS = ("snapshot", "backup")
DEFAULT_EVERY = {"snapshot": "daily", "backup": "weekly"}
DEFAULT_KEEP = "7d,4w,12m"
DROPIN = "50-pymachine.conf"
AUTO = "-auto-"
STAMP = "%Y%m%d-%H%M%S"


def timer(kind: str, name: str) -> str:
    return f"pymachine-{kind}@{name}.timer"


def service(kind: str, name: str) -> str:
    return f"pymachine-{kind}@{name}.service"


def config_file(machines: Machines, name: str) -> Path:
    return machines.paths.definitions / "schedules" / f"{name}.json"


def read(machines: Machines, name: str) -> dict[str, Any]:
    try:
        data = json.loads(config_file(machines, name).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{config_file(machines, name)}: unreadable: {exc}") from None
    return data if isinstance(data, dict) else {}


def _write(machines: Machines, name: str, data: dict[str, Any]) -> None:
    from machined.unitfile import write_atomic

    path = config_file(machines, name)
    if data:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    else:
        path.unlink(missing_ok=True)


def check_calendar(every: str) -> str:
    """EVERY as ``OnCalendar=`` takes it, checked by systemd's own parser."""
    if not every or not every.isprintable() or len(every) > 200:
        raise InvalidInput(f"invalid --every {every!r}: a systemd calendar event, e.g. daily")
    try:
        result = subprocess.run(
            ["systemd-analyze", "calendar", "--", every], capture_output=True, text=True
        )
    except FileNotFoundError:
        return every  # nothing to check with: systemd will say so when it loads the drop-in
    if result.returncode != 0:
        raise InvalidInput(
            f"invalid --every {every!r}: not a systemd calendar event "
            "(see systemd.time(7): daily, weekly, Mon *-*-* 03:00, hourly…)"
        )
    return every


def _unit_quote(word: str) -> str:
    """WORD as one argument of a unit file's command line."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _command(kind: str, name: str) -> str:
    from machined import package_parent

    argv = [sys.executable, "-I", "-c", _BOOT, package_parent(), kind, "--scheduled", name]
    return " ".join(_unit_quote(a) for a in argv)


# `python -I` (no environment, no user site): the pymachine that wrote the schedule
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from machined.cli import main; sys.exit(main(sys.argv[1:]))"
)


def enable(
    name: str,
    kind: str,
    *,
    every: str | None = None,
    keep: str | None = None,
    directory: str | None = None,
    with_image: bool = False,
    stop: bool = False,
    machines: Machines | None = None,
) -> dict[str, Any]:
    """Schedule KIND ("snapshot"/"backup") of machine NAME; returns its settings."""
    from machined import retention
    from machined.unitfile import write_atomic
    from machined.units import shipped_units

    machines = machines or Machines()
    validate_machine_name(name)
    machines.load(name)
    every = check_calendar(every or DEFAULT_EVERY[kind])
    rule = retention.parse_rule(keep or DEFAULT_KEEP)
    settings: dict[str, Any] = {"every": every, "keep": str(rule), "stop": stop}
    if kind == "backup":
        if not directory:
            raise InvalidInput("a backup schedule needs --backup-dir DIR")
        target = Path(directory).absolute()
        if not target.is_dir():
            raise NotFound(f"backup directory {target} does not exist")
        settings.update(directory=str(target), with_image=with_image)
    paths = machines.paths
    shipped = dict(shipped_units())
    for template in (f"pymachine-{kind}@.service", f"pymachine-{kind}@.timer"):
        current = paths.unit_files / template
        if not current.exists() or current.read_text() != shipped[template]:
            write_atomic(current, shipped[template])
    env = ""
    if paths.root != Paths().root:
        env = f"Environment={_unit_quote('PYMACHINE_ROOT=' + str(paths.root))}\n"
    write_atomic(
        paths.unit_files / f"{service(kind, name)}.d" / DROPIN,
        f"[Service]\nExecStart=\nExecStart={_command(kind, name)}\n{env}",
    )
    write_atomic(
        paths.unit_files / f"{timer(kind, name)}.d" / DROPIN,
        f"[Timer]\nOnCalendar=\nOnCalendar={every}\n",
    )
    wants = paths.unit_files / "timers.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / timer(kind, name)
    if not link.is_symlink():
        os.symlink(
            paths.unit_files / f"pymachine-{kind}@.timer", link
        )  # what `systemctl enable` does
    data = read(machines, name)
    data[kind] = settings
    _write(machines, name, data)
    machines.systemd.reload()
    machines.systemd.restart_unit(timer(kind, name))
    return settings


def disable(name: str, kind: str, *, machines: Machines | None = None) -> bool:
    """Stop scheduling KIND of NAME (its snapshots and backups stay); whether it was."""
    import shutil

    machines = machines or Machines()
    validate_machine_name(name)
    paths = machines.paths
    data = read(machines, name)
    was = data.pop(kind, None) is not None
    link = paths.unit_files / "timers.target.wants" / timer(kind, name)
    if link.is_symlink():
        was = True
        link.unlink()
    for unit in (timer(kind, name), service(kind, name)):
        shutil.rmtree(paths.unit_files / f"{unit}.d", ignore_errors=True)
    _write(machines, name, data)
    from machined.dbus import BusError

    with contextlib.suppress(BusError):  # not loaded
        machines.systemd.stop_unit(timer(kind, name))
    machines.systemd.reload()
    return was


def settings_of(machines: Machines, name: str, kind: str) -> dict[str, Any]:
    settings = read(machines, name).get(kind)
    if not isinstance(settings, dict):
        raise NotFound(f"machine '{name}' has no {kind} schedule (pymachine schedule)")
    return settings


def run_snapshot(name: str, *, machines: Machines | None = None) -> tuple[str, list[str]]:
    """One scheduled snapshot and its pruning: (snapshot made, snapshots removed)."""
    from machined import retention
    from machined.snapshots import Snapshots

    machines = machines or Machines()
    settings = settings_of(machines, name, "snapshot")
    rule = retention.parse_rule(str(settings.get("keep", DEFAULT_KEEP)))
    snapshots = Snapshots(machines)
    made = snapshots.create(name, auto=True, stop=bool(settings.get("stop")))
    return made.name, snapshots.prune(name, rule)


_BACKUP_RE = re.compile(r"(?P<name>.+)-auto-(?P<stamp>[0-9]{8}-[0-9]{6})(-[0-9]+)?\.tar\.(zst|gz)")


def run_backup(name: str, *, machines: Machines | None = None) -> tuple[str, list[str]]:
    """One scheduled backup and its pruning: (file written, files removed)."""
    import shutil

    from machined import backup, retention
    from machined.snapshots import now

    machines = machines or Machines()
    settings = settings_of(machines, name, "backup")
    rule = retention.parse_rule(str(settings.get("keep", DEFAULT_KEEP)))
    directory = Path(str(settings.get("directory", "")))
    if not directory.is_dir():
        raise PymachineError(f"backup directory {directory} does not exist")
    suffix = ".tar.zst" if shutil.which("zstd") else ".tar.gz"
    stamp = time.strftime(STAMP, time.localtime(now()))
    dest = directory / f"{name}{AUTO}{stamp}{suffix}"
    n = 1
    while dest.exists():
        n += 1
        dest = directory / f"{name}{AUTO}{stamp}-{n}{suffix}"
    backup.backup(
        name,
        str(dest),
        with_image=bool(settings.get("with_image")),
        stop=bool(settings.get("stop")),
        machines=machines,
    )
    items = []
    for entry in os.scandir(directory):
        match = _BACKUP_RE.fullmatch(entry.name)
        if match and match.group("name") == name and entry.is_file(follow_symlinks=False):
            items.append((entry.name, datetime.strptime(match.group("stamp"), STAMP)))
    _kept, pruned = retention.select(items, rule)
    for file in pruned:
        (directory / file).unlink(missing_ok=True)
    return dest.name, pruned
