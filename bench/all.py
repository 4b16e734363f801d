"""Run every benchmark in this (systemd) host and print the tables.

python3 -m bench.all [--repeats N] [--sizes 1,10,50] [--only floors,start,several,density,imports,snapshot,daemon,network]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from bench import daemon, density, floors, importtime, network, several, snapshot, start_latency
from bench.common import PY, load, run


def describe() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nspawn = run(["systemd-nspawn", "--version"]).stdout.splitlines()[0]
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}, "
        f"{nspawn}, pymachine from {Path(__file__).resolve().parent.parent}, Python {platform.python_version()} ({PY}), load {load()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--repeats", type=int, default=10)
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--only", default="floors,start,several,density,imports,daemon")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    # units started by systemd run `python3 -m machined.runtime` from / : make
    # them use the same tree as this process's CLI (a checkout, not the install)
    tree = str(Path(__file__).resolve().parent.parent)
    run(["systemctl", "set-environment", f"PYTHONPATH={tree}"])
    os.environ["PYTHONPATH"] = tree
    print(f"## Machine\n\n{describe()}")
    if "floors" in only:
        floors.main(["-n", str(args.repeats)])
    if "start" in only:
        start_latency.main(["-n", str(args.repeats)])
    if "several" in only:
        several.main(["-n", str(args.repeats)])
    if "density" in only:
        density.main(["--sizes", args.sizes])
    if "imports" in only:
        importtime.main()
    if "snapshot" in only:  # not by default: it writes several GB
        snapshot.main(["-n", str(min(args.repeats, 3))])
    if "daemon" in only:  # the CLI through pymachined against the CLI in-process
        daemon.main(["-n", str(args.repeats)])
    if "network" in only:  # not by default: 100 bridged machines; installs pymachined
        network.main(["-n", str(args.repeats)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
