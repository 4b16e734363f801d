"""Floors: what starting a process costs here, before pymachine does anything.

A CLI call is a Python start plus pymachine's work; a machine's unit starts a
second Python (``-I -S``: no site). These rows put numbers on the parts no
change of pymachine's removes: the interpreter with and without ``site``, this
machine's ``python3`` (whose site-packages carry .pth files: here a sandbox
hook that imports certifi), pymachine's cheapest call (``--version``: the
interpreter, site and the CLI's parser) and the C clients on the other side.

    python3 -m bench.floors [-n REPEATS]
"""

from __future__ import annotations

import argparse
import os
import sys

from bench.common import PY, ms, pymachine, save, stats, table, timed


def rows() -> list[tuple[str, list[str]]]:
    base_python = os.path.join(sys.base_prefix, "bin", "python3")  # the venv's own
    found = [
        ("python -I -S -c pass (the units' interpreter start)", [PY, "-I", "-S", "-c", "pass"]),
        ("python -c pass (with site: the CLI's)", [PY, "-c", "pass"]),
        ("pymachine --version", pymachine("--version")),
        ("systemctl --version", ["systemctl", "--version"]),
        ("machinectl --version", ["machinectl", "--version"]),
    ]
    if sys.prefix != sys.base_prefix:  # in a venv: the interpreter it is made from, with its site
        found.insert(2, (f"{base_python} -c pass (its site-packages)", [base_python, "-c", "pass"]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    results = {}
    for label, argv_ in rows():
        timed(argv_)  # warm the page cache
        results[label] = stats([timed(argv_) for _ in range(args.repeats)])
    print(f"\n### Floors (n={args.repeats}): a process's start here\n")
    lines = [
        [label, f"{ms(s['min'])} / {ms(s['median'])} / {ms(s['max'])}"]
        for label, s in results.items()
    ]
    print(table(["command", "min / median / max (ms)"], lines))
    save("floors", {"repeats": args.repeats, "python": PY, "floors": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
