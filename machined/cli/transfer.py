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


def _through_daemon(call) -> bool:
    from machined.cli.machines import _daemon_call

    return _daemon_call(call)


def cmd_copy_to(args: argparse.Namespace) -> int:
    from machined import transfer

    if _copy_file_to(args):
        return 0
    _warn(transfer.copy_to(_running(args.name), args.host_path, args.machine_path))
    return 0


def _copy_file_to(args: argparse.Namespace) -> bool:
    """A user's copy-to of a regular file through pymachined: we open it (with
    our rights) and pass the descriptor. Root copies in-process, as before
    (directories, set-ID bits, any file)."""
    import os
    import stat

    if os.geteuid() == 0:
        return False

    try:
        fd = os.open(args.host_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False  # copy_to's own error for it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            if os.geteuid() != 0:
                from machined.errors import AccessDenied

                raise AccessDenied(
                    "access denied: copying a directory needs root (through pymachined: one file)"
                )
            return False
        path = os.path.abspath(args.host_path)
        target = args.machine_path or path
        warnings: list[str] = []
        done = _through_daemon(
            lambda d: warnings.extend(
                d.call("CopyToMachine", "shss", [args.name, fd, os.path.basename(path), target])
            )
        )
    finally:
        os.close(fd)
    _warn(warnings)
    return done


def cmd_copy_from(args: argparse.Namespace) -> int:
    from machined import transfer

    if _copy_file_from(args):
        return 0
    _warn(transfer.copy_from(_running(args.name), args.machine_path, args.host_path))
    return 0


def _copy_file_from(args: argparse.Namespace) -> bool:
    """copy-from through pymachined into a file we create (with our rights)
    next to the destination, renamed over it once the copy succeeded: a
    failed copy leaves the destination as it was. One regular file; root
    copies in-process (directories, modes and times kept)."""
    import os
    import tempfile

    if os.geteuid() == 0:
        return False

    host = os.path.abspath(args.host_path or args.machine_path)
    if os.path.isdir(host):
        host = os.path.join(host, os.path.basename(args.machine_path.rstrip("/")))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".#pymachine-copy.", dir=os.path.dirname(host))
    except OSError:
        return False  # copy_from's own error for it
    try:
        done = _through_daemon(
            lambda d: d.call("CopyFromMachine", "ssh", [args.name, args.machine_path, fd])
        )
        if done:
            os.fchmod(fd, 0o666 & ~_umask())
            os.rename(temporary, host)
    finally:
        os.close(fd)
        if os.path.exists(temporary):
            os.unlink(temporary)
    return done


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


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
