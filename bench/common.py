"""Helpers shared by the benchmark scripts (run them inside a systemd host).

Every benchmark measures pymachine and the reference (systemd-nspawn /
machinectl) in the same run, interleaved, and reports min/median/max and the
ratio of the medians pymachine / reference. Results go to stdout as Markdown
tables and to ``bench/results/NAME.json`` for ``bench/plot.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable  # the interpreter pymachine is installed for (not a pyenv shim)
IMAGE = os.environ.get("BENCH_IMAGE", "tiny")
IMAGES = Path("/var/lib/machines")
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
NSPAWN_SETTINGS = Path("/etc/systemd/nspawn")


#: The ``pymachine`` console script next to the interpreter (a venv's, as
#: dev/setup makes it): what a user runs. Elsewhere ``python3 -m machined``
#: (runpy costs it ~2.5 ms more), never a ``pymachine`` found on PATH (a pyenv
#: shim adds ~50 ms of bash).
SCRIPT = Path(PY).parent / "pymachine"


def pymachine(*args: str) -> list[str]:
    if SCRIPT.is_file() and sys.prefix != sys.base_prefix:
        return [str(SCRIPT), *args]
    return [PY, "-m", "machined", *args]


def run(
    argv: list[str], *, check: bool = True, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    cp = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
        **kw,
    )
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}")
    return cp


def timed(argv: list[str], *, check: bool = True) -> float:
    """Wall-clock seconds of one run of ARGV (output captured)."""
    start = time.perf_counter()
    run(argv, check=check)
    return time.perf_counter() - start


def rounds(
    repeats: int,
    steps: dict[str, Callable[[], float]],
    *,
    before: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """REPEATS rounds of STEPS, each called in order (BEFORE, untimed, first):
    every step's seconds per round, after one more round that only warms caches."""
    raw: dict[str, list[float]] = {key: [] for key in steps}
    for i in range(repeats + 1):
        if before is not None:
            before()
        times = {key: step() for key, step in steps.items()}
        if i:  # the first round warms caches
            for key, value in times.items():
                raw[key].append(value)
    return raw


def stats(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(headers), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def pair_row(label: str, ours: list[float], ref: list[float], ref_label: str) -> list[str]:
    a, b = stats(ours), stats(ref)
    return [
        label,
        f"{ms(a['min'])} / {ms(a['median'])} / {ms(a['max'])}",
        ref_label,
        f"{ms(b['min'])} / {ms(b['median'])} / {ms(b['max'])}",
        f"{a['median'] / b['median']:.2f}",
    ]


PAIR_HEADERS = [
    "pymachine",
    "min / median / max (ms)",
    "reference",
    "min / median / max (ms)",
    "ratio",
]


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "load_end": load(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))


# --- images and machines -------------------------------------------------------


def ensure_image(name: str = IMAGE) -> Path:
    path = IMAGES / name
    if not (path / "bin").exists():
        run(pymachine("bootstrap", "--distro", "busybox", name))
    return path


def pym_create(name: str, *flags: str, command: list[str]) -> None:
    pym_remove(name)
    run(pymachine("create", name, "--image", IMAGE, *flags, "--", *command))


def pym_remove(*names: str) -> None:
    if names:
        run(pymachine("stop", *names), check=False)
        run(pymachine("remove", *names), check=False)


def nspawn_machine(
    name: str,
    *,
    private_users: bool = False,
    veth: bool = False,
    params: str = "/bin/sleep 1000000",
) -> None:
    """A ``systemd-nspawn@NAME.service`` machine running IMAGE's files, made an
    app container with nspawn's stub PID 1 (``--as-pid2``) by its ``.nspawn``
    file. Without a user namespace NAME is a symlink to the image and a tmpfs
    overlay covers the read-only image (``Volatile=overlay``), so any number of
    them share one image as pymachine's machines do. With one (``-U``), nspawn
    252 cannot idmap a volatile overlay: NAME is then a copy of the image that
    nspawn idmaps (``PrivateUsersOwnership=map``)."""
    path = IMAGES / name
    _remove_path(path)
    if private_users:
        run(["cp", "-a", "--reflink=auto", str(IMAGES / IMAGE), str(path)])
    else:
        path.symlink_to(IMAGE)
    NSPAWN_SETTINGS.mkdir(parents=True, exist_ok=True)
    (NSPAWN_SETTINGS / f"{name}.nspawn").write_text(
        "[Exec]\nBoot=no\nProcessTwo=yes\n"
        f"PrivateUsers={'pick' if private_users else 'no'}\n"
        f"Parameters={params}\n"
        "[Files]\n"
        + ("PrivateUsersOwnership=map\n" if private_users else "Volatile=overlay\n")
        + f"[Network]\nVirtualEthernet={'yes' if veth else 'no'}\n"
    )


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def nspawn_remove(*names: str) -> None:
    for name in names:
        run(["systemctl", "stop", f"systemd-nspawn@{name}.service"], check=False)
        run(["systemctl", "reset-failed", f"systemd-nspawn@{name}.service"], check=False)
        (NSPAWN_SETTINGS / f"{name}.nspawn").unlink(missing_ok=True)
        _remove_path(IMAGES / name)


# --- memory ----------------------------------------------------------------------


def pss_kb(pid: int) -> tuple[int, int]:
    """(Pss, Rss) in kB from /proc/PID/smaps_rollup."""
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def main_pss_kb(unit: str) -> int:
    """Pss in kB of UNIT's main process."""
    pid = run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    return pss_kb(int(pid))[0]


def unit_pids(unit: str) -> list[int]:
    """Every process in UNIT's cgroup (recursively), from systemd."""
    out = run(["systemctl", "show", "-p", "ControlGroup", "--value", unit]).stdout.strip()
    root = Path("/sys/fs/cgroup") / out.lstrip("/")
    pids = []
    for procs in root.rglob("cgroup.procs"):
        pids += [int(p) for p in procs.read_text().split()]
    return pids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def du_kb(path: Path) -> int:
    if not path.exists():
        return 0
    return int(run(["du", "-sk", "--apparent-size", str(path)]).stdout.split()[0])


def python_version() -> str:
    return sys.version.split()[0]


def which(cmd: str) -> str | None:
    return shutil.which(cmd)
