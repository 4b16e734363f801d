"""``python -m machined.runtime NAME …``: the unit's ``ExecStart=`` (the
supervisor) and, with ``--cleanup``, its ``ExecStopPost=`` — which must not pay
for the supervisor's imports (see :mod:`machined.runtime.cleanup`); with
``--wait-ready``, a Notify=yes machine's ``ExecStartPost=`` (runtime/notify.py)."""

import os
import sys


def main(argv: list[str]) -> None:  # never returns: both paths end in _exit
    if "--cleanup" in argv[1:]:
        from machined.runtime import cleanup

        given = argv[argv.index("--cleanup") + 1 :]  # cleanup.command(): the paths
        if len(given) >= 2:
            cleanup.run(argv[0], given[0], given[1], given[2:])
        else:  # a unit made before the paths were given
            from machined.paths import Paths

            cleanup.cleanup(argv[0], Paths.from_env())
        _exit(0)
    if "--wait-ready" in argv[1:]:  # ExecStartPost= of a Notify=yes machine
        from machined.runtime import notify

        given = argv[argv.index("--wait-ready") + 1 :]  # the runtime directory, the PID file
        _exit(notify.wait_ready(argv[0], given[0], given[1]))
    from machined.runtime import leader

    # First, so that the container's first process loads its modules while we
    # load ours, and the cgroup split waits for the kernel meanwhile.
    intermediate = leader.spawn(foreground="--foreground" in argv[1:])
    from machined.runtime import cgroup

    cgroups = cgroup.PayloadSplit(intermediate.pid)
    from machined.runtime.supervisor import main as supervise

    _exit(supervise(argv, intermediate, cgroups))


def _exit(status: int) -> None:
    """Exit without the interpreter's finalization (module teardown, 4-8 ms):
    systemd waits for our exit (to read the PID file, or to finish the stop),
    and nothing is left to clean up in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
