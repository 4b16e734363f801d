"""Several machines in one call: ``pymachine start m0 … m9`` vs ``machinectl start``.

Both queue every start job first and then wait for all of them (pymachine on
one bus connection, as systemctl and machinectl do), so the machines start side
by side; stop is ``pymachine stop m0 … m9`` vs ``systemctl stop
systemd-nspawn@n0.service …`` (both wait for every stop job). The machines are
those of :mod:`bench.density`: ``--network none --private-users no`` against
nspawn app containers over the same image (:func:`bench.common.nspawn_machine`).

    python3 -m bench.several [-n REPEATS] [--machines N]
"""

from __future__ import annotations

import argparse

from bench.common import (
    PAIR_HEADERS,
    ensure_image,
    load,
    nspawn_machine,
    nspawn_remove,
    pair_row,
    pym_create,
    pym_remove,
    pymachine,
    rounds,
    run,
    save,
    stats,
    table,
    timed,
)

PAYLOAD = ["/bin/sleep", "1000000"]


def measure(n: int, repeats: int) -> dict:
    ours = [f"s{i}" for i in range(n)]
    refs = [f"sn{i}" for i in range(n)]
    services = [f"systemd-nspawn@{m}.service" for m in refs]
    for name in ours:
        pym_create(name, "--network", "none", "--private-users", "no", command=PAYLOAD)
    for name in refs:
        nspawn_machine(name)
    try:
        raw = rounds(
            repeats,
            {
                "start": lambda: timed(pymachine("start", *ours)),
                "start_ref": lambda: timed(["machinectl", "start", *refs]),
                "stop": lambda: timed(pymachine("stop", *ours)),
                "stop_ref": lambda: timed(["systemctl", "stop", *services]),
            },
            # nspawn@'s StartLimitBurst=5 would refuse the sixth start in 10 s
            before=lambda: run(["systemctl", "reset-failed", *services], check=False),
        )
    finally:
        pym_remove(*ours)
        nspawn_remove(*refs)
    return {"n": n, "raw": raw, **{key: stats(values) for key, values in raw.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    parser.add_argument("--machines", type=int, default=10)
    args = parser.parse_args(argv)
    ensure_image()
    load_start = load()
    result = measure(args.machines, args.repeats)
    n, raw = result["n"], result["raw"]
    print(f"\n### {n} machines in one call (n={args.repeats}, load {load_start} → {load()})\n")
    rows = [
        pair_row(f"start {n} in one call", raw["start"], raw["start_ref"], "machinectl start"),
        pair_row(f"stop {n} in one call", raw["stop"], raw["stop_ref"], "systemctl stop nspawn@"),
    ]
    print(table(PAIR_HEADERS, rows))
    save("several", {"repeats": args.repeats, "load_start": load_start, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
