"""Tier 2: build a Debian VM image with pymachine installed, boot it under qemu, get results out.

The pieces, in the order a run uses them:

1. **Base image** (cached): ``mmdebstrap --variant=minbase`` with :data:`PACKAGES`, kept
   under ``/var/cache/pymachine-tests/tier2/base-KEY/`` where KEY hashes the package
   list, the suite and :data:`IMAGE_VERSION`. Built once; later runs reuse it.
2. **Wheels**: the project's dependencies (pinned to the versions installed on the
   host, so the VM runs what the host tests run) are cached as wheels; the project's
   own wheel is built fresh from the working tree every run.
3. **Per-run root file system**: a copy of the base, the host kernel's modules,
   the wheels installed with the image's own ``pip`` (offline, in a chroot), the
   in-VM tests (``inside/``) and a oneshot unit that runs them; then
   ``mkfs.ext4 -d`` turns the directory into ``disk.img`` (no loop device).
4. **Boots**: ``qemu-system-x86_64 -accel tcg -cpu max -no-reboot`` with the host's
   ``linux-image-cloud-amd64`` kernel. The guest runs one *stage* of the tests per
   boot (``@pytest.mark.stage(N)``, default 1), writes JUnit XML and logs to a
   second disk (ext4, serial ``tier2-results``), then reboots (qemu exits because
   of ``-no-reboot``, and the host starts it again on the same disk) or powers off
   after the last stage. The stage counter lives on the guest's root disk, so
   the guest sees a real reboot: a clean shutdown and a fresh boot.
5. **Results**: the host reads the results disk with ``debugfs -R rdump``: no
   loop device, no mount.

A third disk (serial ``tier2-swap``, made by ``mkswap``) is swap the guest can turn on.
Only the swap tests do (and turn it off again): with swap on, a 200 MB payload
under ``MemoryMax=50M`` is swapped out rather than OOM-killed, which is exactly what
``MemorySwapMax=0`` must prevent.

Run it alone (as root) to debug: ``python3 tests/tier2/vm.py [--keep] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Bump to throw away every cached base image (e.g. after changing how it is built).
IMAGE_VERSION = 1
SUITE = "bookworm"
#: What the guest needs: systemd as PID 1 with machined, python3 + pip (to install
#: the wheels offline), busybox-static (``pymachine bootstrap --distro busybox``),
#: the network tools pymachine drives, and ``mount`` for swapon/mount.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-container",
    "dbus",
    "udev",
    "kmod",
    "mount",
    "procps",
    "iproute2",
    "nftables",
    "busybox-static",
    "python3",
    "python3-pip",
)
#: Python packages installed into the guest beside the project (pyseccomp is a
#: declared dependency too; inside/test_smoke.py::test_runtime_dependencies_declared
#: checks that every runtime import is declared).
GUEST_PYTHON_EXTRAS = ("pytest", "pytest-timeout", "pyseccomp")
#: How many boots (stages) the in-VM tests span; see ``inside/conftest.py``.
STAGES = 3

CACHE = Path(os.environ.get("PYMACHINE_TIER2_CACHE", "/var/cache/pymachine-tests/tier2"))
PROJECT = Path(__file__).resolve().parents[2]
INSIDE = Path(__file__).resolve().parent / "inside"

GUEST_LIB = "usr/local/lib/tier2"  # in-VM tests, the stage runner, config
RESULTS_SERIAL = "tier2-results"
SWAP_SERIAL = "tier2-swap"

ROOT_DISK_SIZE = "3G"
RESULTS_DISK_MB = 64
SWAP_DISK_MB = 512
GUEST_MEMORY_MB = 2048
BOOT_TIMEOUT = float(os.environ.get("PYMACHINE_TIER2_BOOT_TIMEOUT", "600"))


class Tier2Error(RuntimeError):
    """The harness itself failed (not a test inside the VM)."""


def log(msg: str) -> None:
    print(f"[tier2 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    try:
        return subprocess.run(cmd, **kw)
    except subprocess.CalledProcessError as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise Tier2Error(
            f"command failed ({exc.returncode}): {' '.join(cmd)}\n{(out or '')[-3000:]}{(err or '')[-3000:]}"
        ) from None


# --------------------------------------------------------------------------- prerequisites
@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    initrd: Path
    modules: Path


def find_kernel() -> Kernel:
    """The newest cloud kernel in /boot with its initrd and modules."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        initrd = Path("/boot") / f"initrd.img-{version}"
        modules = Path("/lib/modules") / version
        if initrd.exists() and modules.is_dir():
            found.append(Kernel(version, vmlinuz, initrd, modules))
    if not found:
        raise Tier2Error("no kernel with initrd and modules in /boot (linux-image-cloud-amd64)")
    found.sort(
        key=lambda k: (
            "cloud" in k.version,
            [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", k.version)],
        )
    )
    return found[-1]


def missing_prerequisites() -> list[str]:
    """Why tier 2 cannot run here, or [] when it can."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "debugfs", "mkswap", "chroot"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    try:
        find_kernel()
    except Tier2Error as exc:
        problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------- base image
def base_key() -> str:
    blob = json.dumps({"v": IMAGE_VERSION, "suite": SUITE, "packages": sorted(PACKAGES)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build_base(timings: dict[str, float]) -> Path:
    """The cached minbase root file system (built on first use)."""
    base = CACHE / f"base-{base_key()}"
    with locked(CACHE / "base.lock"):
        if (base / ".tier2-complete").exists():
            timings["image_base"] = 0.0
            return base
        t0 = time.monotonic()
        tmp = CACHE / f".{base.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"building base image {base.name} with mmdebstrap (cached afterwards)")
        run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=" + ",".join(PACKAGES),
                # Keep the image small: no docs, no apt lists.
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/info/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-include=/usr/share/locale/locale.alias",
                "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*.bin",
                SUITE,
                str(tmp),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        (tmp / ".tier2-complete").write_text(base_key() + "\n")
        # Drop stale bases of older keys: one cache entry at a time.
        for old in CACHE.glob("base-*"):
            if old != base:
                shutil.rmtree(old, ignore_errors=True)
        tmp.rename(base)
        timings["image_base"] = time.monotonic() - t0
        log(f"base image built in {timings['image_base']:.1f}s")
        return base


# --------------------------------------------------------------------------- wheels
def _host_pins() -> list[str]:
    """Pin the guest's Python packages to what the host has installed, when it has them."""
    from importlib import metadata

    names = (
        "pystemd",
        "jinja2",
        "markupsafe",
        "lxml",
        "psutil",
        "pytest",
        "pluggy",
        "iniconfig",
        "packaging",
        "pytest-timeout",
    )
    pins = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{name}=={metadata.version(name)}")
    return pins


def _project_dependencies() -> list[str]:
    import tomllib

    data = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    return list(data["project"].get("dependencies", []))


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def build_wheels(run_dir: Path, timings: dict[str, float]) -> Path:
    """A directory of wheels: cached dependencies plus a fresh wheel of the project."""
    t0 = time.monotonic()
    reqs = _project_dependencies() + list(GUEST_PYTHON_EXTRAS)
    pins = _host_pins()
    key = hashlib.sha256(json.dumps([reqs, pins, sys.version_info[:2]]).encode()).hexdigest()[:16]
    deps = CACHE / f"wheels-{key}"
    with locked(CACHE / "wheels.lock"):
        if not (deps / ".tier2-complete").exists():
            log("building dependency wheels (cached afterwards)")
            tmp = CACHE / f".wheels-{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            constraints = CACHE / f".constraints-{os.getpid()}.txt"
            constraints.write_text("\n".join(pins) + "\n")
            try:
                run(
                    _pip("wheel", "-q", "-w", str(tmp), "-c", str(constraints), *reqs),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            finally:
                constraints.unlink(missing_ok=True)
            (tmp / ".tier2-complete").touch()
            for old in CACHE.glob("wheels-*"):
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(deps)
    wheels = run_dir / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.copytree(deps, wheels)
    # Build from a copy of the tree: an in-tree build writes build/ and *.egg-info
    # into the shared working tree.
    src = run_dir / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(
        PROJECT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*cache",
            "tests",
            "bench",
        ),
    )
    run(
        _pip("wheel", "-q", "--no-deps", "-w", str(wheels), str(src)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    shutil.rmtree(src)
    timings["wheels"] = time.monotonic() - t0
    return wheels


# --------------------------------------------------------------------------- per-run root fs
MASKED_UNITS = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "console-getty.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    # No logins on this VM; logind alone took 30 s to start under TCG on a busy host.
    "systemd-logind.service",
    "systemd-user-sessions.service",
)
RUNNER_UNIT = """\
[Unit]
Description=pymachine tier-2 tests (one stage per boot)
Wants=machines.target
After=multi-user.target machines.target
ConditionPathExists=/{lib}/run-stage

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /{lib}/run-stage
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

RUN_STAGE = r'''
"""Run one stage of the in-VM tests, store results on the results disk, reboot or power off."""
import json, os, subprocess, sys, time
from pathlib import Path

LIB = Path("/{lib}")
CONFIG = json.loads((LIB / "config.json").read_text())
RESULTS = Path("/results")
STAGE_FILE = Path("/var/lib/tier2/stage")


def wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def main():
    dev = "/dev/disk/by-id/virtio-" + CONFIG["results_serial"]
    if not wait_for(dev):
        print("tier2: results disk missing", flush=True)
        return "poweroff"
    RESULTS.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "sync", dev, str(RESULTS)], check=True)
    stage = int(STAGE_FILE.read_text()) if STAGE_FILE.exists() else 1
    (RESULTS / f"stage{{stage}}.started").write_text(str(time.clock_gettime(time.CLOCK_BOOTTIME)))
    env = dict(os.environ, TIER2_STAGE=str(stage), TIER2_STAGES=str(CONFIG["stages"]),
               TIER2_RESULTS=str(RESULTS), PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(RESULTS / f"stage{{stage}}.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider",
             "--timeout", str(CONFIG["test_timeout"]),
             f"--junitxml={{RESULTS}}/stage{{stage}}.xml", str(LIB / "inside")],
            cwd=LIB / "inside", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            out.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    took = time.monotonic() - t0
    with open(RESULTS / f"journal-stage{{stage}}.txt", "w") as out:
        subprocess.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic"], stdout=out)
    STAGE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STAGE_FILE.write_text(str(stage + 1))
    last = stage >= CONFIG["stages"]
    (RESULTS / f"stage{{stage}}.done").write_text(json.dumps(
        {{"pytest_rc": rc, "seconds": took, "uptime": time.clock_gettime(time.CLOCK_BOOTTIME),
          "next": "poweroff" if last else "reboot"}}))
    os.sync()
    return "poweroff" if last else "reboot"


try:
    action = main()
except BaseException as exc:
    print(f"tier2: stage runner failed: {{exc!r}}", flush=True)
    action = "poweroff"
subprocess.run(["umount", str(RESULTS)])
os.sync()
print(f"tier2: {{action}}", flush=True)
subprocess.run(["systemctl", "--no-block", action])
'''


def prepare_rootfs(
    base: Path, run_dir: Path, wheels: Path, kernel: Kernel, timings: dict[str, float]
) -> Path:
    t0 = time.monotonic()
    rootfs = run_dir / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)])
    (rootfs / ".tier2-complete").unlink(missing_ok=True)

    # Kernel modules of the kernel we boot (overlay, veth, bridge, nftables ...).
    mods = rootfs / "usr/lib/modules" / kernel.version
    mods.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", str(kernel.modules), str(mods)])

    # The project and its dependencies, offline, with the guest's own pip.
    guest_wheels = rootfs / "tmp/tier2-wheels"
    shutil.copytree(wheels, guest_wheels)
    run(
        [
            "chroot",
            str(rootfs),
            "/usr/bin/python3",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            "/tmp/tier2-wheels",
            "--break-system-packages",
            "--root-user-action=ignore",
            "--no-warn-script-location",
            "--disable-pip-version-check",
            "pymachine",
            *GUEST_PYTHON_EXTRAS,
        ],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    shutil.rmtree(guest_wheels)

    # In-VM tests and their runner.
    lib = rootfs / GUEST_LIB
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copytree(INSIDE, lib / "inside", ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "run-stage").write_text(RUN_STAGE.format(lib=GUEST_LIB))
    (lib / "config.json").write_text(
        json.dumps(
            {
                "stages": STAGES,
                "results_serial": RESULTS_SERIAL,
                "swap_serial": SWAP_SERIAL,
                "test_timeout": 240,
            }
        )
    )
    units = rootfs / "etc/systemd/system"
    (units / "tier2-tests.service").write_text(RUNNER_UNIT.format(lib=GUEST_LIB))
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "tier2-tests.service").symlink_to("/etc/systemd/system/tier2-tests.service")
    # Precompiled: under TCG, compiling every module at first import costs seconds.
    run(
        ["chroot", str(rootfs), "/usr/bin/python3", "-m", "compileall", "-q", "/" + GUEST_LIB],
        stdout=subprocess.PIPE,
    )
    # Nothing on the console but us (no gettys), and nothing that only costs boot time.
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    (rootfs / "etc/hostname").write_text("tier2-vm\n")
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    # A fixed machine-id: no first-boot preset run, and journal/machine names stay stable.
    (rootfs / "etc/machine-id").write_text(hashlib.md5(b"pymachine-tier2").hexdigest() + "\n")
    (rootfs / "var/lib/tier2").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/lib/tier2/stage").write_text("1")
    timings["image_prepare"] = time.monotonic() - t0
    return rootfs


def make_disks(rootfs: Path, run_dir: Path, timings: dict[str, float]) -> dict[str, Path]:
    t0 = time.monotonic()
    disks = {
        "root": run_dir / "disk.img",
        "results": run_dir / "results.img",
        "swap": run_dir / "swap.img",
    }
    for d in disks.values():
        d.unlink(missing_ok=True)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "tier2root",
            "-d",
            str(rootfs),
            str(disks["root"]),
            ROOT_DISK_SIZE,
        ]
    )
    with open(disks["results"], "wb") as fh:
        fh.truncate(RESULTS_DISK_MB << 20)
    run(["mkfs.ext4", "-q", "-F", "-L", "tier2results", str(disks["results"])])
    with open(disks["swap"], "wb") as fh:
        fh.truncate(SWAP_DISK_MB << 20)
    disks["swap"].chmod(0o600)
    # (mkswap warns about holes: irrelevant, the guest sees a block device.)
    run(
        ["mkswap", "-L", "tier2swap", str(disks["swap"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    shutil.rmtree(rootfs)
    timings["disks"] = time.monotonic() - t0
    return disks


# --------------------------------------------------------------------------- initramfs
#: Modules the kernel needs to see the root disk (ext4 is built into the cloud kernel).
ROOT_MODULES = ("virtio_pci", "virtio_blk")

INITRAMFS_INIT = """#!/bin/busybox sh
# pymachine tier 2: the smallest initramfs that mounts /dev/vda and starts systemd.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules/order); do /bin/busybox insmod /modules/$m; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
/bin/busybox mount -o rw /dev/vda /newroot || { echo "tier2 initramfs: cannot mount /dev/vda"; /bin/busybox sleep 5; /bin/busybox poweroff -f; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init "$@"
"""


def _module_order(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for NAMES and their dependencies, dependencies first (modules.dep)."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            raise Tier2Error(f"module {name} not in {kernel.modules}/modules.dep")
        visit(by_name[name])
    return [kernel.modules / p for p in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries; directories have no data."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def build_initramfs(kernel: Kernel, out: Path) -> Path | None:
    """A tiny busybox initramfs (~3 MB) instead of the host's (~14 MB, initramfs-tools):
    saves several seconds of every boot under TCG. None when it cannot be built
    (compressed modules, no static busybox): the host's initrd is used then."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or os.environ.get("PYMACHINE_TIER2_HOST_INITRD"):
        return None
    try:
        modules = _module_order(kernel, ROOT_MODULES)
    except (Tier2Error, OSError):
        return None
    if any(m.suffix != ".ko" for m in modules):
        return None  # compressed: busybox insmod may not read them
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o040755, b""),
        ("modules", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, INITRAMFS_INIT.encode()),
        ("modules/order", 0o100644, "".join(m.name + "\n" for m in modules).encode()),
    ]
    entries += [(f"modules/{m.name}", 0o100644, m.read_bytes()) for m in modules]
    out.write_bytes(_cpio_newc(entries))
    return out


# --------------------------------------------------------------------------- boot
def qemu_command(
    kernel: Kernel, initrd: Path, disks: dict[str, Path], serial_log: Path
) -> list[str]:
    def drive(name: str, serial: str) -> list[str]:
        return [
            "-drive",
            f"file={disks[name]},if=none,id={name},format=raw,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive={name},serial={serial}",
        ]

    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-m", str(GUEST_MEMORY_MB),
        "-smp", "2",
        "-no-reboot",  # a guest reboot ends qemu; the host boots the next stage
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{serial_log}",
        "-nic", "none",
        "-kernel", str(kernel.vmlinuz),
        "-initrd", str(initrd),
        *drive("root", "tier2-root"),
        *drive("results", RESULTS_SERIAL),
        *drive("swap", SWAP_SERIAL),
        "-append",
        "root=/dev/vda rw console=ttyS0 panic=1 systemd.unified_cgroup_hierarchy=1 "
        "systemd.show_status=1 loglevel=4",
    ]  # fmt: skip


def read_results(results_img: Path, out: Path) -> None:
    """Copy every file of the results disk into OUT (debugfs: no loop device, no mount)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run(
        ["debugfs", "-R", f"rdump / {out}", str(results_img)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # rdump / creates OUT/<nothing>: files land directly in OUT (lost+found too).
    shutil.rmtree(out / "lost+found", ignore_errors=True)


@dataclass
class Boot:
    number: int
    serial_log: Path
    seconds: float
    returncode: int | None  # None: killed at the timeout


@dataclass
class Tier2Run:
    run_dir: Path
    results: Path
    boots: list[Boot] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stages_done: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.stages_done == list(range(1, STAGES + 1))

    def junit_files(self) -> list[Path]:
        return sorted(self.results.glob("stage*.xml"))

    def serial_tail(self, chars: int = 6000) -> str:
        parts = []
        for b in self.boots:
            text = b.serial_log.read_text(errors="replace") if b.serial_log.exists() else ""
            parts.append(
                f"----- boot {b.number} serial console ({b.serial_log}) -----\n{text[-chars:]}"
            )
        return "\n".join(parts)


def boot_all(
    kernel: Kernel, initrd: Path, disks: dict[str, Path], run_dir: Path, result: Tier2Run
) -> None:
    for number in range(1, STAGES + 1):
        serial_log = run_dir / f"serial-boot{number}.log"
        cmd = qemu_command(kernel, initrd, disks, serial_log)
        log(f"boot {number}: {' '.join(cmd)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            rc = None
        took = time.monotonic() - t0
        result.boots.append(Boot(number, serial_log, took, rc))
        result.timings[f"boot{number}"] = took
        if out:
            (run_dir / f"qemu-boot{number}.out").write_bytes(out)
        read_results(disks["results"], result.results)
        done = sorted(int(p.name[5:-5]) for p in result.results.glob("stage*.done"))
        result.stages_done = done
        log(f"boot {number}: qemu exit {rc} after {took:.1f}s, stages done: {done}")
        if rc is None:
            result.error = f"boot {number} timed out after {BOOT_TIMEOUT:.0f}s (qemu killed)"
            return
        if rc != 0:
            result.error = (
                f"qemu exited with {rc} on boot {number}: {out.decode(errors='replace')[-2000:]}"
            )
            return
        if done != list(range(1, number + 1)):
            result.error = (
                f"boot {number} ended without finishing stage {number} (stages done: {done})"
            )
            return


def run_tier2(run_dir: Path, keep: bool = False) -> Tier2Run:
    """Build the image, boot through every stage, read the results. Never raises for
    a guest-side problem: ``Tier2Run.error`` says what went wrong."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = Tier2Run(run_dir=run_dir, results=run_dir / "results")
    t_all = time.monotonic()
    try:
        kernel = find_kernel()
        base = build_base(result.timings)
        wheels = build_wheels(run_dir, result.timings)
        rootfs = prepare_rootfs(base, run_dir, wheels, kernel, result.timings)
        disks = make_disks(rootfs, run_dir, result.timings)
        initrd = build_initramfs(kernel, run_dir / "initramfs.cpio") or kernel.initrd
        boot_all(kernel, initrd, disks, run_dir, result)
    except Tier2Error as exc:
        result.error = str(exc)
    finally:
        result.timings["total"] = time.monotonic() - t_all
        (run_dir / "timings.json").write_text(json.dumps(result.timings, indent=1))
        if not keep:
            for name in ("disk.img", "swap.img", "wheels", "rootfs"):
                p = run_dir / name
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="run directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep disk images after the run")
    args = parser.parse_args(argv)
    problems = missing_prerequisites()
    if problems:
        print("tier2 cannot run here: " + "; ".join(problems), file=sys.stderr)
        return 2
    run_dir = args.out or Path(tempfile.mkdtemp(prefix="pymachine-tier2-", dir="/var/tmp"))
    result = run_tier2(run_dir, keep=args.keep)
    print(json.dumps(result.timings, indent=1))
    for f in result.junit_files():
        print(f"results: {f}")
    if result.error:
        print(f"ERROR: {result.error}\n{result.serial_tail(3000)}", file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
