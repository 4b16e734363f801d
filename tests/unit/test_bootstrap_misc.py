"""Progress output, post-configuration and the subprocess runner."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from bootstrap.postconfig import OsRelease, configure, host_nameservers
from bootstrap.progress import Progress
from bootstrap.run import BootstrapError, MissingTool, run


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(out, tty=False)
    p.step("layer 1/2 abc")
    p.advance(3, 2048)
    p.line("I: extracting archives...")
    p.finish("done")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "layer 1/2 abc…"
    assert lines[1] == "  I: extracting archives..."
    assert lines[2].startswith("layer 1/2 abc: 3 2.0K done in ")
    assert lines[3] == "done"


def test_progress_redraws_one_line_on_a_terminal():
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.step("downloading", total=10)
    p.advance(4, 5 * 2**20, detail="libc6")
    time.sleep(0.11)
    p.advance(1)
    p.finish()
    text = out.getvalue()
    assert "\r\x1b[K" in text
    assert "downloading  5/10  5.0M" in text
    assert text.endswith("done in " + text.rsplit("done in ", 1)[1])
    assert text.count("\n") == 1  # only the phase summary stays


def test_postconfig_writes_container_files(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/securetty").write_text("console\ntty1\n")
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/systemd-networkd.service").write_text("[Unit]\n")
    configure(
        root,
        hostname="web",
        nameservers=["192.0.2.53"],
        os_release=OsRelease(id="tiny", name="Tiny", pretty_name="Tiny 1", version_id="1"),
    )
    assert (root / "etc/machine-id").read_text() == ""
    assert (root / "etc/hostname").read_text() == "web\n"
    assert "127.0.1.1\tweb" in (root / "etc/hosts").read_text()
    assert not (root / "etc/resolv.conf").is_symlink()
    assert "nameserver 192.0.2.53" in (root / "etc/resolv.conf").read_text()
    assert (root / "etc/os-release").read_text().splitlines()[:3] == [
        'NAME="Tiny"',
        "ID=tiny",
        'VERSION_ID="1"',
    ]
    tty = (root / "etc/securetty").read_text().split()
    assert tty.count("console") == 1 and "pts/0" in tty and "pts/9" in tty
    link = root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    assert os.readlink(link) == "/lib/systemd/system/systemd-networkd.service"


def test_postconfig_keeps_existing_os_release(tmp_path):
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text("ID=debian\n")
    configure(tmp_path, hostname="h", nameservers=[], os_release=OsRelease("x", "X", "X"))
    assert not (tmp_path / "etc/os-release").exists()
    assert not (tmp_path / "etc/systemd").exists()  # no networkd in the image: nothing enabled


def test_host_nameservers_skip_loopback(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "nameserver 127.0.0.53\nnameserver 10.0.0.1\nnameserver ::1\nnameserver fe80::1%eth0\nsearch x\n"
    )
    assert host_nameservers(conf) == ["10.0.0.1", "fe80::1%eth0"]


def test_run_reports_the_tail_of_a_failure():
    with pytest.raises(BootstrapError) as exc:
        run(["sh", "-c", "echo one; echo two >&2; exit 3"], on_line=lambda line: None)
    assert "exit status 3" in str(exc.value) and "one" in str(exc.value) and "two" in str(exc.value)
    with pytest.raises(BootstrapError, match="oops"):
        run(["sh", "-c", "echo oops >&2; exit 1"], capture=True)
    with pytest.raises(MissingTool):
        run(["/no/such/tool"])
    assert run(["echo", "hi"], capture=True).stdout == "hi\n"


def test_run_stops_the_tools_children_on_interrupt(tmp_path):
    """An interrupt takes down the tool's whole process group, grandchildren included."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait"
    code = (
        "import sys\n"
        "from bootstrap.run import run\n"
        f"run(['sh', '-c', {script!r}], on_line=lambda l: print(l, flush=True))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert proc.stdout.readline().strip() == "started"
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # A zombie of an exited process still answers kill(0): check its state.
        with open(f"/proc/{child}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {child} survived the interrupt")
