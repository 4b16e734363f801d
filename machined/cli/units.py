"""Autostart and live-change verbs: enable, disable, set, install-units.

Output and argument handling only; the logic is in :mod:`machined.units`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _print(lines: list[str], quiet: bool = False) -> None:
    if not quiet:
        for line in lines:
            print(line)


class _Result:
    """A result's fields as pymachined sent them (``a{sv}``): a field it left
    out (None) reads as None, as the library's dataclass would have it."""

    def __init__(self, fields: Any) -> None:
        self.__dict__.update(dict(fields))

    def __getattr__(self, name: str) -> None:
        return None


def _through_daemon(method: str, signature: str, args: list, local) -> Any:
    """pymachined's METHOD(ARGS) as a result object, or LOCAL() in-process
    (root, without the daemon: machined.cli.machines._daemon_call)."""
    from machined.cli.machines import _daemon_call

    answer = []
    if _daemon_call(lambda d: answer.append(d.call(method, signature, args))):
        return _Result(answer[0])
    return local()


def cmd_enable(args: argparse.Namespace) -> int:
    from machined import units

    for name in args.names:
        result = _through_daemon(
            "EnableMachine",
            "sb",
            [name, args.now],
            lambda name=name: units.enable(name, now=args.now),
        )
        for warning in result.warnings:
            print(f"pymachine: warning: {warning}", file=sys.stderr)
        lines = list(result.changes)
        if result.already:
            lines.append(f"Machine {name} is already enabled ({result.unit}).")
        elif result.rewritten:
            lines.append(f"Machine {name} is enabled; re-rendered {result.path}.")
        else:
            lines.append(f"Machine {name} enabled: {result.path} starts it at boot.")
        if result.started:
            lines.append(f"Started machine {name}.")
        elif args.now and result.running:
            lines.append(f"Machine {name} is already running.")
        _print(lines, args.quiet)
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    from machined import units

    for name in args.names:
        result = _through_daemon(
            "DisableMachine",
            "sb",
            [name, args.now],
            lambda name=name: units.disable(name, now=args.now),
        )
        lines = list(result.changes)
        if result.stopped:
            lines.insert(0, f"Stopped machine {name}.")
        if result.already:
            lines.append(f"Machine {name} is not enabled.")
        else:
            lines.append(f"Machine {name} disabled: removed {result.path}.")
        if result.running:
            lines.append(
                f"Machine {name} is still running; 'pymachine stop {name}' stops it "
                "(or use disable --now)."
            )
        _print(lines, args.quiet)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from machined import units

    result = _through_daemon(
        "SetMachineProperties",
        "sasb",
        [args.name, args.property, args.runtime],
        lambda: units.set_properties(args.name, args.property, runtime=args.runtime),
    )
    if args.quiet:
        return 0
    later = set(result.next_start or ())
    text = " ".join(f"{k}={v}" for k, v in result.assignments)
    live = " ".join(f"{k}={v}" for k, v in result.assignments if k not in later)
    if result.live_unit:
        print(f"Applied {live} to running {result.live_unit}.")
    if result.persisted:
        where = "definition and unit file" if result.unit_file_rewritten else "definition"
        print(f"Saved {text} in machine {args.name}'s {where}.")
    if later:
        keys = ", ".join(f"{k}=" for k in sorted(later))
        print(f"{keys} take{'s' if len(later) == 1 else ''} effect at the next start.")
    elif args.runtime:
        print("Not saved (--runtime): the next start uses the definition again.")
    return 0


def cmd_install_units(args: argparse.Namespace) -> int:
    import os

    from machined import units
    from machined.errors import AccessDenied

    if os.geteuid() != 0:
        raise AccessDenied("access denied: 'install-units' needs root (it writes /etc and /usr)")

    result = units.install_units()
    lines = [f"Installed {name}." for name in result.installed]
    lines += [f"{name} is up to date." for name in result.unchanged]
    lines += [f"Skipped {name}: {why}." for name, why in result.skipped]
    lines += result.changes
    if not (result.installed or result.unchanged or result.skipped):
        lines.append("No units shipped with this pymachine.")
    _print(lines, args.quiet)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "enable",
        help="start machines at boot (unit file in /etc/systemd/system, WantedBy=machines.target)",
        description="Render /etc/systemd/system/pymachine-NAME.service from the machine's "
        "definition, reload systemd and enable it into machines.target, like "
        "'machinectl enable'. The machine keeps its unit name: start, stop and status work "
        "as before.",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--now", action="store_true", help="start the machines too")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_enable)

    p = subparsers.add_parser(
        "disable",
        help="stop starting machines at boot (removes their unit files)",
        description="Disable and remove /etc/systemd/system/pymachine-NAME.service and reload "
        "systemd. A running machine keeps running unless --now is given.",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--now", action="store_true", help="stop the machines too")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_disable)

    p = subparsers.add_parser(
        "set",
        help="change a machine's resource limits (live) and definition keys",
        description="Validate KEY=VALUE (systemd's resource-control names and syntax), apply "
        "it to the running machine (SetUnitProperties) and save it in the definition and, if "
        "the machine is enabled, its unit file. The definition keys Notify, WatchdogSec, "
        "Restart, Health*, Requires, Wants, After, Device and LoadCredential[Encrypted] are "
        "checked as create checks them and take effect at the next start; a list key's value "
        "is added to it, an empty value clears it.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "-p",
        "--property",
        action="append",
        default=[],
        required=True,
        metavar="KEY=VALUE",
        help="e.g. MemoryMax=128M, CPUQuota=50%%, Requires=db, WatchdogSec=10 (may be repeated)",
    )
    p.add_argument(
        "--runtime",
        action="store_true",
        help="change the running machine only; do not save (the machine must be running)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_set)

    p = subparsers.add_parser(
        "install-units",
        help="install the static units pymachine ships (once per host)",
        description="Copy the units shipped with pymachine into /etc/systemd/system (a unit "
        "the host already has, such as systemd-container's machines.target, is left alone), "
        "reload systemd and enable them.",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_install_units)
