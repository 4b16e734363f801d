"""pymachine: nspawn-style machines as systemd units.

Kept import-free on purpose: the CLI, the runtime and the PID-1 init all start
here, and every millisecond of import is paid on every start.
"""

__version__ = "0.1.0"


def package_parent() -> str:
    """The directory this package is imported from (a site-packages, or the
    checkout of an editable install): processes started with ``python -I -S``
    put it on their path themselves."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
