"""CLI latency: ``pymachine list``/``status M`` vs ``machinectl list``/``status M``.

Called by :mod:`bench.density` with N machines of each kind running (so
``machinectl list`` lists 2N machines, ``pymachine list`` N: each lists what it
manages). Both ``status`` verbs read the journal (10 lines).

    python3 -m bench.cli_latency OURS_MACHINE NSPAWN_MACHINE
"""

from __future__ import annotations

import sys

from bench.common import PAIR_HEADERS, pair_row, pymachine, stats, table, timed


def measure(ours: str, ref: str, repeats: int = 10) -> dict:
    pairs = {
        "list": (pymachine("list"), ["machinectl", "list", "--no-pager"]),
        "status": (pymachine("status", ours), ["machinectl", "status", "--no-pager", ref]),
    }
    out = {}
    for verb, (a, b) in pairs.items():
        timed(a, check=False)
        timed(b, check=False)
        xs, ys = [], []
        for _ in range(repeats):
            xs.append(timed(a, check=False))
            ys.append(timed(b, check=False))
        out[verb] = {"ours": stats(xs), "ref": stats(ys), "ours_raw": xs, "ref_raw": ys}
    return out


def render(results: list[dict]) -> str:
    rows = []
    for r in results:
        for verb, m in r["cli"].items():
            rows.append(
                pair_row(f"N={r['n']}: {verb}", m["ours_raw"], m["ref_raw"], f"machinectl {verb}")
            )
    return table(PAIR_HEADERS, rows)


if __name__ == "__main__":
    result = measure(sys.argv[1], sys.argv[2])
    print(render([{"n": "?", "cli": result}]))
