"""Boot a throwaway systemd host and run something in it.

    python3 -m tests.harness run [--keep-going] [--bind DST=SRC]... -- CMD ARGS...
    python3 -m tests.harness shell

``run`` boots a host (the same as the ``systemd_host`` fixture: pymachine's
state directories bound to fresh real directories, the persistent download
cache at /var/cache/pymachine), runs CMD inside with stdin/stdout/stderr passed
through, tears the host down and exits with CMD's status. With
``--keep-going`` the host stays up after CMD (whatever its status) until
Ctrl-C, so it can be looked at with the printed ``nsenter`` command.
``shell`` is ``run --keep-going=no -- bash``: an interactive shell inside.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .systemd_host import HostBootError, SystemdHost, default_binds, new_workdir, remove_workdir


def _parse_bind(text: str) -> tuple[str, Path]:
    inner, sep, outer = text.partition("=")
    if not sep or not inner.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected /IN/HOST=REAL/DIR, got {text!r}")
    return inner, Path(outer).absolute()


def _wait(proc: subprocess.Popen) -> int:
    """Wait for PROC; Ctrl-C goes to it (it shares our terminal), not to us."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.harness", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("run", "shell"):
        p = sub.add_parser(verb)
        p.add_argument(
            "--name", default="pymtest", help="hostname and cgroup name (default: pymtest)"
        )
        p.add_argument("--bind", type=_parse_bind, action="append", default=[], metavar="DST=SRC")
        p.add_argument(
            "--workdir", type=Path, help="where the host's files go (default: a new /tmp dir)"
        )
        p.add_argument("--timeout", type=float, default=60.0, help="boot timeout in seconds")
        p.add_argument(
            "--private-network",
            action="store_true",
            help="give the host a network namespace of its own (loopback up, nothing else)",
        )
        p.add_argument("-q", "--quiet", action="store_true", help="do not report the boot time")
        if verb == "run":
            p.add_argument(
                "--keep-going",
                "--keep",
                action="store_true",
                help="keep the host up after CMD until Ctrl-C",
            )
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)

    if args.verb == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run: give a command after --")
        keep = args.keep_going
    else:
        cmd = ["/bin/bash", "--norc", "-i"]
        keep = False

    if os.geteuid() != 0:
        print("tests.harness: a systemd test host needs root", file=sys.stderr)
        return 2
    workdir = args.workdir or new_workdir()
    binds = default_binds(workdir)
    binds.update(dict(args.bind))
    host = SystemdHost(
        workdir / "host", name=args.name, binds=binds, private_network=args.private_network
    )
    # SIGTERM/SIGHUP tear the host down like Ctrl-C would
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    try:
        try:
            host.start(timeout=args.timeout)
        except HostBootError as e:
            print(f"tests.harness: {e}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(
                f"tests.harness: host {args.name} booted in {host.boot_seconds:.2f} s "
                f"(pid {host.pid}; enter with: nsenter -t {host.pid} -a)",
                file=sys.stderr,
            )
        env = {"PS1": f"[{args.name}] \\w# "} if args.verb == "shell" else None
        status = _wait(host.popen(cmd, env=env))
        if status < 0:
            status = 128 - status
        if keep:
            print(
                f"tests.harness: CMD exited with {status}; host kept up: nsenter -t {host.pid} -a "
                "(Ctrl-C to tear it down)",
                file=sys.stderr,
            )
            with contextlib.suppress(KeyboardInterrupt):
                while host.running:
                    time.sleep(3600)
        return status
    finally:
        host.stop()
        if args.workdir is None:
            remove_workdir(workdir)


if __name__ == "__main__":
    sys.exit(main())
