"""Density: N machines from one image, started in a row and all at once.

pymachine: ``pymachine create dN --image tiny --network none --private-users no
-- /bin/sleep 1000000`` then ``pymachine start``; reference: N
``systemd-nspawn@nN.service`` app containers (``.nspawn``: ``Boot=no``,
``ProcessTwo=yes``, no veth, no user namespace, ``Volatile=overlay`` over the
one image, see :func:`bench.common.nspawn_machine`) started with ``machinectl
start``. Per-machine memory is the Pss (``/proc/PID/smaps_rollup``) of every
process the manager adds: pymachine's runtime (the unit's main process) and its
init; nspawn's process and its stub PID 1 — the payload (``sleep``) is the same
on both sides and not counted. Disk: the machine's writable layer after start.
With N machines of each kind running, the CLI latency of ``list``/``status`` is
measured too (:mod:`bench.cli_latency`).

    python3 -m bench.density [--sizes 1,10,50]
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench import cli_latency
from bench.common import (
    PY,
    comm,
    du_kb,
    ensure_image,
    load,
    nspawn_machine,
    nspawn_remove,
    pss_kb,
    pym_create,
    pym_remove,
    pymachine,
    run,
    save,
    table,
    unit_pids,
)

PAYLOAD = ["/bin/sleep", "1000000"]


def _start_serial(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    for argv in argvs:
        run(argv)
    return time.perf_counter() - start


def _start_concurrent(argvs: list[list[str]]) -> float:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for argv in argvs
    ]
    failed = []
    for argv, proc in zip(argvs, procs, strict=True):
        _out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed.append(f"{' '.join(argv)}: {err.decode().strip()}")
    elapsed = time.perf_counter() - start
    if failed:
        raise RuntimeError("\n".join(failed))
    return elapsed


def _memory(units: list[str], payload_comm: str = "sleep") -> dict:
    """Pss/Rss summed over the manager's processes of UNITS (payload excluded)."""
    pss = rss = count = 0
    per_comm: dict[str, list[int]] = {}
    for unit in units:
        for pid in unit_pids(unit):
            name = comm(pid)
            if name == payload_comm:
                continue
            try:
                p, r = pss_kb(pid)
            except OSError:
                continue
            pss += p
            rss += r
            count += 1
            per_comm.setdefault(name, []).append(p)
    n = len(units)
    return {
        "pss_kb_per_machine": pss / n,
        "rss_kb_per_machine": rss / n,
        "processes_per_machine": count / n,
        "pss_kb_by_process": {k: sum(v) / len(v) for k, v in per_comm.items()},
    }


def one_size(n: int) -> dict:
    ours = [f"d{i}" for i in range(n)]
    refs = [f"n{i}" for i in range(n)]
    for name in ours:
        pym_create(name, "--network", "none", "--private-users", "no", command=PAYLOAD)
    for name in refs:
        nspawn_machine(name)
    result: dict = {"n": n}
    # in a row
    result["serial_ours"] = _start_serial([pymachine("start", m) for m in ours])
    result["serial_ref"] = _start_serial([["machinectl", "start", m] for m in refs])
    result["mem_ours"] = _memory([f"pymachine-{m}.service" for m in ours])
    result["mem_ref"] = _memory([f"systemd-nspawn@{m}.service" for m in refs])
    result["disk_kb_ours"] = sum(du_kb(Path("/var/lib/pymachine/machines") / m) for m in ours) / n
    # nspawn's Volatile=overlay upper is a tmpfs in its mount namespace: count its
    # size through the stub init's root (the payload's view of /)
    result["disk_kb_ref"] = _nspawn_upper_kb(refs)
    result["cli"] = cli_latency.measure(ours[0], refs[0], repeats=5 if n > 10 else 10)
    run(pymachine("stop", *ours))
    run(["systemctl", "stop", *[f"systemd-nspawn@{m}.service" for m in refs]])
    # all at once
    result["concurrent_ours"] = _start_concurrent([pymachine("start", m) for m in ours])
    result["concurrent_ref"] = _start_concurrent([["machinectl", "start", m] for m in refs])
    pym_remove(*ours)
    nspawn_remove(*refs)
    result["load"] = load()
    return result


def _nspawn_upper_kb(refs: list[str]) -> float:
    total = 0
    for name in refs:
        pids = [p for p in unit_pids(f"systemd-nspawn@{name}.service") if comm(p) == "sleep"]
        if not pids:
            continue
        cp = run(["nsenter", "-t", str(pids[0]), "-m", "df", "-k", "/"], check=False)
        lines = cp.stdout.split("\n")
        if len(lines) > 1 and lines[1].split():
            total += int(lines[1].split()[2])
    return total / len(refs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,10,50")
    args = parser.parse_args(argv)
    ensure_image()
    load_start = load()
    results = [one_size(int(n)) for n in args.sizes.split(",")]
    print(f"\n### Density (load {load_start} → {load()}; python {PY})\n")
    rows = []
    for r in results:
        rows.append(
            [
                r["n"],
                f"{r['serial_ours']:.2f} / {r['serial_ref']:.2f} ({r['serial_ours'] / r['serial_ref']:.1f}x)",
                f"{r['concurrent_ours']:.2f} / {r['concurrent_ref']:.2f} ({r['concurrent_ours'] / r['concurrent_ref']:.1f}x)",
                f"{r['mem_ours']['pss_kb_per_machine'] / 1024:.2f} / {r['mem_ref']['pss_kb_per_machine'] / 1024:.2f} "
                f"({r['mem_ours']['pss_kb_per_machine'] / r['mem_ref']['pss_kb_per_machine']:.1f}x)",
                f"{r['mem_ours']['rss_kb_per_machine'] / 1024:.1f} / {r['mem_ref']['rss_kb_per_machine'] / 1024:.1f}",
                f"{r['disk_kb_ours']:.0f} / {r['disk_kb_ref']:.0f}",
            ]
        )
    print(
        table(
            [
                "N",
                "start in a row, s (pym / nspawn)",
                "start concurrently, s",
                "Pss MiB/machine",
                "Rss MiB/machine",
                "disk kB/machine",
            ],
            rows,
        )
    )
    last = results[-1]
    print(
        "\nPss by process (kB, mean):",
        {
            "pymachine": last["mem_ours"]["pss_kb_by_process"],
            "nspawn": last["mem_ref"]["pss_kb_by_process"],
        },
    )
    print("\n### CLI latency with N machines of each kind running\n")
    print(cli_latency.render(results))
    save("density", {"load_start": load_start, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
