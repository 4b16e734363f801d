"""Where pymachine keeps things on the host, overridable with one prefix.

Every path hangs off one root (``PYMACHINE_ROOT``, default ``/``) so unit tests
and unprivileged experiments never touch the real host directories unless
meant to. Inside a tier-1 test host the defaults are used as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "PYMACHINE_ROOT"
UNIT_PREFIX = "pymachine-"
STATE_FILE = "state.json"  # a running machine's state, in its runtime directory
PID_FILE = "leader.pid"  # the service's PIDFile=: PID 1's host PID, its main process
PRIVATE = 0o700  # state directories: root's only (see private_dirs)
# The runtime directories: others may pass, not list (a machine's PID 1, root of its
# user namespace only, resolves its root and binds there); what root inside writes
# there (an ephemeral machine's layer) is in a PRIVATE directory below.
SEARCH_ONLY = 0o711


class Paths:
    """Immutable; a plain class, not a dataclass: every process of pymachine,
    the clean-up after each stop included, imports this module."""

    __slots__ = ("_root",)

    def __init__(self, root: Path | str = Path("/")) -> None:
        object.__setattr__(self, "_root", Path(root))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Paths is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Paths) and other._root == self._root

    def __hash__(self) -> int:
        return hash(self._root)

    def __repr__(self) -> str:
        return f"Paths(root={self._root!r})"

    @property
    def root(self) -> Path:
        return self._root

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get(ROOT_ENV) or "/"))

    # --- directories -------------------------------------------------------
    @property
    def images(self) -> Path:
        """Image store; /var/lib/machines so machinectl and nspawn see it too."""
        return self.root / "var/lib/machines"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/pymachine"

    @property
    def definitions(self) -> Path:
        return self.root / "etc/pymachine"

    @property
    def runtime(self) -> Path:
        return self.root / "run/pymachine"

    @property
    def unit_files(self) -> Path:
        return self.root / "etc/systemd/system"

    @property
    def cache(self) -> Path:
        return self.root / "var/cache/pymachine"

    # --- per machine / image -----------------------------------------------
    def image(self, name: str) -> Path:
        return self.images / name

    def definition_file(self, name: str) -> Path:
        return self.definitions / f"{name}.machine"

    def machine_state(self, name: str) -> Path:
        """The machine's writable layer (upper/, work/) and persistent state."""
        return self.state / "machines" / name

    def machine_runtime(self, name: str) -> Path:
        return self.runtime / name

    def pid_file(self, name: str) -> Path:
        return self.machine_runtime(name) / PID_FILE

    def unit_file(self, name: str) -> Path:
        """An enabled machine's unit file (its existence is the record of it)."""
        return self.unit_files / unit_name(name)


def private_dirs(*directories: Path, mode: int = PRIVATE) -> None:
    """Make each directory (and missing parents) closed to everyone but root
    (MODE), and close it if it is open: an older install made them 0755.

    What root inside a machine makes lands in them (the writable layers, the
    images): a set-user-ID file there, run by a host user, would run as the
    machine's root UID, and as host root for a machine without a user
    namespace. nspawn keeps /var/lib/machines 0700, podman its storage.
    A few system calls: every start pays them.
    """
    for directory in directories:
        try:
            current = os.stat(directory).st_mode & 0o7777
        except FileNotFoundError:  # made with its parents (they may be another's: 0755)
            os.makedirs(directory, mode, exist_ok=True)
            current = os.stat(directory).st_mode & 0o7777
        if current != mode:  # older, or the umask took bits
            os.chmod(directory, mode)


def unit_name(machine: str) -> str:
    """One machine, one unit name, whether transient or enabled."""
    return f"{UNIT_PREFIX}{machine}.service"
