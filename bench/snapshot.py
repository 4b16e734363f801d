"""Snapshot of a machine holding 1 GB of data: time and extra disk, against
``cp -a`` of its writable layer and ``machinectl clone`` of an image holding
the same files (on a file system without reflinks: machined's copy fallback).

    python3 -m bench.snapshot [-n REPEATS] [--mb 1024]   (inside a systemd host:
    bench/run --only snapshot)

Extra disk is what ``du`` counts for the copy beyond its source, the two
measured in one call (an inode shared by hard links counts once), so other
writers on the same disk do not enter it. Page cache warm (nothing is
dropped: the machine is shared).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.common import ensure_image, load, pym_remove, pymachine, run, save, stats, table

NAME = "bench-snap"
STATE = Path("/var/lib/pymachine/machines") / NAME
UPPER = STATE / "upper"
IMAGES = Path("/var/lib/machines")


def du_kb(*paths: Path) -> int:
    """Disk used by PATHS together (kB), each inode once."""
    out = run(["du", "-skc", *map(str, paths)]).stdout.splitlines()[-1]
    return int(out.split()[0])


def extra_kb(source: Path, copy: Path) -> int:
    return du_kb(source, copy) - du_kb(source)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    run(argv, timeout=1800)
    return time.perf_counter() - start


def fill(mb: int) -> None:
    """Half the data in one file, half in 512 KiB files, written inside the machine."""
    small = mb // 2 * 2  # 512 KiB files
    script = (
        f"mkdir -p /data/small && dd if=/dev/urandom of=/data/big bs=1M count={mb - mb // 2} "
        f"2>/dev/null && i=0; while [ $i -lt {small} ]; do "
        "dd if=/dev/urandom of=/data/small/f$i bs=512k count=1 2>/dev/null; i=$((i+1)); done"
    )
    run(pymachine("exec", NAME, "--", "/bin/sh", "-c", script), timeout=1800)
    run(["sync"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=3)
    parser.add_argument("--mb", type=int, default=1024)
    args = parser.parse_args(argv)
    ensure_image()
    pym_remove(NAME)
    run(pymachine("create", NAME, "--image", "tiny", "--network", "none", "--", "/bin/sleep", "1d"))
    run(pymachine("start", NAME))
    clone_src = IMAGES / "bench-snap-data"
    results: dict[str, dict] = {}
    try:
        fill(args.mb)
        shutil.rmtree(clone_src, ignore_errors=True)
        run(["cp", "-a", str(UPPER), str(clone_src)])  # an image with the same files
        time.sleep(2.5)  # the data older than the link margin (machined.treecopy)
        raw: dict[str, list[tuple[float, int]]] = {k: [] for k in ("first", "next", "cp", "clone")}
        snaps = STATE / "snapshots"
        for i in range(args.repeats):
            for snap in _names():  # each round's first snapshot has none to link to
                run(pymachine("snapshot", "remove", NAME, snap))
            seconds = timed(pymachine("snapshot", NAME, f"a{i}"))
            raw["first"].append((seconds, extra_kb(UPPER, snaps / f"a{i}")))
            run(pymachine("exec", NAME, "--", "/bin/sh", "-c", _CHANGE_1PCT))
            seconds = timed(pymachine("snapshot", NAME, f"b{i}"))
            raw["next"].append((seconds, extra_kb(snaps / f"a{i}", snaps / f"b{i}")))
            copy = STATE.parent / "bench-cp"
            shutil.rmtree(copy, ignore_errors=True)
            seconds = timed(["cp", "-a", str(UPPER), str(copy)])
            raw["cp"].append((seconds, extra_kb(UPPER, copy)))
            shutil.rmtree(copy)
            seconds = timed(["machinectl", "clone", clone_src.name, "bench-snap-clone"])
            raw["clone"].append((seconds, extra_kb(clone_src, IMAGES / "bench-snap-clone")))
            run(["machinectl", "remove", "bench-snap-clone"])
        backup_file = Path("/var/lib/pymachine/bench-snap.tar.zst")
        backup_s = timed(pymachine("backup", NAME, str(backup_file)))
        archive_kb = backup_file.stat().st_size // 1024
        restore_s = timed(pymachine("restore-backup", str(backup_file), "bench-snap-r"))
        backup_file.unlink()
        pym_remove("bench-snap-r")
    finally:
        pym_remove(NAME)
        shutil.rmtree(clone_src, ignore_errors=True)
        run(["machinectl", "remove", "bench-snap-clone"], check=False)
    labels = {
        "first": "pymachine snapshot (first: a full copy, machine frozen)",
        "next": "pymachine snapshot (next, 10 small files = 5 MB changed: links to the previous)",
        "cp": "cp -a of the writable layer",
        "clone": "machinectl clone of an image with the same files",
    }
    rows = []
    for key, label in labels.items():
        s = stats([t for t, _ in raw[key]])
        kb = max(k for _, k in raw[key])
        rows.append(
            [label, f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}", f"{kb / 1024:.0f}"]
        )
        results[key] = {**s, "extra_kb": [k for _, k in raw[key]]}
    rows.append(
        [
            "pymachine backup to .tar.zst (running: from a snapshot)",
            f"{backup_s:.2f}",
            f"{archive_kb / 1024:.0f} (archive)",
        ]
    )
    rows.append(
        ["pymachine restore-backup of it (verified, then renamed)", f"{restore_s:.2f}", "-"]
    )
    print(
        f"\n### Snapshot of a machine with {args.mb} MB of data (n={args.repeats}, load {load()})\n"
    )
    print(table(["what", "seconds min / median / max", "extra disk (MB)"], rows))
    save(
        "snapshot",
        {
            "mb": args.mb,
            "repeats": args.repeats,
            **results,
            "backup_s": backup_s,
            "archive_kb": archive_kb,
            "restore_s": restore_s,
        },
    )
    return 0


#: 10 of the small files rewritten in place (an application's churn between two snapshots)
_CHANGE_1PCT = "for f in /data/small/f1 /data/small/f2 /data/small/f3 /data/small/f4 /data/small/f5 /data/small/f6 /data/small/f7 /data/small/f8 /data/small/f9 /data/small/f10; do dd if=/dev/urandom of=$f bs=512k count=1 conv=notrunc 2>/dev/null; done"


def _names() -> list[str]:
    import json

    return [s["name"] for s in json.loads(run(pymachine("snapshots", NAME, "--json")).stdout)]


if __name__ == "__main__":
    raise SystemExit(main())
