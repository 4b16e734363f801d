"""pymachine: nspawn-style machines as systemd units.

Kept import-free on purpose: the CLI, the runtime and the PID-1 init all start
here, and every millisecond of import is paid on every start.
"""

__version__ = "0.1.0"
