"""Bridged machines with pymachined installed (issue 19): start and stop
through the CLI and as an enabled unit, against systemd-nspawn with
``--network-veth``, interleaved; then pymachined's memory.

Rows: ``pymachine start/stop`` of a bridged, user-namespaced machine through
the warm daemon, and ``systemctl start/stop`` of the same machine enabled,
against ``machinectl start``/``systemctl stop`` of an nspawn app container
with ``--network-veth -U`` (BENCHMARKS' "bridge/veth + PrivateUsers=pick"
rows, which ran without pymachined installed). With pymachined installed, the runtime asks it for the
host side (``SetUpNetwork``) and the daemon removes the rules when the unit
stops: no clean-up process. Then pymachined's Pss right after activation,
after a bridged start (pyroute2 and libnftables loaded) and with 100 bridged
machines running (started in one call).

    python3 -m bench.network [-n REPEATS] [--machines 100]
    (inside a systemd host: bench/run --only network)
"""

from __future__ import annotations

import argparse
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
    timed,
)

OURS, REF = "bnet", "bnetref"


def _settled(value: float) -> float:
    """After a stop, the kernel tears the namespace down asynchronously (and
    pymachined removes the rules): let that end before the other side is timed."""
    time.sleep(0.3)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    parser.add_argument("--machines", type=int, default=100)
    args = parser.parse_args(argv)
    run(pymachine("install-units"))
    ensure_image()
    run(["systemctl", "stop", "pymachined.service"], check=False)
    run(pymachine("list"))  # activated, no bridged machine yet
    memory = {"activated": main_pss_kb("pymachined.service")}

    pym_create(OURS, command=["/bin/sleep", "1000000"])
    nspawn_machine(REF, private_users=True, veth=True)
    ref_unit = f"systemd-nspawn@{REF}.service"
    cli = rounds(
        args.repeats,
        {
            "start": lambda: timed(pymachine("start", OURS)),
            "start_ref": lambda: timed(["machinectl", "start", REF]),
            "stop": lambda: _settled(timed(pymachine("stop", OURS))),
            "stop_ref": lambda: _settled(timed(["systemctl", "stop", ref_unit])),
        },
        before=lambda: run(["systemctl", "reset-failed", ref_unit], check=False),
    )
    memory["after bridged starts"] = main_pss_kb("pymachined.service")
    run(pymachine("enable", OURS))
    unit = f"pymachine-{OURS}.service"
    units = rounds(
        args.repeats,
        {
            "start": lambda: timed(["systemctl", "start", unit]),
            "start_ref": lambda: timed(["systemctl", "start", ref_unit]),
            "stop": lambda: _settled(timed(["systemctl", "stop", unit])),
            "stop_ref": lambda: _settled(timed(["systemctl", "stop", ref_unit])),
        },
        before=lambda: run(["systemctl", "reset-failed", unit, ref_unit], check=False),
    )
    run(pymachine("disable", OURS), check=False)
    pym_remove(OURS)
    nspawn_remove(REF)

    names = [f"bnet{i}" for i in range(args.machines)]
    for name in names:
        pym_create(name, command=["/bin/sleep", "1000000"])
    started = time.perf_counter()
    run(pymachine("start", *names), timeout=1800)
    many_start = time.perf_counter() - started
    time.sleep(2)
    memory[f"{args.machines} bridged machines"] = main_pss_kb("pymachined.service")
    started = time.perf_counter()
    run(pymachine("stop", *names), timeout=1800)
    many_stop = time.perf_counter() - started
    time.sleep(2)
    left = run(["nft", "list", "chain", "inet", "pymachine", "ports"], check=False).stdout
    pym_remove(*names)

    print(f"load before/after: {load()}")
    rows = [
        pair_row("start: bridge + pick (CLI)", cli["start"], cli["start_ref"],
                 "machinectl start"),
        pair_row("stop: bridge + pick (CLI)", cli["stop"], cli["stop_ref"],
                 "systemctl stop nspawn@"),
        pair_row("systemctl start pymachine-M", units["start"], units["start_ref"],
                 "systemctl start nspawn@"),
        pair_row("systemctl stop pymachine-M", units["stop"], units["stop_ref"],
                 "systemctl stop nspawn@"),
    ]  # fmt: skip
    print(table(PAIR_HEADERS, rows))
    print(
        f"\n{args.machines} bridged machines: start in one call {many_start:.1f} s, "
        f"stop {many_stop:.1f} s; rules left after the stop: "
        f"{left.count('pymachine:bnet')}"
    )
    print(
        "pymachined Pss: " + ", ".join(f"{what} {kb / 1024:.1f} MB" for what, kb in memory.items())
    )
    save("network", {"cli": cli, "units": units, "pss_kb": memory,
                     "many": {"start": many_start, "stop": many_stop}})  # fmt: skip


if __name__ == "__main__":
    main()
