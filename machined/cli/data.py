"""Data verbs: snapshot, snapshots, restore, backup, restore-backup, schedule.

Argument handling and output only; the logic is in :mod:`machined.snapshots`,
:mod:`machined.backup` and :mod:`machined.schedule`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def cmd_snapshot(args: argparse.Namespace) -> int:
    from machined.errors import InvalidInput

    words = args.words
    if args.scheduled:
        if len(words) != 1:
            raise InvalidInput("usage: pymachine snapshot --scheduled NAME")
        from machined import schedule

        made, pruned = schedule.run_snapshot(words[0])
        print(f"Snapshot {made} of {words[0]} made; pruned: {', '.join(pruned) or 'none'}.")
        return 0
    from machined.snapshots import Snapshots

    if len(words) == 3 and words[0] == "remove":
        Snapshots().remove(words[1], words[2])
        return 0
    if len(words) not in (1, 2):
        raise InvalidInput(
            "usage: pymachine snapshot NAME [SNAP] [--stop] | pymachine snapshot remove NAME SNAP"
        )
    info = Snapshots().create(words[0], words[1] if len(words) == 2 else None, stop=args.stop)
    print(info.name)
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    from machined.cli.output import human_bytes, print_json, print_table
    from machined.snapshots import Snapshots

    snapshots = Snapshots().list(args.name)
    if args.json:
        print_json([s.to_json() for s in snapshots])
        return 0
    rows = [
        (
            s.name,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
            "auto" if s.auto else "manual",
            s.entries,
            human_bytes(s.copied_bytes),
            s.method,
        )
        for s in snapshots
    ]
    print_table(
        ("NAME", "CREATED", "KIND", "ENTRIES", "COPIED", "METHOD"),
        rows,
        legend=f"{len(rows)} snapshots listed.",
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from machined.snapshots import Snapshots

    Snapshots().restore(args.name, args.snap)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from machined.errors import InvalidInput

    if args.scheduled:
        if args.file is not None:
            raise InvalidInput("usage: pymachine backup --scheduled NAME")
        from machined import schedule

        written, pruned = schedule.run_backup(args.name)
        print(f"Backup {written} of {args.name} written; pruned: {', '.join(pruned) or 'none'}.")
        return 0
    if args.file is None:
        raise InvalidInput("usage: pymachine backup NAME FILE|-")
    if args.file == "-" and sys.stdout.isatty():
        raise InvalidInput("refusing to write a backup to a terminal")
    from machined import backup

    result = backup.backup(
        args.name,
        args.file,
        with_image=args.with_image,
        compression=args.compress,
        stop=args.stop,
        snapshot=args.snapshot,
    )
    if result["outside_range"]:
        print(
            f"pymachine: warning: {result['outside_range']} owners outside the machine's "
            "UID range were stored as 65534 (nobody)",
            file=sys.stderr,
        )
    return 0


def cmd_restore_backup(args: argparse.Namespace) -> int:
    from machined import backup

    if args.file == "-" and sys.stdin.isatty():
        from machined.errors import InvalidInput

        raise InvalidInput("refusing to read a backup from a terminal: pipe one in")

    result = backup.restore(args.file, args.name, allow_devices=args.allow_devices)
    extra = f" (image '{result['image']}' restored too)" if result["image_restored"] else ""
    print(f"Machine {result['machine']} restored{extra}.")
    for line in result["warnings"]:
        print(f"pymachine: warning: the restored machine {line}", file=sys.stderr)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from machined import schedule
    from machined.machines import Machines

    kind = "backup" if args.backup_dir or args.backup else "snapshot"
    machines = Machines()
    if args.off:
        if not schedule.disable(args.name, kind, machines=machines):
            print(f"Machine {args.name} had no {kind} schedule.")
        return 0
    if args.every is None and args.keep is None and args.backup_dir is None:
        machines.load(args.name)
        data = schedule.read(machines, args.name)
        for key in schedule.KINDS:
            settings = data.get(key)
            if settings:
                where = f" into {settings['directory']}" if key == "backup" else ""
                print(
                    f"{key}: every {settings['every']}, keep {settings['keep']}{where} "
                    f"({schedule.timer(key, args.name)})"
                )
        if not data:
            print(f"Machine {args.name} has no schedule.")
        return 0
    settings = schedule.enable(
        args.name,
        kind,
        every=args.every,
        keep=args.keep,
        directory=args.backup_dir,
        with_image=args.with_image,
        stop=args.stop,
        machines=machines,
    )
    print(
        f"Scheduled {kind}s of {args.name}: every {settings['every']}, keep {settings['keep']} "
        f"({schedule.timer(kind, args.name)})."
    )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "snapshot",
        help="snapshot a machine's writable layer and definition (or: snapshot remove NAME SNAP)",
        description="Copy the machine's writable layer and definition as snapshot SNAP "
        "(default: the time). A running machine is frozen for the copy; where the cgroup "
        "freezer is missing, --stop stops it for the copy and starts it again. "
        "'pymachine snapshot remove NAME SNAP' removes a snapshot.",
    )
    p.add_argument("words", nargs="+", metavar="NAME [SNAP]")
    p.add_argument("--stop", action="store_true", help="stop a running machine for the copy")
    p.add_argument("--scheduled", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_snapshot)

    p = subparsers.add_parser("snapshots", help="list a machine's snapshots")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_snapshots)

    p = subparsers.add_parser(
        "restore",
        help="make a stopped machine's layer and definition a snapshot's again",
        description="Replace the machine's writable layer and definition by snapshot SNAP's "
        "(refused while the machine runs). The snapshot stays.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("snap", metavar="SNAP")
    p.set_defaults(func=cmd_restore)

    p = subparsers.add_parser(
        "backup",
        help="write a machine (definition, writable layer, image or its name) as one archive",
        description="Write machine NAME to FILE (.tar.zst, .tar.gz or .tar; '-' for stdout, "
        "uncompressed unless --compress): its definition, its writable layer (owners relative "
        "to its UID range) and its image's name and origin, or with --with-image the image "
        "itself. A running machine is backed up from a snapshot made for it.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE|-", nargs="?")
    p.add_argument("--with-image", action="store_true", help="include the image itself")
    p.add_argument("--compress", choices=["zstd", "gzip", "none"], help="override the suffix")
    p.add_argument("--stop", action="store_true", help="stop a running machine for the copy")
    p.add_argument("--snapshot", metavar="SNAP", help="back up this snapshot instead")
    p.add_argument("--scheduled", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_backup)

    p = subparsers.add_parser(
        "restore-backup",
        help="make a machine from a backup archive",
        description="Make machine NAME (default: the archive's) from a backup ('-' for stdin). "
        "The whole archive is read and checked against its manifest before anything is put "
        "in place; the layer's owners are shifted into the new machine's UID range.",
    )
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument(
        "--allow-devices", action="store_true", help="create device nodes (whiteouts always)"
    )
    p.set_defaults(func=cmd_restore_backup)

    p = subparsers.add_parser(
        "schedule",
        help="snapshot or back up a machine on a timer, pruned by a retention rule",
        description="Snapshot machine NAME (with --backup-dir: back it up into DIR) on a "
        "systemd timer (pymachine-snapshot@NAME.timer / pymachine-backup@NAME.timer), then "
        "remove the schedule's earlier ones that --keep does not keep: Nh, Nd, Nw, Nm, Ny = "
        "the newest of each of the last N hours/days/weeks/months/years that have one, N = "
        "the N newest. Without options: show the schedules.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--every", metavar="WHEN", help="systemd calendar event (default: daily)")
    p.add_argument("--keep", metavar="RULE", help="retention rule (default: 7d,4w,12m)")
    p.add_argument("--backup-dir", metavar="DIR", help="schedule backups into DIR")
    p.add_argument("--backup", action="store_true", help="with --off: the backup schedule")
    p.add_argument("--with-image", action="store_true", help="backups include the image")
    p.add_argument("--stop", action="store_true", help="stop the machine for each copy")
    p.add_argument("--off", action="store_true", help="stop scheduling")
    p.set_defaults(func=cmd_schedule)
