import sys

from machined.runtime.supervisor import main

sys.exit(main(sys.argv[1:]))
