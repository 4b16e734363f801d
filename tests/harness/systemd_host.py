"""A throwaway systemd host booted in namespaces: the "tier 1" test host.

The recipe is the one in ``shared/design/ENVIRONMENT.md``:

* a cgroup of its own in the cgroup v2 tree, split as systemd-nspawn splits a
  machine's: ``NAME/supervisor`` holds the ``unshare`` process outside the
  host, ``NAME/payload`` is the root of the host's cgroup namespace (systemd's
  tree) and ``NAME/payload/pymtest-harness`` holds the commands the harness
  runs inside (so systemd can move them to scopes, as ``pymachine run`` does);
* ``unshare --pid --mount --uts --ipc`` (and ``--cgroup`` once inside the
  payload cgroup), a tmpfs scratch, an overlay with ``lowerdir=/`` and its
  upper/work dirs on the tmpfs, fresh ``/proc``, read-only ``/sys``, ``cgroup2``,
  a minimal ``/dev`` of its own, tmpfs ``/run`` and ``/tmp``, the caller's bind mounts, masked units;
* ``pivot_root`` and ``exec systemd --system --unit=multi-user.target``.

The systemd of the real machine's image is never booted on the real root: the
host only ever sees the overlay, so ``systemd-tmpfiles --boot`` and friends
only touch the tmpfs upper layer. Every mount lives in the host's private
mount namespace and disappears with it.

Nothing outlives the test run: ``stop()`` kills the host's PID 1 (the whole PID
namespace goes with it) and removes the cgroup; an ``atexit`` hook stops every
host still running; if the Python process is killed outright, ``setpriv
--pdeathsig KILL`` and ``unshare --kill-child`` take the host down, and the
next ``start()`` removes cgroups left by dead test runs.

Standard library only: the harness must work before anything is installed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "MASKED_UNITS",
    "HostCommandError",
    "HostBootError",
    "SystemdHost",
    "cgroup2_root",
    "cleanup_stale_cgroups",
    "default_binds",
    "new_workdir",
    "private_network_host",
    "remove_workdir",
    "PERSISTENT_CACHE",
]

#: Units of the machine's image that must not start in a test host. Names that
#: do not exist are harmless (a dangling mask).
MASKED_UNITS: tuple[str, ...] = (
    # services of the image with no business in a test host
    "postgresql.service",
    "postgresql@.service",
    "cron.service",
    "ssh.service",
    "sshd.service",
    "rsyslog.service",
    "e2scrub_reap.service",
    "systemd-pstore.service",
    "systemd-timesyncd.service",
    # the host shares the machine's network namespace: hands off the network
    "networking.service",
    "ifup@.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-resolved.service",
    "NetworkManager.service",
    "wpa_supplicant.service",
    # consoles and logins: /dev/console is a log file here
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    # things that would change the machine's kernel, not just the host
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "modprobe@.service",
    "systemd-journald-audit.socket",
    # kernel file systems the host has no use for
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    # timers that would fire during a long test run
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "logrotate.timer",
    "systemd-tmpfiles-clean.timer",
)

#: PATH inside the host: the Python running the tests first, so ``python3``
#: inside is the interpreter that has pymachine (editable) and its deps.
_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_SYSTEMD = next(
    (p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if os.path.exists(p)),
    "/lib/systemd/systemd",
)

_HARNESS_CGROUP = "pymtest-harness"
_CGROUP_PREFIX = "pymtest"  # every cgroup we make is "<name>.<pid of the test run>.<n>"

_counter = itertools.count()
_live: set[SystemdHost] = set()
_live_lock = threading.Lock()


class HostBootError(RuntimeError):
    """The host did not come up; the message carries its console output."""


class HostCommandError(AssertionError):
    """A command run inside the host failed (``check=True``).

    An ``AssertionError`` so pytest shows it as a test failure with its message:
    the command, the exit code, stdout and stderr.
    """

    def __init__(self, args: Sequence[str] | str, returncode: int | None, stdout: str, stderr: str):
        self.cmd = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        shown = args if isinstance(args, str) else shlex.join(args)
        status = "timed out" if returncode is None else f"exited with status {returncode}"
        super().__init__(
            f"command in the systemd test host {status}: {shown}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted on this machine."""
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if _fstype(candidate) == "cgroup2":
            return candidate
    raise HostBootError("no cgroup2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified")


def _fstype(path: Path) -> str | None:
    """The file system type mounted exactly at PATH, from /proc/self/mountinfo."""
    target = str(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target:
                found = fields[sep + 1]  # the last one mounted there wins
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cgroup_pids(cgroup: Path) -> list[int]:
    """All PIDs in CGROUP and its descendants."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(cgroup):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _remove_cgroup(cgroup: Path, timeout: float = 10.0) -> None:
    """Kill whatever is left in CGROUP, then rmdir it and its children bottom-up."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + timeout
    kill_file = cgroup / "cgroup.kill"
    while True:
        pids = _cgroup_pids(cgroup)
        if not pids:
            break
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {cgroup} survive SIGKILL")
        time.sleep(0.02)
    while True:
        try:
            for dirpath, _dirs, _files in os.walk(cgroup, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(dirpath)
            return
        except OSError as e:
            # EBUSY: a dying process still counts; retry for a moment
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def cleanup_stale_cgroups() -> list[Path]:
    """Remove the cgroups of hosts whose test run died without cleaning up.

    A host's cgroup is named ``<name>.<pid of the test run>.<n>``; it is stale
    when that PID is gone. Returns what was removed.
    """
    removed = []
    try:
        root = cgroup2_root()
    except HostBootError:
        return removed
    for entry in root.iterdir():
        parts = entry.name.rsplit(".", 2)
        if not entry.is_dir() or len(parts) != 3 or not (parts[1] + parts[2]).isdigit():
            continue
        if not (entry / "payload").is_dir() or _pid_alive(int(parts[1])):
            continue
        with contextlib.suppress(OSError, RuntimeError):
            _remove_cgroup(entry)
            removed.append(entry)
    return removed


_BOOT_SCRIPT = """\
#!/bin/sh
# Boot steps of a pymachine tier-1 test host (generated by tests/harness/systemd_host.py).
# Run by `unshare --pid --mount --uts --ipc --kill-child` as PID 1 of the new PID
# namespace, in cgroup {cgroup}/supervisor.
set -eu

if [ "${{1:-}}" != stage2 ]; then
    # Stage 1: move into the payload cgroup and make it the root of a new cgroup
    # namespace, so the host's systemd owns that subtree and nothing else.
    echo 0 > {cgroup}/payload/cgroup.procs
    exec unshare --cgroup -- /bin/sh "$0" stage2
fi

# Stage 2: build the root file system of the host and boot it.
mount --make-rprivate /
S={scratch}
R=$S/root
mount -t tmpfs -o mode=0755 pymtest-scratch "$S"
mkdir "$S/upper" "$S/work" "$R"
mount -t overlay -o lowerdir=/,upperdir="$S/upper",workdir="$S/work" pymtest-root "$R"

mount -t proc proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
# A /dev of its own, as systemd-nspawn makes one: nothing written to it can
# reach the machine's real /dev.
mount -t tmpfs -o mode=0755,nosuid,size=4m pymtest-dev "$R/dev"
for node in null zero full random urandom tty fuse net/tun; do
    [ -e "/dev/$node" ] || continue
    mkdir -p "$(dirname "$R/dev/$node")"
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
# systemd writes its status to /dev/console: make that our log file
touch "$R/dev/console"
mount --bind {console} "$R/dev/console"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"

# Bind mounts asked for by the caller (in-host path <- real directory)
{binds}
# Units of the image that must not start here
mkdir -p "$R/etc/systemd/system"
for unit in {masked}; do
    ln -sfn /dev/null "$R/etc/systemd/system/$unit"
done
# journald: volatile, and do not read the machine's kernel log
mkdir -p "$R/etc/systemd/journald.conf.d"
printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\n' > "$R/etc/systemd/journald.conf.d/pymtest.conf"
echo {name} > "$R/etc/hostname"
tr -d - < /proc/sys/kernel/random/uuid > "$R/etc/machine-id"

cd "$R"
pivot_root . .
umount -l .
# Shared, as systemd makes / on a real host (in a container it leaves it as it
# finds it): systemd sets a unit's credentials up in a mount namespace of its
# own, and they reach the service by propagation only.
mount --make-rshared /
cd /
exec env -i container={name} PATH={path} {systemd} --system --unit=multi-user.target
"""


class SystemdHost:
    """A systemd booted in namespaces on an overlay of the machine's root.

    ``binds`` maps in-host absolute paths to real directories, bind-mounted
    before boot (an overlayfs upper dir cannot live on the host's overlay root,
    so whatever holds pymachine's machines must be a real directory).
    ``private_network=True`` also gives the host its own network namespace
    (loopback only); by default it shares the machine's.
    """

    def __init__(
        self,
        workdir: Path,
        name: str = "pymtest",
        binds: Mapping[str, Path | str] | None = None,
        *,
        private_network: bool = False,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.name = name
        self.binds = {str(k): Path(v).absolute() for k, v in (binds or {}).items()}
        for inner in self.binds:
            if not inner.startswith("/"):
                raise ValueError(f"bind target must be absolute: {inner!r}")
        self.private_network = private_network
        self.cgroup = cgroup2_root() / f"{name}.{os.getpid()}.{next(_counter)}"
        self.console_log = self.workdir / "console.log"
        self.boot_script = self.workdir / "boot.sh"
        self.boot_seconds: float | None = None
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- life cycle ---------------------------------------------------------

    @property
    def pid(self) -> int:
        """Host-side PID of the host's systemd (PID 1 inside)."""
        if self._pid is None:
            raise RuntimeError("the systemd test host is not running")
        return self._pid

    @property
    def running(self) -> bool:
        return self._pid is not None and not self._stopped

    def start(self, timeout: float = 30.0) -> None:
        """Boot; return once ``systemctl is-system-running`` says running or degraded.

        The host is tied to the calling *thread* (``setpriv --pdeathsig``): start
        it from a thread that outlives it, e.g. the main thread.
        """
        if self._proc is not None:
            raise RuntimeError("a SystemdHost can only be started once")
        cleanup_stale_cgroups()
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "scratch").mkdir(exist_ok=True)
        self.console_log.write_text("")
        for src in self.binds.values():
            if not src.is_dir():
                raise HostBootError(f"bind source is not a directory: {src}")
        self.boot_script.write_text(self._render_boot_script())

        self.cgroup.mkdir()
        with _live_lock:
            _live.add(self)
        try:
            self._enable_controllers()
            for sub in ("supervisor", "payload"):
                (self.cgroup / sub).mkdir()
            self._launch()
            self._wait_for_pid1(t0 + timeout)
            self._wait_until_running(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        (self.cgroup / "payload" / _HARNESS_CGROUP).mkdir(exist_ok=True)

    def stop(self) -> None:
        """Kill the host (PID 1 of its PID namespace) and remove its cgroup. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
            if self._proc is not None:
                # unshare reaps the dead PID 1 and exits by itself; kill it only if it
                # does not (killing it first would leave PID 1 a zombie for init to reap)
                if self._pid is None:  # boot failed early: --kill-child does the rest
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=5)
            _remove_cgroup(self.cgroup)
        finally:
            with _live_lock:
                _live.discard(self)

    def __enter__(self) -> SystemdHost:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SystemdHost {self.name} pid={self._pid} cgroup={self.cgroup}>"

    # -- running things inside ---------------------------------------------

    def command(self, args: Sequence[str] | str) -> list[str]:
        """The host-side argv that runs ARGS inside the host (for subprocess)."""
        if isinstance(args, str):
            args = ["/bin/sh", "-c", args]
        procs = self.cgroup / "payload" / _HARNESS_CGROUP / "cgroup.procs"
        return [
            "/bin/sh",
            "-c",
            'echo 0 > "$1" && shift && exec "$@"',
            "pymtest-enter",
            str(procs),
            "nsenter",
            "-t",
            str(self.pid),
            "-a",
            "--",
            *args,
        ]

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of commands run inside: a clean one, plus ENV."""
        out = {
            "PATH": f"{os.path.dirname(sys.executable)}:{_BASE_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }
        if "TERM" in os.environ:
            out["TERM"] = os.environ["TERM"]
        out.update(env or {})
        return out

    def run(
        self,
        args: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGS inside the host (a str goes to ``/bin/sh -c``), capturing its output.

        With ``check`` (the default) a non-zero exit or a timeout raises
        :class:`HostCommandError`, which shows the command, status and output.
        """
        try:
            cp = subprocess.run(
                self.command(args),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self.environment(env),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = _text(e.stdout)
            err = _text(e.stderr) + f"\n(timed out after {timeout} s)"
            if check:
                raise HostCommandError(args, None, out, err) from None
            return subprocess.CompletedProcess(args, -signal.SIGKILL, out, err)
        cp.args = args
        if check and cp.returncode != 0:
            raise HostCommandError(args, cp.returncode, cp.stdout, cp.stderr)
        return cp

    def popen(
        self, args: Sequence[str] | str, *, env: Mapping[str, str] | None = None, **kw
    ) -> subprocess.Popen:
        """Start ARGS inside the host without waiting (long-running / interactive).

        Keyword arguments go to :class:`subprocess.Popen`; nothing is captured
        unless asked for (``stdout=subprocess.PIPE`` …).
        """
        return subprocess.Popen(self.command(args), env=self.environment(env), **kw)

    def pymachine(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
        """Run ``python -m machined ARGS`` inside the host, with the test run's Python."""
        return self.run([sys.executable, "-m", "machined", *args], check=check, **kw)

    def journal(self, unit: str, lines: int = 200) -> str:
        """The last LINES messages of UNIT (``journalctl -u UNIT -o cat``)."""
        return self.run(
            ["journalctl", "-u", unit, "--no-pager", "-o", "cat", "-n", str(lines)], check=False
        ).stdout

    def wait_for_journal(self, unit: str, text: str, timeout: float = 10.0) -> str:
        """Poll UNIT's journal until it contains TEXT; return the journal (AssertionError if not)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.journal(unit, lines=1000)
            if text in out:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} not in the journal of {unit} after {timeout} s:\n{out}"
                )
            time.sleep(0.05)

    def host_path(self, path: str) -> Path:
        """The real-machine path of the in-host PATH (through ``/proc/PID/root``)."""
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def console(self) -> str:
        """What the host's systemd wrote to its console (boot messages, the boot script's errors)."""
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    # -- internals -----------------------------------------------------------

    def _render_boot_script(self) -> str:
        q = shlex.quote
        binds = "\n".join(
            f'mkdir -p "$R"{q(inner)}\nmount --bind {q(str(src))} "$R"{q(inner)}'
            for inner, src in sorted(self.binds.items())
        )
        return _BOOT_SCRIPT.format(
            cgroup=q(str(self.cgroup)),
            scratch=q(str(self.workdir / "scratch")),
            console=q(str(self.console_log)),
            binds=binds or ":",
            masked=" ".join(q(u) for u in MASKED_UNITS),
            name=q(self.name),
            path=q(_BASE_PATH),
            systemd=q(_SYSTEMD),
        )

    def _enable_controllers(self) -> None:
        """On a pure cgroup v2 machine, delegate every controller we have to the host."""
        with contextlib.suppress(OSError):
            controllers = (self.cgroup / "cgroup.controllers").read_text().split()
            if controllers:
                (self.cgroup / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in controllers)
                )

    def _launch(self) -> None:
        unshare = ["unshare", "--pid", "--mount", "--uts", "--ipc", "--kill-child"]
        if self.private_network:
            unshare.append("--net")
        argv = [
            "/bin/sh",
            "-c",
            'echo 0 > "$1" && shift && exec "$@"',
            "pymtest-launch",
            str(self.cgroup / "supervisor" / "cgroup.procs"),
            # if the test run dies, unshare dies, and --kill-child takes the host with it
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            *unshare,
            "--",
            "/bin/sh",
            str(self.boot_script),
        ]
        with open(self.console_log, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": _BASE_PATH, "LANG": "C.UTF-8"},
                start_new_session=True,
            )

    def _boot_failed(self, why: str) -> HostBootError:
        return HostBootError(
            f"systemd test host {self.name}: {why}\n--- console ---\n{self.console()}"
        )

    def _wait_for_pid1(self, deadline: float) -> None:
        """Find the host-side PID of the namespace's PID 1 once it is systemd."""
        assert self._proc is not None
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        while True:
            if self._proc.poll() is not None:
                raise self._boot_failed(f"exited with status {self._proc.returncode} while booting")
            with contextlib.suppress(OSError, ValueError):
                kids = children.read_text().split()
                if kids:
                    pid = int(kids[0])
                    if os.readlink(f"/proc/{pid}/exe") == os.path.realpath(_SYSTEMD):
                        self._pid = pid
                        return
            if time.monotonic() > deadline:
                raise self._boot_failed("systemd did not start in time")
            time.sleep(0.005)

    def _wait_until_running(self, deadline: float) -> None:
        state = ""
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._boot_failed(f"exited with status {self._proc.returncode} while booting")
            # is-system-running fails with "Failed to connect to bus" for a moment
            cp = subprocess.run(
                ["nsenter", "-t", str(self.pid), "-a", "systemctl", "is-system-running"],
                capture_output=True,
                text=True,
                env=self.environment(),
                timeout=30,
            )
            state = cp.stdout.strip() or cp.stderr.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                jobs = self._try(["systemctl", "list-jobs", "--no-pager"])
                failed = self._try(["systemctl", "--failed", "--no-pager"])
                raise self._boot_failed(
                    f"not running in time (last state: {state!r})\n"
                    f"--- jobs ---\n{jobs}\n--- failed units ---\n{failed}"
                )
            time.sleep(0.02)

    def _try(self, args: Sequence[str]) -> str:
        try:
            cp = subprocess.run(
                ["nsenter", "-t", str(self.pid), "-a", *args],
                capture_output=True,
                text=True,
                env=self.environment(),
                timeout=10,
            )
            return cp.stdout + cp.stderr
        except Exception as e:  # diagnostics only
            return f"({e})"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        hosts = list(_live)
    for host in hosts:
        with contextlib.suppress(Exception):
            host.stop()


#: Where debian bootstraps and other downloads are cached across test runs
#: (bound to the host's /var/cache/pymachine); override with PYMTEST_CACHE.
PERSISTENT_CACHE = Path(os.environ.get("PYMTEST_CACHE", "/var/cache/pymachine-tests"))


def default_binds(base: Path | str) -> dict[str, Path]:
    """The bind mounts every test host gets.

    pymachine's ``/var/lib/machines`` and ``/var/lib/pymachine`` hold overlay
    upper dirs, which cannot live on the host's overlay root: fresh real
    directories under BASE. ``/var/cache/pymachine`` is the persistent cache.
    """
    base = Path(base)
    binds = {
        "/var/lib/machines": base / "var-lib-machines",
        "/var/lib/pymachine": base / "var-lib-pymachine",
        "/var/cache/pymachine": PERSISTENT_CACHE,
    }
    for src in binds.values():
        src.mkdir(parents=True, exist_ok=True)
    return binds


@contextlib.contextmanager
def private_network_host(base: Path | str, name: str) -> Iterator[SystemdHost]:
    """A booted host under BASE with the default binds and a network namespace of
    its own (systemd brings its ``lo`` up), stopped on exit: bridged machines,
    veths, nft rules and ip_forward stay in it, off the machine running the tests."""
    base = Path(base)
    host = SystemdHost(base / "host", name=name, binds=default_binds(base), private_network=True)
    host.start()
    try:
        yield host
    finally:
        host.stop()


def new_workdir(base: Path | str | None = None, prefix: str = "pymtest-") -> Path:
    """A fresh directory on the real disk (host /tmp by default) for a host's files."""
    base = Path(base) if base else Path(os.environ.get("TMPDIR", "/tmp"))
    path = base / f"{prefix}{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def remove_workdir(path: Path) -> None:
    """Remove a workdir once its host is stopped (its scratch mount died with the host)."""
    shutil.rmtree(path, ignore_errors=True)
