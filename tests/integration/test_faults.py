"""Faults (issue 8): crashes, races, a re-executed systemd, a full disk and
broken definition files, each as a user meets them, in a systemd host with a
network of its own (bridged machines, veths, nft rules stay in that netns).

One host for the module; every test uses machine names of its own. Commands
that do not depend on each other run concurrently (:func:`pm_all`): each
``pymachine`` call is a Python start-up, and the CI budget is tight.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.harness.systemd_host import SystemdHost, private_network_host

PM = [sys.executable, "-m", "machined"]
SLEEP = ("/bin/sh", "-c", "while :; do sleep 1; done")
CRASH_ENV = "PYMACHINE_TEST_CRASH_AT"
RUNNING = ("active", "activating", "deactivating", "reloading")

# Runs inside the host: the pymachine commands given as JSON at once, their
# results as JSON (one interpreter for the lot instead of one nsenter each).
_RUN_ALL = """
import json, os, subprocess, sys
jobs = json.loads(sys.argv[1])
procs = [subprocess.Popen([sys.executable, "-m", "machined", *argv], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, **env}) for argv, env in jobs]
results = []
for p in procs:
    out, err = p.communicate()
    results.append([p.returncode, out, err])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> SystemdHost:
    from tests.harness import require_tier1

    require_tier1()
    with private_network_host(tmp_path_factory.mktemp("faults-host"), "pymfault") as host:
        host.pymachine("bootstrap", "--distro", "busybox", "tiny")
        yield host


# --- helpers -------------------------------------------------------------------------


class Result:
    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"pymachine {' '.join(self.argv)} -> {self.returncode}\n{self.stdout}{self.stderr}"


def pm_all(host, *commands, env: dict[str, str] | None = None, check: bool = True) -> list[Result]:
    """Run pymachine commands concurrently; each is an argv list, or (argv, env)."""
    jobs = [(list(c[0]), c[1]) if isinstance(c, tuple) else (list(c), env or {}) for c in commands]
    out = host.run([sys.executable, "-c", _RUN_ALL, json.dumps(jobs)], timeout=300).stdout
    results = [Result(argv, *r) for (argv, _), r in zip(jobs, json.loads(out), strict=True)]
    if check:
        failed = [r for r in results if r.returncode != 0]
        assert not failed, failed
    return results


def create(name: str, *flags: str) -> list[str]:
    return ["create", name, "--image", "tiny", *flags, "--", *SLEEP]


def wait_until(predicate, timeout: float = 20.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def unit_states(host, *names: str) -> dict[str, str]:
    units = [f"pymachine-{n}.service" for n in names]
    out = host.run(["systemctl", "show", "-P", "ActiveState", *units], check=False).stdout
    return dict(zip(names, out.split(), strict=True))


def registered(host) -> set[str]:
    out = host.run(["machinectl", "list", "--no-legend", "--no-pager"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def nft_rules(host, name: str) -> int:
    table = host.run(["nft", "list", "table", "inet", "pymachine"], check=False).stdout
    return table.count(f"pymachine:{name}:")


_LEFTOVERS = r"""
for name; do
  echo "$name mounts $(grep -l " /run/pymachine/$name/" /proc/[0-9]*/mountinfo 2>/dev/null | wc -l)"
  echo "$name links $(ip -o link | grep -c -e "vm-$name[@:]" -e "pymachine:$name\$")"
  echo "$name nft $(nft list table inet pymachine 2>/dev/null | grep -c "pymachine:$name:")"
  echo "$name registered $(machinectl list --no-legend | grep -c "^$name ")"
  echo "$name unit $(systemctl show -P ActiveState pymachine-$name.service)"
done
"""


def leftovers(host, *names: str) -> dict[str, dict[str, str]]:
    """What each machine left on the host: mounts, veths, nft rules, registration, unit."""
    out = host.run(["/bin/sh", "-c", _LEFTOVERS, "leftovers", *names]).stdout
    found: dict[str, dict[str, str]] = {n: {} for n in names}
    for line in out.splitlines():
        name, what, value = line.split(" ", 2)
        found[name][what] = value
    return found


def nothing_left(*names: str) -> dict[str, dict[str, str]]:
    clean = {"mounts": "0", "links": "0", "nft": "0", "registered": "0"}
    return {n: clean for n in names}


def without_unit(found: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    for what in found.values():
        assert what.pop("unit") not in RUNNING, found
    return found


def assert_one_line_error(result: Result, code: int) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: "), result
    return lines[0]


# --- 1. the runtime is SIGKILLed at each step of start, and while running -------------

STEPS = ("after-overlay", "after-network", "after-registration", "running")


def test_killed_runtime_leaves_nothing_and_the_next_start_works(host):
    names = [f"crash-{step.removeprefix('after-')}" for step in STEPS]
    pm_all(host, *(create(n, "--port", f"tcp:{8300 + i}:80") for i, n in enumerate(names)))
    runs = pm_all(
        host,
        *(
            (["start", n], {} if step == "running" else {CRASH_ENV: step})
            for n, step in zip(names, STEPS, strict=True)
        ),
        check=False,
    )
    for result, name, step in zip(runs, names, STEPS, strict=True):
        if step == "running":
            assert result.returncode == 0, result
            continue
        assert result.returncode == 1 and "Traceback" not in result.stderr, result
        first = result.stderr.splitlines()[0]
        assert first == (
            f"pymachine: machine '{name}' failed to start "
            f"(pymachine-{name}.service: result 'signal')"
        ), result
    main_pid = host.run(
        ["systemctl", "show", "-P", "MainPID", f"pymachine-{names[-1]}.service"]
    ).stdout.strip()
    assert int(main_pid) > 1
    host.run(["kill", "-9", main_pid])
    assert wait_until(
        lambda: all(s in ("failed", "inactive") for s in unit_states(host, *names).values())
    ), unit_states(host, *names)

    # Nothing is left, without waiting for a start or a gc: the unit's own
    # clean-up (ExecStopPost) runs however the runtime ended.
    assert without_unit(leftovers(host, *names)) == nothing_left(*names)
    # status tells what happened; gc has nothing of theirs left but runtime directories
    *statuses, gc = pm_all(host, *(["status", n] for n in names), ["gc"], check=False)
    for result in statuses:
        assert result.returncode == 3 and "State: failed (result: signal)" in result.stdout, result
    assert gc.returncode == 0, gc
    assert all(
        line.startswith("Removed runtime directory") or not any(n in line for n in names)
        for line in gc.stdout.splitlines()
    ), gc

    pm_all(host, *(["start", n] for n in names))
    try:
        hostnames = pm_all(host, *(["exec", n, "--", "hostname"] for n in names))
        assert [r.stdout.strip() for r in hostnames] == names
        root_fs = 'awk \'$5 == "/" { for (i = 7; i <= NF; i++) if ($i == "-") print $(i + 1) }\' /proc/self/mountinfo'
        roots = pm_all(host, *(["exec", n, "--", "sh", "-c", root_fs] for n in names))
        assert [r.stdout.split() for r in roots] == [["overlay"]] * len(names), roots
        found = leftovers(host, *names)
        for name in names:  # one veth each, one IPv4 and one IPv6 DNAT rule: nothing doubled
            # The runtime handed over and exited: the overlay is mounted only in the
            # machine's own mount namespace, where the machine sees it as "/".
            assert found[name].pop("mounts") == "0", found
            assert found[name] == {"links": "1", "nft": "2", "registered": "1", "unit": "active"}
    finally:
        pm_all(host, ["stop", *names], check=False)
    assert without_unit(leftovers(host, *names)) == nothing_left(*names)
    host.pymachine("remove", *names)


def test_killed_foreground_run_leaves_no_container_and_start_or_gc_cleans(host):
    """``pymachine run`` is a scope: no ExecStopPost. A SIGKILLed runtime takes its
    container with it (no headless machine); the nft rules it leaves are cleaned
    by the next start of the machine, or by gc."""
    names = ["fgcrash-start", "fgcrash-gc"]
    pm_all(host, *(create(n, "--port", f"tcp:{8310 + i}:80") for i, n in enumerate(names)))
    runs = " ".join(f"{' '.join(PM)} run {n} </dev/null >/dev/null 2>&1 & " for n in names)
    host.run(["/bin/sh", "-c", runs + "wait"], env={CRASH_ENV: "after-registration"}, timeout=60)
    scopes = [f"pymachine-{n}.scope" for n in names]
    assert wait_until(
        lambda: (
            "active"
            not in host.run(["systemctl", "is-active", *scopes], check=False).stdout.split()
        )
    ), host.run(["systemctl", "status", *scopes], check=False).stdout
    # The kernel removes a dead network namespace's veth asynchronously (its
    # clean-up work runs after the last process is gone), and machined drops a
    # stopped scope's registration on systemd's signal: wait for both.
    assert wait_until(
        lambda: all(
            (f["links"], f["registered"]) == ("0", "0") for f in leftovers(host, *names).values()
        )
    ), leftovers(host, *names)
    found = leftovers(host, *names)
    for name in names:
        assert {k: found[name][k] for k in ("mounts", "links", "registered")} == {
            "mounts": "0",
            "links": "0",
            "registered": "0",
        }, found
        assert found[name]["nft"] == "2", found  # left for the next start or gc
        runtime = f"machined run {name}"  # `run` is the runtime (in-process)
        assert host.run(["pgrep", "-f", "--", runtime], check=False).returncode == 1

    host.pymachine("start", names[0])  # cleans its own leftovers first
    assert nft_rules(host, names[0]) == 2 and nft_rules(host, names[1]) == 2
    assert f"Removed network of {names[1]}." in host.pymachine("gc").stdout
    assert nft_rules(host, names[1]) == 0 and nft_rules(host, names[0]) == 2
    host.pymachine("start", names[1])
    try:
        hostnames = pm_all(host, *(["exec", n, "--", "hostname"] for n in names))
        assert [r.stdout.strip() for r in hostnames] == names
        assert [nft_rules(host, n) for n in names] == [2, 2]  # not doubled
    finally:
        pm_all(host, ["stop", *names], check=False)
    assert without_unit(leftovers(host, *names)) == nothing_left(*names)
    host.pymachine("remove", *names)


# --- 2. ten processes start and stop the same machine at once ----------------------


def test_ten_concurrent_starts_and_stops_end_consistent(host):
    name = "race"
    host.pymachine(*create(name))
    verbs = ["start", "stop"] * 5
    results = pm_all(host, *([verb, name] for verb in verbs), check=False)
    for result in results:
        if result.returncode:
            # 3: not running, 5: already running / stopped while starting
            assert assert_one_line_error(result, result.returncode) and result.returncode in (3, 5)
        else:
            assert result.stderr == "", results

    units = host.run(
        ["systemctl", "list-units", "--all", "--no-legend", "--plain", f"pymachine-{name}*"]
    ).stdout.splitlines()
    assert len(units) <= 1, units
    assert wait_until(lambda: unit_states(host, name)[name] in ("active", "inactive", "failed"))
    active = unit_states(host, name)[name] == "active"
    assert (name in registered(host)) == active
    status = host.pymachine("status", name, check=False)
    assert status.returncode == (0 if active else 3), status
    assert ("State: running" in status.stdout) == active, status
    if active:
        host.pymachine("stop", name)
    host.pymachine("start", name)
    assert host.pymachine("exec", name, "--", "hostname").stdout.strip() == name
    host.pymachine("stop", name)
    assert without_unit(leftovers(host, name)) == nothing_left(name)
    host.pymachine("remove", name)


# --- 3. systemd is re-executed while machines run ----------------------------------


def listed(host) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads(host.pymachine("list", "--json").stdout)}


def test_daemon_reexec_keeps_machines_running_and_manageable(host):
    names = ["reexec1", "reexec2"]
    pm_all(host, *(create(n, "--network", "none") for n in names))
    pm_all(host, *(["start", n] for n in names))
    try:
        before = listed(host)
        assert all(before[n]["leader"] for n in names)
        host.run(["systemctl", "daemon-reexec"])
        assert wait_until(
            lambda: (
                host.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                in ("running", "degraded")
            )
        )
        after = listed(host)
        assert [after[n]["leader"] for n in names] == [before[n]["leader"] for n in names]
        assert [after[n]["state"] for n in names] == ["running", "running"]
        assert registered(host) >= set(names)
        status, *hostnames = pm_all(
            host, ["status", names[0]], *(["exec", n, "--", "hostname"] for n in names)
        )
        assert "State: running" in status.stdout
        assert [r.stdout.strip() for r in hostnames] == names
        # A definition broken meanwhile: status names it, stop still works.
        host.run(
            [
                "sh",
                "-c",
                f"printf '[Machine]\\nImage=tiny\\nOops\\n' > /etc/pymachine/{names[0]}.machine",
            ]
        )
        broken = host.pymachine("status", names[0], check=False)
        assert assert_one_line_error(broken, 2).startswith(
            f"pymachine: /etc/pymachine/{names[0]}.machine:3: expected Key=Value"
        )
        host.pymachine("stop", names[0])
        assert unit_states(host, names[0])[names[0]] in ("inactive", "failed")
        assert names[0] not in registered(host)
        assert host.pymachine("exec", names[1], "--", "true").returncode == 0
    finally:
        host.pymachine("stop", *names, check=False)
    assert without_unit(leftovers(host, *names)) == nothing_left(*names)
    host.run(["rm", f"/etc/pymachine/{names[0]}.machine"])
    host.pymachine("remove", names[1])


# --- 4. the writable layer's file system is full -----------------------------------


def test_full_writable_layer_gives_enospc_and_keeps_what_was_written(host):
    name = "fullfs"
    layer = f"/var/lib/pymachine/machines/{name}"
    host.run(["mkdir", "-p", layer])
    host.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", layer])
    inside = ["exec", name, "--", "/bin/sh", "-c"]
    try:
        host.pymachine(*create(name, "--network", "none"))
        host.pymachine("start", name)
        filled = host.pymachine(
            *inside,
            "echo precious-data > /root/kept && sync && "
            "dd if=/dev/zero of=/fill bs=1M count=64 2>&1; echo dd=$?; "
            "{ echo more > /one-more; } 2>&1; echo echo=$?",
            check=False,
        ).stdout
        assert "No space left on device" in filled and "dd=1" in filled, filled
        assert "echo=0" not in filled, filled
        # still manageable while full
        status, cat = pm_all(host, ["status", name], [*inside, "cat /root/kept; hostname"])
        assert "State: running" in status.stdout
        assert cat.stdout == f"precious-data\n{name}\n"
        host.pymachine("stop", name)
        host.pymachine("start", name)  # a full layer does not keep it from starting
        after = host.pymachine(*inside, "cat /root/kept; rm /fill && echo after > /a && cat /a")
        assert after.stdout == "precious-data\nafter\n"
        host.pymachine("stop", name)
        assert host.run(["cat", f"{layer}/upper/root/kept"]).stdout == "precious-data\n"
    finally:
        host.pymachine("stop", name, check=False)
        host.pymachine("remove", name, check=False)
        host.run(["umount", "-l", layer], check=False)


# --- 5. corrupt or half-written definition files -----------------------------------

BROKEN = {
    "garbage": (b"\x01\x02\x7fELF\x03 binary junk\n", 1, "expected Key=Value"),
    "truncated-line": (b"[Machine]\nImage=tiny\n[Exec\n", 3, "malformed section header"),
    "truncated-key": (b"[Machine]\nImage=tiny\n[Exec]\nComm", 4, "expected Key=Value"),
    "unknown-key": (b"[Machine]\nImage=tiny\nColour=blue\n", 3, "unknown key Colour="),
    "bad-utf8": (b"[Machine]\nImage=tiny\n[Exec]\nCommand=/bin/echo \xff\xfe\n", 4, "UTF-8"),
}


def test_broken_definition_files_are_clear_errors_naming_file_and_line(host):
    intact = ["intact1", "intact2"]
    pm_all(host, *(create(n, "--network", "none") for n in intact))
    # Definitions are written atomically (temp file + rename): no temp file is left.
    files = host.run(["ls", "-A", "/etc/pymachine"]).stdout.split()
    assert [f for f in files if f.startswith(".") or not f.endswith(".machine")] == []
    writes = {f"/etc/pymachine/broken-{case}.machine": data for case, (data, *_) in BROKEN.items()}
    host.run(
        [
            sys.executable,
            "-c",
            "import sys, ast\nfor p, d in ast.literal_eval(sys.argv[1]).items():"
            " open(p, 'wb').write(d)",
            repr(writes),
        ]
    )
    commands = [[verb, f"broken-{case}"] for case in BROKEN for verb in ("start", "status")]
    results = pm_all(host, *commands, ["list"], ["list", "--json"], check=False)
    for (_verb, name), result in zip(commands, results, strict=False):
        _data, line, message = BROKEN[name.removeprefix("broken-")]
        error = assert_one_line_error(result, 2)
        assert error.startswith(f"pymachine: /etc/pymachine/{name}.machine:{line}: "), result
        assert message in error, result
    listing, as_json = results[-2:]
    # list goes on: every machine is listed; each broken one with a warning naming its file
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing
    names = [row.split()[0] for row in listing.stdout.splitlines()[1:] if row.split()]
    assert set(intact) <= set(names)
    for case in BROKEN:
        assert f"broken-{case}" in names, listing
        assert f"pymachine: warning: /etc/pymachine/broken-{case}.machine:" in listing.stderr
    entries = {m["name"]: m for m in json.loads(as_json.stdout)}
    assert [entries[n]["image"] for n in intact] == ["tiny", "tiny"]
    assert entries["broken-garbage"]["state"] == "stopped"
    assert entries["broken-garbage"]["image"] is None
    host.run(["rm", *writes])
    host.pymachine("remove", *intact)
