"""What the CLI's hottest verbs import, from ``python -X importtime``.

For each verb: the total import time (best of 3), the number of modules, and
the heaviest packages by self time. ``site`` (the interpreter's .pth files) is
shown apart: it is paid by every Python program here, not pymachine's.

    python3 -m bench.importtime
"""

from __future__ import annotations

import re

from bench.common import PY, pym_create, pym_remove, pymachine, run, table

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def _cli(*args: str) -> list[str]:
    """PY's arguments for the CLI as a user runs it (:func:`bench.common.pymachine`:
    the venv's console script, else ``-m machined``, whose runpy is then counted too)."""
    argv = pymachine(*args)
    return argv[1:] if argv[0] == PY else argv


VERBS = {
    "list": _cli("list"),
    "status M": _cli("status", "bimp"),
    "start M (running: fails after its checks)": _cli("start", "bimp"),
    "stop M (not running)": _cli("stop", "bimp"),
    # the unit's processes run as python -I -S with the module path given (no site)
    # as machines.RUNTIME_BOOTSTRAP runs it, with the machined client it loads on the way
    "runtime (unit's ExecStart, until the hand-over)": [
        "-I",
        "-S",
        "-c",
        "import sys; sys.path[:0] = ['.', *sys.argv[1:2]]; "
        "from machined import lazy; lazy.defer('inspect'); "
        "import machined.runtime.__main__, machined.runtime.supervisor, machined.registry, "
        "machined.dbus",
        __import__("site").getsitepackages()[0],
    ],
    # a fork of the runtime, loading in parallel with it; PID 1 then execs
    # pymachine-init (C), so nothing of this stays per machine
    "intermediate and PID 1 until the init's exec": [
        "-I",
        "-S",
        "-c",
        "import sys; sys.path.insert(0, '.'); import machined.runtime.leader, "
        "machined.runtime.container, machined.runtime.linux, machined.runtime.restrict",
    ],
    # as cleanup.command() calls it (paths on its command line), for a machine
    # whose network record is gone: the unregistration only
    "runtime --cleanup (ExecStopPost, no network record)": [
        "-I",
        "-S",
        "-c",
        "import sys; sys.path[:0] = ['.', *sys.argv[1:2]]; "
        "from machined.runtime.__main__ import main; "
        "main(['bimp', '--cleanup', '/run/pymachine/.network/bimp.json', "
        "'/run/pymachine/bimp/ephemeral', '/run/pymachine/bimp/state.json', "
        "'/run/pymachine/bimp/leader.pid'])",
        __import__("site").getsitepackages()[0],
    ],
}

# what a verb needs is its own module, argparse, the bus client; these are not
# (importlib.resources and zipfile are not watched: the .pth files of site load them here)
WATCH = (
    "machined.network.lifecycle",
    "machined.network.links",
    "jinja2",
    "lxml.etree",
    "pystemd",
    "machined.network",
    "hashlib",
    "inspect",
    "uuid",
    "json",
    "subprocess",
    "dataclasses",
)


def parse(text: str) -> list[tuple[int, int, int, str]]:
    rows = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    return rows


def profile(args: list[str]) -> dict:
    best = None
    for _ in range(3):
        cp = run([PY, "-X", "importtime", *args], check=False)
        rows = parse(cp.stderr)
        site = sum(c for s, c, depth, name in rows if depth == 0 and name in ("site", "encodings"))
        total = sum(c for s, c, depth, name in rows if depth == 0) - site
        if best is None or total < best["total_us"]:
            names = {name for *_x, name in rows}
            cumulative = {name: c for s, c, d, name in rows}
            best = {
                "total_us": total,
                "site_us": site,
                "modules": len(rows),
                "watch": {w: cumulative[w] for w in WATCH if w in names},
                "heaviest": sorted(((s, name) for s, c, d, name in rows), reverse=True)[:6],
            }
    return best


def main() -> int:
    pym_create("bimp", "--network", "none", command=["/bin/sleep", "1"])
    results = {verb: profile(args) for verb, args in VERBS.items()}
    pym_remove("bimp")
    rows = [
        [
            verb,
            f"{r['total_us'] / 1000:.0f}",
            r["modules"],
            ", ".join(f"{k} {v / 1000:.0f}" for k, v in r["watch"].items()),
        ]
        for verb, r in results.items()
    ]
    print("\n### Import time (best of 3, ms, without site/.pth)\n")
    print(table(["verb", "imports ms", "modules", "of which (cumulative ms)"], rows))
    site = min(r["site_us"] for r in results.values())
    print(
        f"\n(site + .pth files of this interpreter: {site / 1000:.0f} ms on every start, not counted)"
    )
    from bench.common import save

    save("importtime", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
