import sys

if "--cleanup" in sys.argv[2:]:  # ExecStopPost=: skip the supervisor's imports
    from machined.paths import Paths
    from machined.runtime.cleanup import cleanup

    cleanup(sys.argv[1], Paths.from_env())
    sys.exit(0)

from machined.runtime.supervisor import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
