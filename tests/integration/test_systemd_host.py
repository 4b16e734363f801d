"""The tier-1 harness tested as its users use it: a systemd host in namespaces."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import skip_or_fail
from tests.harness.systemd_host import HostCommandError, SystemdHost, cleanup_stale_cgroups

REPO = Path(__file__).resolve().parents[2]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- the skip policy (no host needed) -----------------------------------------


def test_skip_or_fail_skips_without_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        skip_or_fail("no frobnicator")


def test_skip_or_fail_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="no frobnicator"):
        skip_or_fail("no frobnicator")


# -- the shared host -------------------------------------------------------------


def test_system_is_running(systemd_host: SystemdHost) -> None:
    state = systemd_host.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), systemd_host.run(
        "systemctl --failed --no-pager"
    ).stdout


def test_transient_unit_gets_its_properties(systemd_host: SystemdHost) -> None:
    unit = _unique("probe")
    systemd_host.run(
        ["systemd-run", "-p", "MemoryMax=64M", "-p", "TasksMax=50", f"--unit={unit}", "sleep", "30"]
    )
    try:
        out = systemd_host.run(
            ["systemctl", "show", unit, "-p", "MemoryMax", "-p", "TasksMax"]
        ).stdout
        assert "MemoryMax=67108864" in out.splitlines()
        assert "TasksMax=50" in out.splitlines()
        assert systemd_host.run(["systemctl", "is-active", unit]).stdout.strip() == "active"
    finally:
        systemd_host.run(["systemctl", "stop", unit], check=False)


def test_machinectl_list(systemd_host: SystemdHost) -> None:
    out = systemd_host.run(["machinectl", "list", "--no-pager"]).stdout
    assert "No machines." in out or "machines listed." in out


def test_journal_has_a_transient_units_output(systemd_host: SystemdHost) -> None:
    unit = _unique("echo")
    marker = _unique("marker")
    systemd_host.run(["systemd-run", "--quiet", f"--unit={unit}", "echo", marker])
    assert marker in systemd_host.wait_for_journal(f"{unit}.service", marker)


def test_scope_can_take_a_harness_process(systemd_host: SystemdHost) -> None:
    """``pymachine run`` moves itself into a transient scope: systemd must be able to."""
    unit = _unique("scope")
    out = systemd_host.run(
        ["systemd-run", "--scope", "--quiet", f"--unit={unit}", "cat", "/proc/self/cgroup"]
    ).stdout
    assert f"/system.slice/{unit}.scope" in out


def test_project_is_importable_inside(systemd_host: SystemdHost) -> None:
    out = systemd_host.run(["python3", "-m", "machined", "--help"]).stdout
    assert "usage:" in out
    assert "usage:" in systemd_host.pymachine("--help").stdout
    where = systemd_host.run([sys.executable, "-c", "import machined; print(machined.__file__)"])
    assert where.stdout.strip().startswith(str(REPO))


def test_run_failure_shows_command_status_and_output(systemd_host: SystemdHost) -> None:
    with pytest.raises(HostCommandError) as err:
        systemd_host.run("echo to-stdout; echo to-stderr >&2; exit 3")
    assert err.value.returncode == 3
    message = str(err.value)
    for text in ("exit 3", "status 3", "to-stdout", "to-stderr"):
        assert text in message
    cp = systemd_host.run(["false"], check=False)
    assert cp.returncode == 1
    assert cp.args == ["false"]


def test_run_passes_input_and_env(systemd_host: SystemdHost) -> None:
    cp = systemd_host.run('read line; echo "$line-$FOO"', input="hello\n", env={"FOO": "bar"})
    assert cp.stdout == "hello-bar\n"


def test_run_timeout(systemd_host: SystemdHost) -> None:
    with pytest.raises(HostCommandError, match="timed out"):
        systemd_host.run(["sleep", "10"], timeout=0.5)


def test_runs_in_the_hosts_namespaces(systemd_host: SystemdHost) -> None:
    cp = systemd_host.run("echo $$; hostname; cat /proc/1/comm; findmnt -n -o FSTYPE /")
    _pid, hostname, comm, rootfs = cp.stdout.split()
    assert hostname == systemd_host.name
    assert comm == "systemd"
    assert rootfs == "overlay"
    assert Path(f"/proc/{systemd_host.pid}/exe").resolve().name == "systemd"


def test_pymachine_state_dirs_are_real_directories(systemd_host: SystemdHost) -> None:
    for path in ("/var/lib/machines", "/var/lib/pymachine", "/var/cache/pymachine"):
        fstype = systemd_host.run(["findmnt", "-n", "-o", "FSTYPE", path]).stdout.strip()
        assert fstype not in ("", "overlay"), f"{path} is {fstype!r}"
    # an overlay whose upper dir is in one of them mounts fine inside
    d = f"/var/lib/pymachine/{_unique('ovl')}"
    systemd_host.run(
        f"mkdir -p {d}/lower {d}/upper {d}/work {d}/merged && "
        f"mount -t overlay -o lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work ovl {d}/merged && "
        f"touch {d}/merged/x && umount {d}/merged && test -e {d}/upper/x && rm -rf {d}"
    )


def test_popen(systemd_host: SystemdHost) -> None:
    p = systemd_host.popen(
        ["sh", "-c", "echo started; read x; echo got-$x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "started\n"
    out, _ = p.communicate("y\n", timeout=10)
    assert out == "got-y\n"
    assert p.returncode == 0


def test_systemd_nspawn_runs_inside(systemd_host: SystemdHost) -> None:
    """The reference tool works in the host and registers with machined."""
    busybox = "/usr/bin/busybox"
    if not Path(busybox).exists():
        skip_or_fail("busybox is not installed (apt-get install busybox)")
    name = _unique("bb")
    root = f"/var/lib/machines/{name}"
    systemd_host.run(
        f"mkdir -p {root}/bin {root}/usr {root}/etc {root}/proc {root}/sys {root}/dev {root}/run {root}/tmp"
        f" && cp {busybox} {root}/bin/ && ln -s busybox {root}/bin/sh && touch {root}/etc/os-release"
    )
    try:
        p = systemd_host.popen(
            ["systemd-nspawn", "-q", "--pipe", "-D", root, "/bin/sh", "-c", "echo inside; read x"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        assert p.stdout.readline() == "inside\n"
        assert name in systemd_host.run(["machinectl", "list", "--no-pager"]).stdout
        p.communicate("\n", timeout=10)
        assert p.returncode == 0
    finally:
        systemd_host.run(["rm", "-rf", root])


# -- hosts of a test's own -------------------------------------------------------


def _mounted_anywhere(text: str) -> bool:
    return text in Path("/proc/self/mountinfo").read_text()


def test_boot_leaves_the_real_machine_alone(fresh_systemd_host, tmp_path: Path) -> None:
    marker = Path("/tmp") / _unique("pymtest-marker")
    marker.write_text("keep me")
    try:
        cache_bind = tmp_path / "bound"
        cache_bind.mkdir()
        host: SystemdHost = fresh_systemd_host(name="pymtest-own", binds={"/srv/bound": cache_bind})
        pid, cgroup = host.pid, host.cgroup
        # the host's /tmp is its own; the real one keeps its files
        assert host.run(["test", "-e", str(marker)], check=False).returncode == 1
        host.run(["touch", "/tmp/made-inside", "/srv/bound/made-inside"])
        assert marker.read_text() == "keep me"
        assert not Path("/tmp/made-inside").exists()
        assert (cache_bind / "made-inside").exists()
        # the host's mounts live in its own mount namespace only
        assert not _mounted_anywhere(str(host.workdir))
        assert cgroup.is_dir()
        assert host.boot_seconds is not None and host.boot_seconds < 30

        host.stop()
        assert not Path(f"/proc/{pid}").exists()
        assert not cgroup.exists()
        leftovers = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if cgroup.name in (proc / "cgroup").read_text():
                        leftovers.append(proc.name)
                except OSError:
                    pass
        assert leftovers == []
        assert marker.read_text() == "keep me"
        host.stop()  # idempotent
    finally:
        marker.unlink()


def test_two_hosts_side_by_side(fresh_systemd_host) -> None:
    a: SystemdHost = fresh_systemd_host(name="pymtest-a")
    b: SystemdHost = fresh_systemd_host(name="pymtest-b")
    a.run(["touch", "/etc/only-in-a"])
    assert b.run(["test", "-e", "/etc/only-in-a"], check=False).returncode == 1
    assert a.run(["hostname"]).stdout.strip() == "pymtest-a"
    assert b.run(["hostname"]).stdout.strip() == "pymtest-b"


def test_private_network(fresh_systemd_host) -> None:
    host: SystemdHost = fresh_systemd_host(name="pymtest-net", private_network=True)
    links = host.run(["ip", "-o", "link"]).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    assert "state UP" in links or "LOOPBACK,UP" in links
    dummy = _unique("pymd")[:15]
    host.run(["ip", "link", "add", dummy, "type", "veth"])
    real = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert dummy not in real


@pytest.mark.tier1
def test_a_killed_test_run_leaves_nothing(tmp_path: Path) -> None:
    """If the Python that booted a host is SIGKILLed, the host dies with it."""
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.harness.systemd_host import SystemdHost
        h = SystemdHost({str(tmp_path / "host")!r}, name="pymtest-orphan")
        h.start()
        print(h.pid, h.cgroup, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    cp = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert cp.returncode == -9, cp.stderr
    pid_text, cgroup_text = cp.stdout.split()
    pid, cgroup = int(pid_text), Path(cgroup_text)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the orphaned host's systemd survived"
    # nobody could rmdir the cgroup; the next start() anywhere cleans it up (another
    # test run on this machine may have done so already)
    removed = cleanup_stale_cgroups()
    assert not cgroup.exists(), removed


@pytest.mark.tier1
def test_cli_run_passes_output_and_status() -> None:
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.harness",
            "run",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert cp.returncode == 7, cp.stderr
    assert cp.stdout == "out\n"
    assert "err\n" in cp.stderr
