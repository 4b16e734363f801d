"""Start (and stop) latency: pymachine vs systemd-nspawn, same busybox rootfs.

Foreground: ``pymachine run M -- /bin/true`` vs ``systemd-nspawn -q -D ROOTFS
/bin/true`` (both register with machined, both run /bin/true under a PID 1 of
their own: pymachine's init, nspawn's payload is PID 1 itself).

Service: ``pymachine start M`` (returns when the unit is READY) vs
``machinectl start M`` of a ``systemd-nspawn@M.service`` whose ``.nspawn`` file
makes it an app container (``Boot=no``, ``ProcessTwo=yes``, ``/bin/sleep``);
stop: ``pymachine stop M`` vs ``systemctl stop systemd-nspawn@M.service``
(both wait for the stop job; ``machinectl stop`` returns before the machine is
gone).

Unit only: an enabled machine (``pymachine enable``) started and stopped with
``systemctl`` against ``systemd-nspawn@M.service``: what systemd does at boot
for ``machines.target``, pymachine's unit against nspawn's with no CLI on
either side (the CLI's Python start is most of what the rows above add).

With pymachined installed (``pymachine install-units``, as a host that uses
pymachine has it): a bridged machine's runtime asks the daemon for its
network, and the CLI's verbs go through it. ``--no-daemon``: without it, the
CLI and the runtime doing everything themselves.

    python3 -m bench.start_latency [-n REPEATS] [--no-daemon]
"""

from __future__ import annotations

import argparse
import time

from bench.common import (
    IMAGE,
    IMAGES,
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

FOREGROUND = [
    # label, pymachine create flags, nspawn flags
    ("no network, no userns", ["--network", "none", "--private-users", "no"], []),
    ("no network, PrivateUsers=pick", ["--network", "none"], ["-U"]),
    ("defaults: bridge + PrivateUsers=pick", [], ["-U", "--network-veth"]),
]

SERVICE = [
    ("no network, no userns", ["--network", "none", "--private-users", "no"], False, False),
    ("bridge/veth + PrivateUsers=pick", [], True, True),
]


def _rounds_of(repeats: int, argvs: dict[str, list[str]]) -> dict[str, list[float]]:
    """:func:`bench.common.rounds` of commands, each timed as it is."""
    return rounds(repeats, {key: (lambda argv=argv: timed(argv)) for key, argv in argvs.items()})


def foreground(repeats: int) -> list[dict]:
    rootfs = str(IMAGES / IMAGE)
    results = []
    for index, (label, flags, nspawn_flags) in enumerate(FOREGROUND):
        name = f"bfg{index}"
        pym_create(name, *flags, command=["/bin/true"])
        ours_argv = pymachine("run", name, "--", "/bin/true")
        ref_argv = ["systemd-nspawn", "-q", *nspawn_flags, "-D", rootfs, "/bin/true"]
        raw = _rounds_of(repeats, {"ours": ours_argv, "ref": ref_argv})
        ours, ref = raw["ours"], raw["ref"]
        pym_remove(name)
        results.append(
            {
                "label": label,
                "pymachine": f"pymachine run M -- /bin/true ({' '.join(flags) or 'defaults'})",
                "reference": f"systemd-nspawn -q {' '.join(nspawn_flags)} -D ROOTFS /bin/true",
                "ref_label": " ".join(["nspawn", *nspawn_flags]),
                "ours": stats(ours),
                "ref": stats(ref),
                "ours_raw": ours,
                "ref_raw": ref,
            }
        )
    return results


#: Seconds after each stop before the other side is timed: a stopped machine's
#: network namespace is torn down by the kernel asynchronously, after stop has
#: returned (nspawn's and, for a bridged machine without ports, pymachine's),
#: and that work slowed the next stop measured (nspawn's bridged stop: 32 ms
#: right after pymachine's, 15 ms half a second later).
SETTLE = 0.3


def _settled(value: float) -> float:
    time.sleep(SETTLE)
    return value


NSPAWN_FAILURES: list[str] = []


def _nspawn_start(name: str) -> float:
    """``machinectl start``; on a failed start (seen under heavy load: nspawn's
    own "quick restart" races), reset the unit and try again, untimed failures
    are counted and reported."""
    for _attempt in range(3):
        try:
            return timed(["machinectl", "start", name])
        except RuntimeError as exc:
            NSPAWN_FAILURES.append(str(exc).splitlines()[0])
            timed(["systemctl", "reset-failed", f"systemd-nspawn@{name}.service"], check=False)
            time.sleep(0.5)
    return timed(["machinectl", "start", name])


def _service_rounds(repeats: int, name: str, ref_name: str) -> dict[str, list[float]]:
    ref_unit = f"systemd-nspawn@{ref_name}.service"
    return rounds(
        repeats,
        {
            "start": lambda: timed(pymachine("start", name)),
            "start_ref": lambda: _nspawn_start(ref_name),
            "stop": lambda: _settled(timed(pymachine("stop", name))),
            "stop_ref": lambda: _settled(timed(["systemctl", "stop", ref_unit])),
        },
    )


def service(repeats: int) -> list[dict]:
    results = []
    for index, (label, flags, users, veth) in enumerate(SERVICE):
        name, ref_name = f"bsv{index}", f"bsn{index}"
        pym_create(name, *flags, command=["/bin/sleep", "1000000"])
        nspawn_machine(ref_name, private_users=users, veth=veth)
        raw = _service_rounds(repeats, name, ref_name)
        starts, ref_starts, stops, ref_stops = (
            raw[k] for k in ("start", "start_ref", "stop", "stop_ref")
        )
        pym_remove(name)
        nspawn_remove(ref_name)
        results.append(
            {
                "label": label,
                "start": {
                    "ours": stats(starts),
                    "ref": stats(ref_starts),
                    "ours_raw": starts,
                    "ref_raw": ref_starts,
                },
                "stop": {
                    "ours": stats(stops),
                    "ref": stats(ref_stops),
                    "ours_raw": stops,
                    "ref_raw": ref_stops,
                },
            }
        )
    return results


def _unit_rounds(repeats: int, unit: str, ref_unit: str) -> dict[str, list[float]]:
    return rounds(
        repeats,
        {
            "start": lambda: timed(["systemctl", "start", unit]),
            "start_ref": lambda: timed(["systemctl", "start", ref_unit]),
            "stop": lambda: _settled(timed(["systemctl", "stop", unit])),
            "stop_ref": lambda: _settled(timed(["systemctl", "stop", ref_unit])),
        },
        # both units' StartLimitBurst=5 would refuse the sixth start in 10 s
        before=lambda: run(["systemctl", "reset-failed", unit, ref_unit], check=False),
    )


def unit_only(repeats: int) -> list[dict]:
    """``systemctl start``/``stop`` of an enabled machine's unit vs nspawn@'s."""
    results = []
    for index, (label, flags, users, veth) in enumerate(SERVICE):
        name, ref_name = f"bun{index}", f"bunn{index}"
        pym_create(name, *flags, command=["/bin/sleep", "1000000"])
        run(pymachine("enable", name))
        nspawn_machine(ref_name, private_users=users, veth=veth)
        units = (f"pymachine-{name}.service", f"systemd-nspawn@{ref_name}.service")
        try:
            raw = _unit_rounds(repeats, *units)
        finally:
            run(pymachine("disable", name), check=False)
            pym_remove(name)
            nspawn_remove(ref_name)
        results.append({"label": label, **{k: stats(v) for k, v in raw.items()}, "raw": raw})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    parser.add_argument("--no-daemon", action="store_true")
    args = parser.parse_args(argv)
    ensure_image()
    if not args.no_daemon:
        run(pymachine("install-units"))
        run(pymachine("list"))  # activated, warm
    load_start = load()
    fg = foreground(args.repeats)
    sv = service(args.repeats)
    un = unit_only(args.repeats)
    print(f"\n### Start latency, foreground (n={args.repeats}, load {load_start} → {load()})\n")
    rows = [pair_row(f"run: {r['label']}", r["ours_raw"], r["ref_raw"], r["ref_label"]) for r in fg]
    print(table(PAIR_HEADERS, rows))
    print(f"\n### Start/stop latency, service (n={args.repeats})\n")
    rows = []
    for r in sv:
        rows.append(
            pair_row(
                f"start: {r['label']}",
                r["start"]["ours_raw"],
                r["start"]["ref_raw"],
                "machinectl start",
            )
        )
        rows.append(
            pair_row(
                f"stop: {r['label']}",
                r["stop"]["ours_raw"],
                r["stop"]["ref_raw"],
                "systemctl stop nspawn@",
            )
        )
    print(table(PAIR_HEADERS, rows))
    print(f"\n### Unit only: systemctl start/stop of an enabled machine (n={args.repeats})\n")
    rows = []
    for r in un:
        for verb in ("start", "stop"):
            rows.append(
                pair_row(
                    f"systemctl {verb} pymachine-M: {r['label']}",
                    r["raw"][verb],
                    r["raw"][f"{verb}_ref"],
                    f"systemctl {verb} nspawn@",
                )
            )
    print(table(PAIR_HEADERS, rows))
    save(
        "start_latency",
        {
            "repeats": args.repeats,
            "load_start": load_start,
            "foreground": fg,
            "service": sv,
            "unit_only": un,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
