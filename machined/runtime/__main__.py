"""``python -m machined.runtime NAME …``: the unit's ``ExecStart=`` (the
supervisor) and, with ``--cleanup``, its ``ExecStopPost=`` — which must not pay
for the supervisor's imports (see :mod:`machined.runtime.cleanup`)."""

import os
import sys


def main(argv: list[str]) -> int:
    if "--cleanup" in argv[1:]:
        from machined.paths import Paths
        from machined.runtime.cleanup import cleanup

        cleanup(argv[0], Paths.from_env())
        return 0
    from machined.runtime import leader

    # First, so that the container's first process loads its modules while we
    # load ours, and the cgroup split waits for the kernel meanwhile.
    intermediate = leader.spawn(foreground="--foreground" in argv[1:])
    from machined.runtime import cgroup

    cgroups = cgroup.PayloadSplit(intermediate.pid)
    from machined.runtime.supervisor import main as supervise

    status = supervise(argv, intermediate, cgroups)
    # systemd reads the PID file once we are gone: skip the interpreter's
    # finalization (module teardown), nothing is left to clean up in-process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
