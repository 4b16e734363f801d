"""Transfer verbs: copy-to, copy-from, bind (like machinectl's).

Output and argument handling only; the logic is in :mod:`machined.transfer`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _running(name: str):
    from machined.machines import Machines

    return Machines().running_state(name)  # the state file: no D-Bus round trip


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"pymachine: warning: {line}", file=sys.stderr)


def cmd_copy_to(args: argparse.Namespace) -> int:
    from machined import transfer

    _warn(transfer.copy_to(_running(args.name), args.host_path, args.machine_path))
    return 0


def cmd_copy_from(args: argparse.Namespace) -> int:
    from machined import transfer

    _warn(transfer.copy_from(_running(args.name), args.machine_path, args.host_path))
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    from machined import transfer

    state = _running(args.name)
    _warn(
        transfer.bind(
            state, args.host_path, args.machine_path, read_only=args.read_only, mkdir=args.mkdir
        )
    )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "copy-to",
        help="copy a file or directory from the host into a running machine",
        description="Copy HOST_PATH (recursively, keeping modes and times) into the running "
        "machine at MACHINE_PATH (default: the same path), owned by the machine's root. "
        "An existing directory receives the copy under the source's name.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("host_path", metavar="HOST_PATH")
    p.add_argument("machine_path", metavar="MACHINE_PATH", nargs="?")
    p.set_defaults(func=cmd_copy_to)

    p = subparsers.add_parser(
        "copy-from",
        help="copy a file or directory from a running machine to the host",
        description="Copy MACHINE_PATH (resolved inside the machine) to HOST_PATH (default: "
        "the same path), owned by the user running pymachine.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("machine_path", metavar="MACHINE_PATH")
    p.add_argument("host_path", metavar="HOST_PATH", nargs="?")
    p.set_defaults(func=cmd_copy_from)

    p = subparsers.add_parser(
        "bind",
        help="bind-mount a host directory or file into a running machine",
        description="Mount HOST_PATH at MACHINE_PATH (default: the same path) in the running "
        "machine until it stops; with a user namespace the files are seen through the "
        "machine's ID mapping (host root's files are the machine root's).",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("host_path", metavar="HOST_PATH")
    p.add_argument("machine_path", metavar="MACHINE_PATH", nargs="?")
    p.add_argument("--read-only", action="store_true", help="mount it read-only")
    p.add_argument(
        "--mkdir", action="store_true", help="create the mount point in the machine if missing"
    )
    p.set_defaults(func=cmd_bind)
