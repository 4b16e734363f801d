"""``python -m machined.runtime NAME …``: the unit's ``ExecStart=`` (the
supervisor) and, with ``--cleanup``, its ``ExecStopPost=`` — which must not pay
for the supervisor's imports (see :mod:`machined.runtime.cleanup`)."""

import sys


def main(argv: list[str]) -> int:
    if "--cleanup" in argv[1:]:
        from machined.paths import Paths
        from machined.runtime.cleanup import cleanup

        cleanup(argv[0], Paths.from_env())
        return 0
    from machined.runtime import leader

    # First, so that the container's first interpreter starts while ours imports.
    intermediate = leader.spawn(foreground="--foreground" in argv[1:])
    from machined.runtime.supervisor import main as supervise

    return supervise(argv, intermediate)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
