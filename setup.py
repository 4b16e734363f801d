"""Builds ``pymachine-init``, the machines' PID 1 (machined/runtime/pymachine-init.c),
with the package: into the wheel, or next to its source for an editable install.

Everything else is declared in pyproject.toml. The binary is static (it runs
inside images that may have no C library), so it needs a C compiler and a
static libc (Debian: gcc, libc6-dev); ``CC`` and ``CFLAGS`` are honoured.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

INIT_SOURCE = Path("machined/runtime/pymachine-init.c")
INIT_BINARY = INIT_SOURCE.with_suffix("")


def compile_init(output: Path) -> None:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    flags = shlex.split(os.environ.get("CFLAGS", "-O2"))
    command = [*compiler, *flags, "-Wall", "-Wextra", "-static", "-s"]
    command += ["-o", str(output), str(INIT_SOURCE)]
    output.parent.mkdir(parents=True, exist_ok=True)
    print(" ".join(command))
    try:
        subprocess.run(command, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"cannot build {INIT_BINARY.name} ({exc}): pymachine needs a C compiler and a "
            "static C library to build its init (Debian: apt-get install gcc libc6-dev)"
        ) from exc


class BuildWithInit(build_py):
    def run(self) -> None:
        super().run()
        target = INIT_BINARY if self.editable_mode else Path(self.build_lib) / INIT_BINARY
        compile_init(target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / INIT_BINARY))
        return outputs


try:  # a binary inside: the wheel is for this platform, not py3-none-any
    from wheel.bdist_wheel import bdist_wheel

    class PlatformWheel(bdist_wheel):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self) -> tuple[str, str, str]:
            _python, _abi, platform = super().get_tag()
            return "py3", "none", platform

    wheel_commands = {"bdist_wheel": PlatformWheel}
except ImportError:
    wheel_commands = {}

setup(cmdclass={"build_py": BuildWithInit, **wheel_commands})
