"""Snapshots, backups and scheduled snapshots of machines, in the session's
systemd host (tier 1): what a user sees inside the machine and on the host."""

from __future__ import annotations

import json
import subprocess
import sys
import time

# Inside the machine: every entry of the data it wrote, with type, mode, owner,
# size, link count, checksum (busybox's find/stat/md5sum).
INVENTORY = (
    "cd / && for p in $(find /data /etc/app /var/log -xdev 2>/dev/null | sort); do "
    'printf \'%s %s \' "$p" "$(stat -c \'%F %a %u:%g %s %h\' "$p")"; '
    'if [ -f "$p" ] && [ ! -L "$p" ]; then md5sum < "$p" | cut -c1-32; '
    'elif [ -L "$p" ]; then readlink "$p"; else echo; fi; done; '
    "ls /bin/ls 2>&1 | tail -1"
)

WRITE = (
    "mkdir -p /data/sub /data/empty /etc/app && echo one > /data/a && "
    "dd if=/dev/urandom of=/data/blob bs=1k count=300 2>/dev/null && "
    "ln /data/a /data/a-link && ln -s ../data/a /etc/app/conf && "
    "echo secret > /data/sub/s && chown 1000:1001 /data/sub /data/sub/s && chmod 4750 /data/sub/s && "
    "mknod /data/pipe p && rm /bin/ls && rm -rf /var/log && mkdir /var/log && echo new > /var/log/only"
)

CHANGE = (
    "echo two >> /data/a && dd if=/dev/zero of=/data/blob bs=1k count=3 conv=notrunc 2>/dev/null && "
    "rm /data/a-link /etc/app/conf && chmod 600 /data/sub/s && chown 2000 /data/sub/s && "
    "echo later > /data/later && rm /data/pipe && ln -s /nowhere /bin/ls"
)


def inside(host, name: str, script: str) -> str:
    return host.pymachine("exec", name, "--", "/bin/sh", "-c", script).stdout


def upper_of(name: str) -> str:
    return f"/var/lib/pymachine/machines/{name}/upper"


def host_tree(host, root: str) -> str:
    """The host's view of a layer: owners relative to the layer's root's owner,
    modes, types, hard-link groups, xattrs (trusted.overlay.*, user.*) and
    data checksums."""
    return host.run([sys.executable, "-c", _TREE, root]).stdout


_TREE = """
import hashlib, os, sys
root = sys.argv[1]
base = os.lstat(root).st_uid
paths = [root]
for dirpath, dirs, files in os.walk(root):
    paths += [os.path.join(dirpath, n) for n in dirs + files]
groups = {}
for p in sorted(paths):
        st = os.lstat(p)
        group = os.path.relpath(groups.setdefault(st.st_ino, p), root)  # hard links: one group
        x = {n: os.getxattr(p, n, follow_symlinks=False).hex() for n in sorted(os.listxattr(p, follow_symlinks=False))}
        data = hashlib.md5(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else ""
        uid = st.st_uid - base if st.st_uid >= base else st.st_uid
        gid = st.st_gid - base if st.st_gid >= base else st.st_gid
        print(os.path.relpath(p, root), oct(st.st_mode), uid, gid, group, st.st_rdev, data, x)
"""


def snapshots(host, name: str) -> list[dict]:
    return json.loads(host.pymachine("snapshots", name, "--json").stdout)


def test_snapshot_of_a_running_machine_restores_exactly_and_later_writes_never_reach_it(
    systemd_host, make_machine, machine_name
):
    host = systemd_host
    name = make_machine(machine_name)
    inside(host, name, WRITE)
    host.run(
        [
            sys.executable,
            "-c",
            f"import os; os.setxattr('{upper_of(name)}/data/a', 'user.note', b'kept')",
        ]
    )
    seen_inside = inside(host, name, INVENTORY)
    seen_host = host_tree(host, upper_of(name))
    assert "/data/sub/s regular file 4750 1000:1001 7 1" in seen_inside
    assert "No such file or directory" in seen_inside  # /bin/ls deleted: a whiteout
    assert "'trusted.overlay.opaque'" in seen_host  # /var/log replaced: an opaque directory

    time.sleep(2.5)  # older than s1 by the margin (treecopy.CTIME_MARGIN_NS): s2 may link them
    assert host.pymachine("snapshot", name, "s1").stdout.strip() == "s1"  # frozen, not stopped
    assert (
        host.run(["systemctl", "is-active", f"pymachine-{name}.service"]).stdout.strip() == "active"
    )
    s1 = f"/var/lib/pymachine/machines/{name}/snapshots/s1/layer"
    assert host_tree(host, s1) == seen_host

    assert host.pymachine("snapshot", name, "s2").stdout.strip() == "s2"
    s2 = f"/var/lib/pymachine/machines/{name}/snapshots/s2/layer"
    linked = host.run(["stat", "-c", "%i", f"{s1}/data/blob", f"{s2}/data/blob"]).stdout.split()
    assert linked[0] == linked[1]  # unchanged: shared with s1, not with upper/
    assert snapshots(host, name)[1]["linked"] > 0

    inside(host, name, CHANGE)  # writes upper/'s files in place, deletes, re-owns
    assert inside(host, name, INVENTORY) != seen_inside
    assert host_tree(host, s1) == seen_host  # neither snapshot saw any of it
    assert host_tree(host, s2) == seen_host
    host.pymachine("snapshot", name, "s3")  # sees the in-place writes (same size, same inode)
    changed = host_tree(host, upper_of(name))
    assert host_tree(host, f"/var/lib/pymachine/machines/{name}/snapshots/s3/layer") == changed

    refused = host.pymachine("restore", name, "s1", check=False)
    assert refused.returncode == 5 and "running" in refused.stderr
    host.pymachine("stop", name)
    host.pymachine("restore", name, "s1")
    host.pymachine("start", name)
    assert inside(host, name, INVENTORY) == seen_inside
    assert host_tree(host, upper_of(name)) == seen_host
    assert host_tree(host, s1) == seen_host  # restoring copied out of it

    names = [s["name"] for s in snapshots(host, name)]
    assert names == ["s1", "s2", "s3"]
    host.pymachine("snapshot", "remove", name, "s1")
    assert [s["name"] for s in snapshots(host, name)] == ["s2", "s3"]
    assert host_tree(host, s2) == seen_host  # its links to s1 outlive s1


def test_snapshot_refusals_and_exit_codes(systemd_host, make_machine, machine_name):
    host = systemd_host
    name = make_machine(machine_name, start=False)
    host.pymachine("snapshot", name, "one")
    cases = [
        (("snapshot", "no-such-machine"), 4),
        (("snapshot", name, "one"), 5),
        (("snapshot", name, "../x"), 2),
        (("snapshot", name, ".hidden"), 2),
        (("restore", name, "nope"), 4),
        (("snapshot", "remove", name, "nope"), 4),
        (("snapshots", "no-such-machine"), 4),
        (("restore-backup", "/nonexistent.tar"), 4),
        (("backup", name, "/tmp/x.zip"), 2),
        (("snapshot", name, "one", "two"), 2),
        (("snapshot", "remove", name), 4),  # machine 'remove' has no snapshots: no such machine
        (("backup", name), 2),
        (("schedule", name, "--every", "whenever"), 2),
        (("schedule", name, "--keep", "1d,1d"), 2),
        (("schedule", name, "--backup-dir", "/nonexistent"), 4),
    ]
    for args, code in cases:
        result = host.pymachine(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("pymachine: ") and result.stderr.count("\n") == 1
    assert [s["name"] for s in snapshots(host, name)] == ["one"]


def test_backup_moves_a_machine_to_a_fresh_host_through_a_pipe(
    systemd_host, fresh_systemd_host, make_machine, machine_name
):
    """`pymachine backup NAME - | ssh other pymachine restore-backup - NAME`, the
    pipe between two systemd hosts; the other host has no image: --with-image."""
    host = systemd_host
    name = make_machine(machine_name)
    inside(host, name, WRITE)
    seen = inside(host, name, INVENTORY)
    other = fresh_systemd_host(name="pymother")
    sender = host.popen(
        [
            sys.executable,
            "-m",
            "machined",
            "backup",
            name,
            "-",
            "--with-image",
            "--compress",
            "zstd",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    receiver = other.popen(
        [sys.executable, "-m", "machined", "restore-backup", "-", "moved"],
        stdin=sender.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sender.stdout.close()
    out, err = receiver.communicate(timeout=300)
    assert sender.wait(timeout=60) == 0, sender.stderr.read()
    assert receiver.returncode == 0, err
    assert "Machine moved restored (image 'tiny' restored too)." in out
    assert (
        host.run(["systemctl", "is-active", f"pymachine-{name}.service"]).stdout.strip() == "active"
    )

    other.pymachine("start", "moved")
    assert inside(other, "moved", INVENTORY) == seen
    base = json.loads(other.run(["cat", "/var/lib/pymachine/userns.json"]).stdout)["moved"][0]
    owner = other.run(["stat", "-c", "%u:%g", f"{upper_of('moved')}/data/sub/s"]).stdout.strip()
    assert owner == f"{base + 1000}:{base + 1001}"  # shifted into the new machine's range
    other.pymachine("stop", "moved")


def test_a_truncated_backup_is_refused_with_nothing_written(
    systemd_host, make_machine, machine_name
):
    host = systemd_host
    name = make_machine(machine_name, start=False)
    path = f"/var/lib/pymachine/{name}.tar.gz"
    host.pymachine("backup", name, path)
    size = int(host.run(["stat", "-c", "%s", path]).stdout)
    host.run(["truncate", "-s", str(size * 2 // 3), path])
    listing = host.run(
        "ls -a /etc/pymachine /var/lib/pymachine/machines; cat /var/lib/pymachine/userns.json"
    ).stdout
    result = host.pymachine("restore-backup", path, f"{name}-r", check=False)
    assert result.returncode == 2, result.stderr
    assert "broken archive" in result.stderr or "truncated" in result.stderr
    assert (
        host.run(
            "ls -a /etc/pymachine /var/lib/pymachine/machines; cat /var/lib/pymachine/userns.json"
        ).stdout
        == listing
    )
    host.run(["rm", "-f", path])


def run_by_timer(host, kind: str, name: str, now: str) -> None:
    """One run of KIND's schedule for NAME started by its timer, with the
    clock at NOW: the service gets PYMACHINE_TEST_NOW, the timer an elapse 1 µs
    after its start besides its OnCalendar= (changed while the timer is
    stopped: a reload would fire an active one at once); waits for the run."""
    unit = f"/etc/systemd/system/pymachine-{kind}@{name}"
    service, timer = f"pymachine-{kind}@{name}.service", f"pymachine-{kind}@{name}.timer"

    def show() -> dict[str, str]:
        out = host.run(
            ["systemctl", "show", "-p", "InvocationID,ActiveState,Result", service]
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    host.run(["systemctl", "stop", timer])
    before = show()["InvocationID"]
    host.run(["mkdir", "-p", f"{unit}.service.d", f"{unit}.timer.d"])
    host.run(
        ["tee", f"{unit}.service.d/60-test-clock.conf"],
        input=f"[Service]\nEnvironment=PYMACHINE_TEST_NOW={_at(now)}\n",
    )
    host.run(
        ["tee", f"{unit}.timer.d/60-test-now.conf"],
        input="[Timer]\nOnActiveSec=1us\nAccuracySec=1us\n",
    )
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", timer])
    deadline = time.monotonic() + 120
    while True:
        state = show()
        if state["InvocationID"] != before and state["ActiveState"] in ("inactive", "failed"):
            break
        assert time.monotonic() < deadline, f"the timer did not run {service}: {state}"
        time.sleep(0.05)
    assert state["Result"] == "success", host.journal(service)


def stop_timer_clock(host, kind: str, name: str) -> None:
    unit = f"/etc/systemd/system/pymachine-{kind}@{name}"
    host.run(["systemctl", "stop", f"pymachine-{kind}@{name}.timer"])
    host.run(
        ["rm", "-f", f"{unit}.service.d/60-test-clock.conf", f"{unit}.timer.d/60-test-now.conf"]
    )
    host.run(["systemctl", "daemon-reload"])


def _at(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M"))


def _auto(text: str) -> str:
    return "auto-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(_at(text)))


def test_scheduled_snapshots_run_from_their_timer_and_are_pruned_by_the_rule(
    systemd_host, make_machine, machine_name
):
    """``--keep 2d,2w`` on a fake clock, each run started as the timer starts it
    (its service), by hand: the rule keeps the newest of the last 2 days and of
    the last 2 ISO weeks that have snapshots, and never a snapshot a user named."""
    host = systemd_host
    name = make_machine(machine_name)
    out = host.pymachine("schedule", name, "--every", "daily", "--keep", "2d,2w").stdout
    assert f"pymachine-snapshot@{name}.timer" in out
    timers = host.run(["systemctl", "list-timers", "--all", "--no-legend"]).stdout
    assert f"pymachine-snapshot@{name}.timer pymachine-snapshot@{name}.service" in " ".join(
        timers.split()
    )
    assert (
        host.run(["systemctl", "is-enabled", f"pymachine-snapshot@{name}.timer"]).stdout.strip()
        == "enabled"
    )
    host.pymachine("snapshot", name, "keepme")

    service = f"pymachine-snapshot@{name}.service"
    runs = [
        ("2026-03-02 10:00", ["2026-03-02 10:00"]),  # Monday, ISO week 10
        ("2026-03-02 18:00", ["2026-03-02 18:00"]),  # the same day: the newer one
        ("2026-03-03 09:00", ["2026-03-02 18:00", "2026-03-03 09:00"]),
        ("2026-03-09 09:00", ["2026-03-03 09:00", "2026-03-09 09:00"]),  # week 11
        # 2d keeps 10th and 9th; 2w keeps the 10th (week 11) and the 3rd (week 10)
        ("2026-03-10 09:00", ["2026-03-03 09:00", "2026-03-09 09:00", "2026-03-10 09:00"]),
    ]
    try:
        for now, kept in runs:
            run_by_timer(host, "snapshot", name, now)
            autos = sorted(s["name"] for s in snapshots(host, name) if s["auto"])
            assert autos == sorted(_auto(t) for t in kept), now
            assert "keepme" in [s["name"] for s in snapshots(host, name)]
        assert "pruned: " + _auto("2026-03-02 18:00") in host.journal(service)
    finally:
        stop_timer_clock(host, "snapshot", name)
    assert "snapshot: every daily, keep 2d,2w" in host.pymachine("schedule", name).stdout
    host.pymachine("stop", name)
    refused = host.pymachine("remove", name, check=False)  # it would leave its timer behind
    assert refused.returncode == 5 and "--off" in refused.stderr
    host.pymachine("schedule", name, "--off")
    timers = host.run(["systemctl", "list-timers", "--all", "--no-legend"]).stdout
    assert f"pymachine-snapshot@{name}.timer" not in timers
    assert len(snapshots(host, name)) == 4  # the schedule goes, its snapshots stay


def test_scheduled_backups_go_to_their_directory_and_are_pruned(
    systemd_host, make_machine, machine_name
):
    host = systemd_host
    name = make_machine(machine_name, start=False)
    directory = f"/var/lib/pymachine/backups-{name}"
    host.run(["mkdir", "-p", directory])
    bad = host.pymachine(
        "schedule", name, "--backup-dir", directory, "--every", "now\nx", check=False
    )
    assert bad.returncode == 2
    bad = host.pymachine("schedule", name, "--backup-dir", directory, "--keep", "7q", check=False)
    assert bad.returncode == 2
    host.pymachine("schedule", name, "--backup-dir", directory, "--every", "weekly", "--keep", "2")
    try:
        for now in ("2026-03-01 10:00", "2026-03-08 10:00", "2026-03-15 10:00"):
            run_by_timer(host, "backup", name, now)
    finally:
        stop_timer_clock(host, "backup", name)
    files = host.run(["ls", directory]).stdout.split()
    stamp = _auto  # the same stamp as the snapshots'
    assert files == [
        f"{name}-{stamp('2026-03-08 10:00')}.tar.zst",
        f"{name}-{stamp('2026-03-15 10:00')}.tar.zst",
    ]
    host.pymachine("restore-backup", f"{directory}/{files[-1]}", f"{name}-r")
    host.pymachine("remove", f"{name}-r")
    host.pymachine("schedule", name, "--off", "--backup")
    host.run(["rm", "-rf", directory])


def test_snapshot_with_stop_stops_copies_and_starts_again(systemd_host, make_machine, machine_name):
    host = systemd_host
    name = make_machine(machine_name)
    inside(host, name, "echo kept > /root/f")
    before = host.run(
        ["systemctl", "show", "-p", "InvocationID", "--value", f"pymachine-{name}.service"]
    ).stdout
    host.pymachine("snapshot", name, "cold", "--stop")
    unit = f"pymachine-{name}.service"
    assert host.run(["systemctl", "is-active", unit]).stdout.strip() == "active"
    after = host.run(["systemctl", "show", "-p", "InvocationID", "--value", unit]).stdout
    assert after != before  # it was stopped and started again
    layer = f"/var/lib/pymachine/machines/{name}/snapshots/cold/layer"
    assert host.run(["cat", f"{layer}/root/f"]).stdout == "kept\n"


def test_a_machine_frozen_by_its_user_is_snapshotted_and_left_frozen(
    systemd_host, make_machine, machine_name
):
    host = systemd_host
    name = make_machine(machine_name)
    unit = f"pymachine-{name}.service"
    host.run(["systemctl", "freeze", unit])
    try:
        host.pymachine("snapshot", name, "while-frozen")
        state = host.run(["systemctl", "show", "-p", "FreezerState", "--value", unit]).stdout
        assert state.strip() == "frozen"  # not thawed by the snapshot's own freeze and thaw
    finally:
        host.run(["systemctl", "thaw", unit])
    assert [s["name"] for s in snapshots(host, name)] == ["while-frozen"]
