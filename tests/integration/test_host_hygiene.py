"""What of the host reaches a machine, and what of a machine reaches the host's
users (issue 15, items 4, 5, 10): only stdio (and ``--preserve-fds``) crosses
into a machine, no host cwd; the state directories stay closed (0700) so no
host user runs a set-user-ID file that root inside made; a host port claimed
twice is refused before anything starts."""

from __future__ import annotations

import shlex
import sys

import pytest

PM = shlex.join([sys.executable, "-m", "machined"])
# The fds of the payload's shell itself (ls would list its own directory fd too,
# and a pipeline's pipes are the shell's for a moment), then its cwd.
LIST_FDS = "ls /proc/$$/fd; readlink /proc/$$/cwd"


def _fds_and_cwd(output: str) -> tuple[list[str], str]:
    *fds, cwd = output.split()
    return sorted(fds, key=int), cwd


# --- item 4: file descriptors and the cwd ------------------------------------------


def test_exec_passes_only_stdio_and_no_host_cwd(systemd_host, make_machine, machine_name):
    """A host directory the caller left open (fd 7, not close-on-exec) and the
    caller's cwd (/etc) never reach the command: ``cat /proc/self/fd/7/passwd``
    would read the host's file, ``openat(7, "../..")`` climb to its root."""
    name = make_machine(machine_name)
    script = f"cd /etc && exec 7</etc 9</ && {PM} exec {name} -- sh -c {shlex.quote(LIST_FDS)}"
    fds, cwd = _fds_and_cwd(systemd_host.run(script).stdout)
    assert fds == ["0", "1", "2"]
    assert cwd == "/root"  # root's home in the image, not the caller's /etc
    leak = systemd_host.run(
        f"exec 7</etc && {PM} exec {name} -- cat /proc/self/fd/7/hostname", check=False
    )
    assert leak.returncode != 0 and leak.stdout == ""


def test_shell_passes_only_stdio(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name)
    out = systemd_host.run(
        f"exec 7</etc && {PM} shell {name} -- sh -c {shlex.quote(LIST_FDS)} </dev/null"
    ).stdout
    assert _fds_and_cwd(out.replace("\r", ""))[0] == ["0", "1", "2"]


def test_exec_preserve_fds_passes_exactly_those(systemd_host, make_machine, machine_name):
    """podman's ``--preserve-fds N``: 3 … 3+N-1 cross, 3+N and above do not."""
    name = make_machine(machine_name)
    script = (
        f"exec 3</dev/null 4</dev/null 7</etc && "
        f"{PM} exec --preserve-fds 2 {name} -- sh -c {shlex.quote(LIST_FDS)}"
    )
    assert _fds_and_cwd(systemd_host.run(script).stdout)[0] == ["0", "1", "2", "3", "4"]
    given = systemd_host.run(
        f"echo handed-over > /tmp/fd-{name} && exec 3</tmp/fd-{name} && "
        f"{PM} exec --preserve-fds 1 {name} -- cat /proc/self/fd/3"
    )
    assert given.stdout == "handed-over\n"


def test_preserve_fds_refuses_a_descriptor_that_is_not_open(
    systemd_host, make_machine, machine_name
):
    name = make_machine(machine_name)
    for verb in ("exec", "run"):
        bad = systemd_host.run(
            f"exec 3</dev/null && {PM} {verb} --preserve-fds 2 {name} -- true", check=False
        )
        assert bad.returncode == 2, bad
        assert bad.stderr.strip().splitlines() == [
            "pymachine: --preserve-fds 2: file descriptor 4 is not open"
        ]


def test_run_passes_only_stdio_and_the_preserved_fds(systemd_host, make_machine, machine_name):
    name = make_machine(machine_name, start=False)
    script = f"cd /etc && exec 7</etc && {PM} run {name} -- sh -c {shlex.quote(LIST_FDS)}"
    fds, cwd = _fds_and_cwd(systemd_host.run(script).stdout)
    assert fds == ["0", "1", "2"]
    assert cwd == "/"
    script = (
        f"exec 3</dev/null 7</etc && "
        f"{PM} run --preserve-fds 1 {name} -- sh -c {shlex.quote(LIST_FDS)}"
    )
    assert _fds_and_cwd(systemd_host.run(script).stdout)[0] == ["0", "1", "2", "3"]


def test_a_started_machine_has_only_stdio(systemd_host, make_machine, machine_name):
    """The unit's chain (supervisor → intermediate → PID 1 → pymachine-init →
    payload): nothing but stdio reaches the payload, nor PID 1 (the init)."""
    name = make_machine(
        machine_name, command=("/bin/sh", "-c", f"{LIST_FDS}; while :; do sleep 1; done")
    )
    unit = f"pymachine-{name}.service"
    journal = systemd_host.wait_for_journal(unit, "\n/")
    lines = journal.splitlines()  # the payload's among systemd's lines about the unit
    assert [line for line in lines if line.isdigit()] == ["0", "1", "2"], journal
    assert "/" in lines
    init_fds = systemd_host.pymachine("exec", name, "--", "ls", "/proc/1/fd").stdout.split()
    assert sorted(init_fds, key=int) == ["0", "1", "2"]


# --- item 5: the state directories stay closed ----------------------------------------

PRIVATE_DIRS = ("/var/lib/pymachine", "/var/lib/machines", "/var/cache/pymachine")
RUNTIME_DIR = "/run/pymachine"  # search-only: a machine's PID 1 resolves its root there


def _modes(host, paths) -> dict[str, str]:
    out = host.run(["stat", "-c", "%n %a", *paths]).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def _open_to_others(host, private=(), runtime=()) -> dict[str, str]:
    """Of the PRIVATE directories, those a host user may enter or read (any group
    or other bit); of the RUNTIME ones, those a host user may list or write."""
    found = {p: m for p, m in _modes(host, private).items() if int(m, 8) & 0o077} if private else {}
    if runtime:
        found |= {p: m for p, m in _modes(host, runtime).items() if int(m, 8) & 0o066}
    return found


def _open_all(host) -> None:
    """What an older install left: every state directory 0755."""
    host.run(["mkdir", "-p", *PRIVATE_DIRS, RUNTIME_DIR])
    host.run(["chmod", "0755", *PRIVATE_DIRS, RUNTIME_DIR])


def test_state_directories_are_root_s_and_an_older_install_s_are_closed(
    systemd_host, make_machine, machine_name, tiny_image
):
    """What root inside makes (writable layers, images, imports) lies below
    these: a set-user-ID file there would run, for a host user, as the
    machine's root UID (host root without a user namespace). An older install
    made them 0755: the next use closes them."""
    name = make_machine(machine_name, start=False)
    _open_all(systemd_host)
    systemd_host.pymachine("start", name)
    state = f"/var/lib/pymachine/machines/{name}"
    assert (
        _open_to_others(
            systemd_host, (*PRIVATE_DIRS[:2], state), (RUNTIME_DIR, f"{RUNTIME_DIR}/{name}")
        )
        == {}
    )

    _open_all(systemd_host)
    created = make_machine(f"{machine_name}-c", start=False)
    state = f"/var/lib/pymachine/machines/{created}"
    assert _open_to_others(systemd_host, (*PRIVATE_DIRS[:2], state)) == {}

    _open_all(systemd_host)
    archive = f"/tmp/{machine_name}.tar"
    systemd_host.pymachine("export-tar", tiny_image, archive)
    systemd_host.pymachine("import-tar", archive, f"{machine_name}-i")
    assert _open_to_others(systemd_host, PRIVATE_DIRS[:2]) == {}
    _open_all(systemd_host)
    systemd_host.pymachine("bootstrap", "--distro", "busybox", f"{machine_name}-b")
    try:
        assert _open_to_others(systemd_host, PRIVATE_DIRS) == {}
    finally:
        for image in (f"{machine_name}-i", f"{machine_name}-b"):
            systemd_host.pymachine("image", "remove", image, check=False)
        systemd_host.run(["rm", "-f", archive])


def test_an_ephemeral_machine_s_layer_is_root_s(systemd_host, make_machine, machine_name):
    """Its writable layer is in the (search-only) runtime directory: the layer's
    own directory is closed."""
    name = make_machine(machine_name, "--ephemeral")
    layer = f"{RUNTIME_DIR}/{name}/ephemeral"
    assert _modes(systemd_host, [layer]) == {layer: "700"}


def test_a_set_user_id_file_made_inside_is_out_of_a_host_user_s_reach(
    systemd_host, make_machine, machine_name
):
    """The issue's attack: root inside makes a set-user-ID file in its writable
    layer (busybox, which drops the privilege itself; a binary of the
    attacker's would not) and a host user (nobody) runs it: no longer reachable."""
    name = make_machine(machine_name, "--private-users", "no")
    systemd_host.pymachine("exec", name, "--", "sh", "-c", "cp /bin/busybox /id && chmod 4755 /id")
    upper = f"/var/lib/pymachine/machines/{name}/upper/id"
    assert systemd_host.run(["stat", "-c", "%a %u", upper]).stdout == "4755 0\n"
    as_nobody = "import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
    as_nobody += "os.execv(sys.argv[1], sys.argv[1:])"
    tried = systemd_host.run([sys.executable, "-c", as_nobody, upper, "-u"], check=False)
    assert tried.returncode != 0 and "PermissionError" in tried.stderr, tried


# --- item 10: a host port forwarded twice ---------------------------------------------


@pytest.fixture(scope="module")
def net_host(tmp_path_factory):
    """A systemd host with a network of its own: bridges and nft rules stay in it."""
    from tests.harness import require_tier1
    from tests.harness.systemd_host import private_network_host

    require_tier1()
    with private_network_host(tmp_path_factory.mktemp("ports-host"), "pymports") as host:
        host.pymachine("bootstrap", "--distro", "busybox", "tiny")
        yield host


def _create(host, name: str, *flags: str):
    return host.pymachine(
        "create", name, "--image", "tiny", *flags, "--", "/bin/sh", "-c", "exec sleep 1000"
    )


def _units(host, name: str) -> str:
    """Every unit systemd knows of the machine (a failed one included)."""
    return host.run(
        ["systemctl", "list-units", "--all", "--no-legend", "--plain", f"pymachine-{name}*"]
    ).stdout


def test_a_host_port_forwarded_to_another_machine_is_refused_before_anything_starts(net_host):
    """``create`` warns (podman creates both too); ``start``, ``start A B`` and
    ``run`` refuse with exit 5 and one line, and leave no unit, failed or not,
    and no runtime directory."""
    _create(net_host, "porta", "--port", "tcp:18080:80")
    second = _create(net_host, "portb", "--port", "tcp:18080:8080", "--port", "udp:18080")
    assert second.stderr.splitlines() == [
        "pymachine: warning: host port tcp:18080 is also forwarded to machine 'porta': "
        "only one of them can run at a time"
    ]
    refusal = ["pymachine: host port tcp:18080 is already forwarded to machine 'porta'"]
    try:
        both = net_host.pymachine("start", "porta", "portb", check=False)
        assert (both.returncode, both.stderr.splitlines()) == (5, refusal)
        for verb in ("start", "run"):
            refused = net_host.pymachine(verb, "portb", check=False)
            assert (refused.returncode, refused.stderr.splitlines()) == (5, refusal), verb
        assert _units(net_host, "portb") == ""
        assert net_host.run(["test", "-e", "/run/pymachine/portb"], check=False).returncode == 1
        assert net_host.run(["systemctl", "--failed", "--no-legend"]).stdout == ""
    finally:
        for name in ("porta", "portb"):
            net_host.pymachine("stop", name, check=False)
            net_host.pymachine("remove", name, check=False)


def test_the_runtime_s_own_port_check_is_one_line(net_host):
    """A start that bypasses the CLI (``systemctl start`` of an enabled
    machine, as at boot) meets the runtime's check: one line, no traceback."""
    _create(net_host, "portc", "--port", "tcp:18081:80")
    _create(net_host, "portd", "--port", "tcp:18081:80")
    try:
        net_host.pymachine("start", "portc")
        net_host.pymachine("enable", "portd")
        unit = "pymachine-portd.service"
        assert net_host.run(["systemctl", "start", unit], check=False).returncode != 0
        journal = net_host.journal(unit)
        assert (
            "cannot start machine portd: host port tcp:18081 is already forwarded to "
            "machine 'portc'" in journal
        )
        assert "Traceback" not in journal
    finally:
        net_host.pymachine("disable", "portd", check=False)
        for name in ("portc", "portd"):
            net_host.pymachine("stop", name, check=False)
            net_host.pymachine("remove", name, check=False)
        net_host.run(["systemctl", "reset-failed"], check=False)
