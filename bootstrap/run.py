"""The one place that starts subprocesses for the bootstrapper and image store.

Like ``mkosi/run.py``: every backend builds an argv list (pure, unit-tested)
and hands it here. Failures become :class:`BootstrapError` carrying the
command and the last lines it printed, so the CLI shows something useful.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from machined.errors import PymachineError

TAIL_LINES = 15


class BootstrapError(PymachineError):
    """A tool we drove failed (exit code 1)."""


class MissingTool(PymachineError):
    """A required host tool is not installed."""


def find_tool(name: str, extra_dirs: Sequence[str] = ("/usr/sbin", "/sbin")) -> str | None:
    """The absolute path of ``name`` on the host, or None."""
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str, package: str | None = None) -> str:
    path = find_tool(name)
    if path is None:
        hint = f" (apt-get install {package})" if package else ""
        raise MissingTool(f"'{name}' is not installed{hint}")
    return path


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(str(a) for a in argv)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = False,
    on_line: Callable[[str], None] | None = None,
    check: bool = True,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and wait for it.

    ``capture``: return stdout as text (stderr still collected for errors).
    ``on_line``: stream the tool's combined output line by line to a callback
    (progress display); otherwise its output goes to our stderr unchanged.
    On a non-zero exit raises :class:`BootstrapError` with the tail of output.
    """
    args = [os.fspath(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        if capture:
            proc = subprocess.run(
                args,
                env=full_env,
                cwd=cwd,
                stdin=stdin,
                capture_output=True,
                text=True,
            )
            if check and proc.returncode != 0:
                raise _failure(args, proc.returncode, proc.stderr.splitlines())
            return proc
        if on_line is None:
            # The tool's stdout goes to our stderr: our stdout may be a tar stream.
            proc = subprocess.run(args, env=full_env, cwd=cwd, stdin=stdin, stdout=2)
            if check and proc.returncode != 0:
                raise _failure(args, proc.returncode, [])
            return subprocess.CompletedProcess(args, proc.returncode, "", "")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        with subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: stopped as a whole on interrupt
        ) as popen:
            assert popen.stdout is not None
            try:
                for line in popen.stdout:
                    line = line.rstrip("\n")
                    tail.append(line)
                    on_line(line)
                returncode = popen.wait()
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM): take the tool and its children down.
                _stop_group(popen)
                raise
        if check and returncode != 0:
            raise _failure(args, returncode, list(tail))
        return subprocess.CompletedProcess(args, returncode, "", "")
    except FileNotFoundError as exc:
        raise MissingTool(f"cannot run {args[0]!r}: {exc.strerror}") from exc


def _stop_group(popen: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM the tool's process group, SIGKILL whatever is left after ``grace``.

    mmdebstrap/debootstrap run apt, dpkg and tar as children that would go on
    writing into the tree while it is being removed if only the tool died.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()
    # Stragglers of the group that outlived the leader: wait until none is left.
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(popen.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)


def _failure(args: list[str], returncode: int, tail: list[str]) -> BootstrapError:
    message = f"{format_command(args)} failed with exit status {returncode}"
    if tail:
        message += "\n" + "\n".join(f"  {line}" for line in tail[-TAIL_LINES:])
    return BootstrapError(message)
