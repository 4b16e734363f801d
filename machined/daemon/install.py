"""The files that make pymachined a D-Bus activated system service, and
whether they are installed and current (``install-units``, ``--version``).

Each installed file carries the package version it came from and is
otherwise this package's ``units/`` file with the local paths filled in, so
"current" is simply "the same text as this package would write".
"""

from __future__ import annotations

import sys
from pathlib import Path

from machined import __version__, machines
from machined.paths import Paths

#: D-Bus activation: the daemon, started the first time a client calls it.
SERVICE = "pymachined.service"

#: (file shipped in units/, where it is installed under the root)
FILES = (
    ("pymachined.service.in", "etc/systemd/system/pymachined.service"),
    ("org.pymachine.machine1.dbus-service", "usr/share/dbus-1/system-services/org.pymachine.machine1.service"),
    ("org.pymachine.machine1.conf", "usr/share/dbus-1/system.d/org.pymachine.machine1.conf"),
    ("org.pymachine.machine1.policy", "usr/share/polkit-1/actions/org.pymachine.machine1.policy"),
)  # fmt: skip

BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split(':'); "
    "from machined.daemon.__main__ import run; run()"
)


def exec_start() -> str:
    """The daemon's command line: this interpreter with ``-I -S`` and the module
    path spelled out, as the machines' runtime is started."""
    import shlex

    path = machines.runtime_command("-")[5]
    return shlex.join([sys.executable, "-I", "-S", "-c", BOOTSTRAP, path])


def rendered(source: str, paths: Paths) -> str:
    from machined.resources import units_dir

    text = units_dir().joinpath(source).read_text(encoding="utf-8")
    environment = machines.runtime_environment(paths)
    return (
        text.replace("@VERSION@", __version__)
        .replace("@EXEC_START@", exec_start().replace("%", "%%"))
        .replace("@ENVIRONMENT@", "".join(f"Environment={k}={v}\n" for k, v in environment.items()))
    )


def targets(paths: Paths) -> list[tuple[str, str]]:
    """(installed path, text it should have) of every file."""
    return [(str(paths.root / target), rendered(source, paths)) for source, target in FILES]


def install(paths: Paths) -> tuple[list[str], list[str]]:
    """Write what is missing or different: (installed, unchanged) paths. The
    bus reads its configuration again (the new policy) and the service files
    on its own; polkit reads new actions on its own; systemd is reloaded by
    the caller (:func:`machined.units.install_units`)."""
    from machined.unitfile import write_atomic

    installed, unchanged = [], []
    for path, text in targets(paths):
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except OSError:
            current = None
        if current == text:
            unchanged.append(path)
            continue
        write_atomic(Path(path), text)
        installed.append(path)
    return installed, unchanged


def problems(paths: Paths) -> list[str]:
    """A line per file that is missing or not this package's version of it."""
    out = []
    for path, text in targets(paths):
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except OSError:
            out.append(f"{path} is missing (run 'pymachine install-units' as root)")
            continue
        if current != text:
            out.append(
                f"{path} is not this pymachine's ({__version__}): run 'pymachine install-units'"
            )
    return out
