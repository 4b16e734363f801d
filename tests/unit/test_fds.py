"""runtime.fds: what survives into a machine is stdio and the preserved fds,
whatever the caller had open (issue 15, item 4). Each case runs in a forked
child, which reports the fds it has left through a pipe."""

from __future__ import annotations

import random
import subprocess
import sys

from machined.runtime import fds


def _left_after(open_fds: set[int], preserved: int, *, cloexec: bool = False) -> list[int]:
    """The child's fds after it opened OPEN_FDS (dup2, inheritable unless
    CLOEXEC) and called close_inherited(PRESERVED), as an exec'd program sees them."""
    code = (
        "import fcntl, os\n"
        "from machined.runtime import fds\n"
        "first = os.open(os.devnull, os.O_RDONLY)\n"
        "null = fcntl.fcntl(first, fcntl.F_DUPFD_CLOEXEC, 400)\n"
        "os.close(first)\n"
        f"for fd in {sorted(open_fds)!r}:\n"
        f"    os.dup2(null, fd, inheritable={not cloexec})\n"
        "os.close(null)\n"
        f"fds.close_inherited({preserved})\n"
        "os.execv('/bin/sh', ['sh', '-c', 'ls /proc/$$/fd'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, close_fds=True
    ).stdout
    return sorted(int(fd) for fd in out.split())


def test_only_stdio_is_left_by_default():
    assert _left_after({3, 7, 9, 255, 1000}, 0) == [0, 1, 2]


def test_the_preserved_fds_are_left_and_reach_an_exec_even_if_close_on_exec():
    assert _left_after({3, 4, 5, 6}, 2, cloexec=True) == [0, 1, 2, 3, 4]


def test_random_fd_layouts():
    """Fuzz: any set of open fds, any N: left = stdio + (open ∩ 3 … 3+N-1)."""
    rng = random.Random(15)
    for _ in range(25):
        open_fds = set(rng.sample(range(3, 390), rng.randint(0, 12)))
        preserved = rng.randint(0, 8)
        kept = {fd for fd in open_fds if fd < fds.FIRST + preserved}
        assert _left_after(open_fds, preserved) == sorted({0, 1, 2} | kept), (open_fds, preserved)


def test_first_unopened_names_the_first_gap():
    code = "from machined.runtime import fds; print(fds.first_unopened(1), fds.first_unopened(3))"
    script = f"exec 3</dev/null 5</dev/null; exec {sys.executable} -c '{code}'"
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "4"]
