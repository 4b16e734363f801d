"""Draw bench/density.png from bench/results/density.json (pip-installs
matplotlib, the ``bench`` extra, when it is missing).

    python3 -m bench.plot
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS

OUT = Path(__file__).resolve().parent / "density.png"


def _matplotlib():
    try:
        return importlib.import_module("matplotlib")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        return importlib.import_module("matplotlib")


def main() -> int:
    data = json.loads((RESULTS / "density.json").read_text())["results"]
    mpl = _matplotlib()
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in data]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    for key, style, label in (("serial", "-", "in a row"), ("concurrent", "--", "concurrently")):
        ax1.plot(
            ns,
            [r[f"{key}_ours"] for r in data],
            "o" + style,
            color="C0",
            label=f"pymachine, {label}",
        )
        ax1.plot(
            ns,
            [r[f"{key}_ref"] for r in data],
            "s" + style,
            color="C1",
            label=f"systemd-nspawn, {label}",
        )
    ax1.set(xlabel="machines", ylabel="seconds to start all", title="Start N machines")
    ax1.legend(fontsize=8)
    ax2.plot(
        ns,
        [r["mem_ours"]["pss_kb_per_machine"] / 1024 for r in data],
        "o-",
        color="C0",
        label="pymachine (its PID 1: the runtime exits once the machine is up)",
    )
    ax2.plot(
        ns,
        [r["mem_ref"]["pss_kb_per_machine"] / 1024 for r in data],
        "s-",
        color="C1",
        label="nspawn (nspawn + stub init)",
    )
    ax2.set(xlabel="machines", ylabel="Pss MiB per machine", title="Memory per machine (Pss)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax3.plot(
        ns,
        [r["cli"]["list"]["ours"]["median"] * 1000 for r in data],
        "o-",
        color="C0",
        label="pymachine list",
    )
    ax3.plot(
        ns,
        [r["cli"]["list"]["ref"]["median"] * 1000 for r in data],
        "s-",
        color="C1",
        label="machinectl list",
    )
    ax3.plot(
        ns,
        [r["cli"]["status"]["ours"]["median"] * 1000 for r in data],
        "o--",
        color="C0",
        label="pymachine status",
    )
    ax3.plot(
        ns,
        [r["cli"]["status"]["ref"]["median"] * 1000 for r in data],
        "s--",
        color="C1",
        label="machinectl status",
    )
    ax3.set(xlabel="machines running", ylabel="ms (median)", title="CLI latency")
    ax3.set_ylim(bottom=0)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
