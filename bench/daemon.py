"""pymachined: the CLI as its client against the CLI in-process, both against
machinectl, in the same run; the first call after activation; idle memory.

Rows: ``pymachine start/stop/list/status`` through a warm pymachined, the
same verbs in-process (``PYMACHINE_NO_DAEMON=1``: the path before the
daemon), and the reference (``machinectl start``/``systemctl stop`` of an
nspawn app container, ``machinectl list``/``status``), interleaved. The issue's
bound: the daemon's ratio within 1.1x of the in-process one. Then ``pymachine
list`` right after ``systemctl stop pymachined`` (D-Bus activation included)
against a warm one, and the Pss of pymachined against systemd-machined's.

    python3 -m bench.daemon [-n REPEATS]   (inside a systemd host: bench/run --only daemon)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from bench.common import (
    PAIR_HEADERS,
    ensure_image,
    load,
    main_pss_kb,
    nspawn_machine,
    nspawn_remove,
    pair_row,
    pym_create,
    pym_remove,
    pymachine,
    rounds,
    run,
    save,
    table,
)

OURS, REF = "bd-ours", "bd-ref"
ENV = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
IN_PROCESS = {**ENV, "PYMACHINE_NO_DAEMON": "1"}


def timed(argv: list[str], env: dict[str, str] = ENV) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    run(pymachine("install-units"))
    ensure_image()
    pym_create(
        OURS, "--network", "none", "--private-users", "no", command=["/bin/sleep", "1000000"]
    )
    nspawn_machine(REF)
    run(pymachine("list"))  # activated, warm

    def settle() -> None:
        # StartLimitBurst=5 would refuse the sixth start in 10 s; then a stopped
        # machine's asynchronous teardown
        run(["systemctl", "reset-failed", f"systemd-nspawn@{REF}.service"], check=False)
        time.sleep(0.3)

    cycle = rounds(
        args.repeats,
        {
            "start daemon": lambda: timed(pymachine("start", OURS)),
            "stop daemon": lambda: timed(pymachine("stop", OURS)),
            "start in-process": lambda: timed(pymachine("start", OURS), IN_PROCESS),
            "stop in-process": lambda: timed(pymachine("stop", OURS), IN_PROCESS),
            "start ref": lambda: timed(["machinectl", "start", REF]),
            "stop ref": lambda: timed(["systemctl", "stop", f"systemd-nspawn@{REF}.service"]),
        },
        before=settle,
    )
    run(pymachine("start", OURS))
    run(["machinectl", "start", REF])
    time.sleep(1)
    reads = rounds(
        args.repeats,
        {
            "list daemon": lambda: timed(pymachine("list")),
            "list in-process": lambda: timed(pymachine("list"), IN_PROCESS),
            "list ref": lambda: timed(["machinectl", "list", "--no-pager"]),
            "status daemon": lambda: timed(pymachine("status", OURS)),
            "status in-process": lambda: timed(pymachine("status", OURS), IN_PROCESS),
            "status ref": lambda: timed(["machinectl", "status", "--no-pager", REF]),
        },
    )

    # a list while another client's stop waits 5 s for a payload that ignores
    # SIGTERM (pystemd's sd_bus_wait held the GIL: the daemon froze, 5-7 s a list)
    slow = "bd-slow"
    pym_create(slow, "--network", "none", "--stop-timeout", "5", command=[
        "/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"])  # fmt: skip
    during: list[float] = []
    for _ in range(3):
        run(pymachine("start", slow))
        stopping = subprocess.Popen(pymachine("stop", slow), stdout=subprocess.DEVNULL)
        time.sleep(1)
        during.append(timed(pymachine("list")))
        stopping.wait()
    pym_remove(slow)

    def cold() -> float:
        run(["systemctl", "stop", "pymachined.service"])
        return timed(pymachine("list"))

    first = rounds(
        max(3, args.repeats // 2), {"first": cold, "warm": lambda: timed(pymachine("list"))}
    )
    memory = {
        "pymachined": main_pss_kb("pymachined.service"),
        "machined": main_pss_kb("systemd-machined.service"),
    }
    raw = {**cycle, **reads, **first, "list during a stop": during}
    rows = []
    for verb in ("start", "stop", "list", "status"):
        ref_label = {"start": "machinectl start", "stop": "systemctl stop"}.get(
            verb, f"machinectl {verb}"
        )
        rows.append(
            pair_row(f"{verb} (pymachined)", raw[f"{verb} daemon"], raw[f"{verb} ref"], ref_label)
        )
        rows.append(
            pair_row(
                f"{verb} (in-process)", raw[f"{verb} in-process"], raw[f"{verb} ref"], ref_label
            )
        )
    rows.append(pair_row("list, first call (activation)", raw["first"], raw["warm"], "list, warm"))
    rows.append(pair_row("list during another's 5 s stop", during, raw["warm"], "list, warm"))
    print(f"load before/after: {load()}")
    print(table(PAIR_HEADERS, rows))
    print(
        f"\nidle Pss: pymachined {memory['pymachined'] / 1024:.1f} MB, "
        f"systemd-machined {memory['machined'] / 1024:.1f} MB"
    )
    save("daemon", {"raw": raw, "pss_kb": memory})
    pym_remove(OURS)
    run(["systemctl", "stop", f"systemd-nspawn@{REF}.service"], check=False)
    nspawn_remove(REF)


if __name__ == "__main__":
    main()
