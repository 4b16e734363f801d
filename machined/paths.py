"""Where pymachine keeps things on the host, overridable with one prefix.

Every path hangs off one root (``PYMACHINE_ROOT``, default ``/``) so unit tests
and unprivileged experiments never touch the real host directories unless
meant to. Inside a tier-1 test host the defaults are used as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "PYMACHINE_ROOT"
UNIT_PREFIX = "pymachine-"


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

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


def unit_name(machine: str) -> str:
    """One machine, one unit name, whether transient or enabled."""
    return f"{UNIT_PREFIX}{machine}.service"
