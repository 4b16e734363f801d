"""copy-to, copy-from and bind on a running machine (issue 9 item 6), in the
session's systemd host. The machine runs in a user namespace (the default
PrivateUsers=pick), so ownership across the boundary is checked both ways.

Each test does its host-side work in one shell script per step: every
command run in the host costs a process start."""

from __future__ import annotations

import itertools
import os

import pytest

SLEEP = ("/bin/sleep", "1000000")  # dies at once on SIGTERM: fast stops
_counter = itertools.count()


@pytest.fixture(scope="module")
def machine(systemd_host, tiny_image):
    """One running machine for the module's tests."""
    name = f"xfer-{os.getpid() % 1000}"
    systemd_host.pymachine("create", name, "--image", tiny_image, "--network", "none", "--", *SLEEP)
    systemd_host.pymachine("start", name)
    yield name
    systemd_host.pymachine("stop", name, check=False)
    systemd_host.pymachine("remove", name, check=False)


@pytest.fixture
def workdir(systemd_host) -> str:
    """A fresh host directory on a real disk file system (the test host's / is an
    overlay, which refuses idmapped mounts; tmpfs allows them only from Linux 6.3)."""
    path = f"/var/lib/pymachine/test-xfer-{os.getpid() % 1000}-{next(_counter)}"
    systemd_host.run(["mkdir", "-p", path])
    yield path
    systemd_host.run(["rm", "-rf", path], check=False)


def inside(host, name: str, script: str, check: bool = True):
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script, check=check)


def range_base(host, name: str) -> int:
    """Host UID of the machine's root: the owner of its writable layer."""
    upper = f"/var/lib/pymachine/machines/{name}/upper"
    return int(host.run(["stat", "-c", "%u", upper]).stdout)


def test_copy_to_and_from_keep_modes_times_and_set_owners(systemd_host, machine, workdir):
    host = systemd_host
    host.run(
        f"cd {workdir} && mkdir -p tree/sub/deep && echo hello > tree/a.txt && "
        "chmod 640 tree/a.txt && echo deep > tree/sub/deep/b && chmod 700 tree/sub && "
        "ln -s ../a.txt tree/sub/link && mkfifo tree/fifo && chown 1234:1234 tree/sub/deep/b && "
        "printf secret > lone && chmod 600 lone && "
        "touch -h -d '2001-02-03 04:05:06.123456789' tree/a.txt tree/sub tree/sub/link lone"
    )
    # a directory onto a new path on the machine's tmpfs /tmp, a file into an existing dir
    host.pymachine("copy-to", machine, f"{workdir}/tree", "/tmp/in")
    host.pymachine("copy-to", machine, f"{workdir}/lone", "/root")
    listing = inside(
        host,
        machine,
        "cd /tmp/in && stat -c '%n %u:%g %a %y' a.txt sub sub/deep/b sub/link /root/lone && "
        "readlink sub/link && cat sub/link sub/deep/b /root/lone && test -p fifo",
    ).stdout.splitlines()
    stamp = "2001-02-03 04:05:06.123456789"
    assert listing[0].startswith(f"a.txt 0:0 640 {stamp}")
    assert listing[1].startswith(f"sub 0:0 700 {stamp}")
    assert listing[2].startswith("sub/deep/b 0:0 644 ")  # every copy is the machine root's
    assert listing[3].startswith(f"sub/link 0:0 777 {stamp}")
    assert listing[4].startswith(f"/root/lone 0:0 600 {stamp}")
    assert listing[5:] == ["../a.txt", "hello", "deep", "secret"]
    # on the host, the overlay's upper layer holds it owned by the machine's range
    base = range_base(host, machine)
    assert base > 0
    upper = f"/var/lib/pymachine/machines/{machine}/upper/root/lone"
    assert host.run(["stat", "-c", "%u:%g", upper]).stdout.strip() == f"{base}:{base}"

    # and back out: owned by the host user running pymachine, modes and times kept
    inside(
        host,
        machine,
        "mkdir -p /root/out/d && echo made-inside > /root/out/d/f && chmod 604 /root/out/d/f && "
        "ln -s /etc/hostname /root/out/abs && chown -R 17:17 /root/out && "
        "touch -d '1999-12-31 23:59:58' /root/out/d/f /root/out/d",
    )
    host.pymachine("copy-from", machine, "/root/out", f"{workdir}/back")
    host.pymachine("copy-from", machine, "/tmp/in/a.txt", f"{workdir}")
    out = host.run(
        f"cd {workdir} && stat -c '%n %u:%g %a %y' back/d back/d/f a.txt && "
        "readlink back/abs && cat back/d/f a.txt"
    ).stdout.splitlines()
    assert out[0].startswith("back/d 0:0 755 1999-12-31 23:59:58")
    assert out[1].startswith("back/d/f 0:0 604 1999-12-31 23:59:58")
    assert out[2].startswith(f"a.txt 0:0 640 {stamp}")
    assert out[3:] == ["/etc/hostname", "made-inside", "hello"]  # a symlink, not followed


def test_paths_resolve_inside_the_machine(systemd_host, machine, workdir):
    host = systemd_host
    host.run(f"echo host-side > {workdir}/marker && echo payload > {workdir}/payload")
    inside(
        host,
        machine,
        f"mkdir -p {workdir} && echo machine-side > {workdir}/marker && "
        f"ln -sfn / /escape && ln -sfn ../../../../../../{workdir.lstrip('/')} /root/up",
    )
    # sources: /escape/... and ../../.. stay inside the machine
    host.pymachine("copy-from", machine, f"/escape{workdir}/marker", f"{workdir}/got1")
    host.pymachine("copy-from", machine, "/root/up/marker", f"{workdir}/got2")
    # destinations too: this lands in the machine's copy of WORKDIR, not the host's
    host.pymachine("copy-to", machine, f"{workdir}/payload", "/escape/root/up/dropped")
    assert host.run(f"cat {workdir}/got1 {workdir}/got2").stdout == "machine-side\n" * 2
    assert host.run(["test", "-e", f"{workdir}/dropped"], check=False).returncode == 1
    assert inside(host, machine, f"cat {workdir}/dropped").stdout == "payload\n"


def test_refusals_and_exit_codes(systemd_host, machine, machine_name, tiny_image, workdir):
    host = systemd_host
    host.run(["touch", f"{workdir}/f"])
    host.pymachine("create", machine_name, "--image", tiny_image, "--network", "none")
    try:
        cases = [
            (("copy-to", machine_name, f"{workdir}/f", "/f"), 3, "is not running"),
            (("copy-from", machine_name, "/etc/hostname", f"{workdir}/x"), 3, "is not running"),
            (("bind", machine_name, workdir, "/mnt"), 3, "is not running"),
            (("copy-to", "no-such-machine", f"{workdir}/f"), 4, "not found"),
            (("copy-to", machine, f"{workdir}/missing", "/x"), 4, "no such file"),
            (("copy-from", machine, "/missing/file", f"{workdir}/x"), 4, "No such file"),
            (("copy-to", machine, f"{workdir}/f", "/no/such/dir/f"), 4, "/no/such/dir"),
            (("copy-from", machine, "/etc/hostname", f"{workdir}/none/x"), 4, "none"),
            (("copy-to", machine, f"{workdir}/f", "relative"), 2, "must be absolute"),
            (("bind", machine, workdir, "/not/there"), 4, "--mkdir"),
            (("bind", machine, f"{workdir}/missing", "/mnt"), 4, "no such file"),
        ]
        for args, code, text in cases:
            result = host.pymachine(*args, check=False)
            assert (result.returncode, text in result.stderr) == (code, True), (args, result)
    finally:
        host.pymachine("remove", machine_name, check=False)


def test_bind_a_host_directory_into_a_running_machine(systemd_host, machine, workdir):
    host = systemd_host
    host.run(
        f"mkdir -p {workdir}/rw {workdir}/ro && echo from-host > {workdir}/rw/h && "
        f"chmod 600 {workdir}/rw/h && echo ro > {workdir}/ro/r"
    )
    host.pymachine("bind", machine, f"{workdir}/rw", "/mnt/rw", "--mkdir")
    host.pymachine("bind", machine, f"{workdir}/ro", "/mnt/ro", "--mkdir", "--read-only")
    host.run(f"echo written-later > {workdir}/rw/later")  # after the bind: seen live
    out = inside(
        host,
        machine,
        "cat /mnt/rw/h /mnt/rw/later /mnt/ro/r && stat -c '%u' /mnt/rw/h && "
        "echo from-machine > /mnt/rw/m && mkdir /mnt/rw/dir && "
        "if touch /mnt/ro/w 2>/dev/null; then echo WRITABLE; else echo read-only; fi",
    ).stdout.splitlines()
    # host root's 0600 file is the machine root's inside (the idmapped mount)
    assert out == ["from-host", "written-later", "ro", "0", "read-only"]
    back = host.run(f"cat {workdir}/rw/m && stat -c '%u:%g' {workdir}/rw/m {workdir}/rw/dir")
    # what the machine's root writes is host root's on the host, not the range's
    assert back.stdout.splitlines() == ["from-machine", "0:0", "0:0"]
    assert host.run(["test", "-e", f"{workdir}/ro/w"], check=False).returncode == 1
