import sys

from machined.cli import main

sys.exit(main())
