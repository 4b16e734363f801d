"""The Ansible collection (collection/) with real ansible-core against the two
tier-1 hosts over real ssh: the controller runs in host a, the managed hosts
are a and b. Playbooks create, start, stop and remove machines on both,
a second run changes nothing, --check changes nothing, a bad limit fails with
pymachine's line, the connection plugin puts a file into a machine and reads
it back, the inventory plugin sees the machines of both hosts."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.harness import skip_or_fail

pytestmark = pytest.mark.tier1

COLLECTION = Path(__file__).parents[2] / "collection"
BIN = Path(sys.executable).parent
#: where the collection is copied inside host a (ansible_collections/NS/NAME layout)
ROOT = "/srv/pymtest-ansible"
INVENTORY = """\
[pm]
a ansible_host=a
b ansible_host=b

[pm:vars]
ansible_user=root
ansible_python_interpreter=/usr/bin/python3
"""


@pytest.fixture(scope="module")
def ansible(remote_hosts):
    """Run a playbook (text) in host a against a and b: (exit code, output)."""
    if not (BIN / "ansible-playbook").exists():
        skip_or_fail("ansible-core is not installed in the venv (./dev/setup)")
    a = remote_hosts.a
    dest = a.host_path(f"{ROOT}/ansible_collections/pymachine/machines")
    shutil.copytree(COLLECTION, dest)
    a.run(["sh", "-c", f"cat > {ROOT}/hosts"], input=INVENTORY)
    env = {
        "ANSIBLE_COLLECTIONS_PATH": ROOT,
        "ANSIBLE_INVENTORY": f"{ROOT}/hosts",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": "/tmp/ansible-local",
        "ANSIBLE_REMOTE_TMP": "/tmp/ansible-remote",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
    }
    counter = iter(range(1000))

    def play(text: str, *flags: str, check: bool = True) -> tuple[int, str]:
        path = f"{ROOT}/play{next(counter)}.yml"
        a.run(["sh", "-c", f"cat > {path}"], input=text)
        cp = a.run([str(BIN / "ansible-playbook"), *flags, path], check=False, env=env, timeout=300)
        out = cp.stdout + cp.stderr
        if check and cp.returncode:
            raise AssertionError(f"ansible-playbook exited {cp.returncode}:\n{out}")
        return cp.returncode, out

    play.env = env
    return play


def plain(value):
    """A value as ansible-inventory --list shows it (strings may come marked unsafe)."""
    return value.get("__ansible_unsafe", value) if isinstance(value, dict) else value


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: host -> {ok, changed, failed, ...}."""
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", out, re.M):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return found


MACHINE = """\
- hosts: pm
  gather_facts: false
  tasks:
    - pymachine.machines.machine:
        name: ans1
        image: tiny
        command: [/bin/sh, -c, "while :; do sleep 1; done"]
        network: none
        properties: {{MemoryMax: {memory}, TasksMax: 50}}
        environment: {{MODE: prod}}
        enabled: true
        state: {state}
"""


def test_machines_on_both_hosts_idempotent_check_mode_and_diff(ansible, remote_hosts):
    hosts = remote_hosts.hosts
    _, out = ansible(MACHINE.format(memory="64M", state="started"))
    assert {h: recap(out)[h]["changed"] for h in "ab"} == {"a": 1, "b": 1}, out
    for host in hosts.values():
        status = json.loads(host.pymachine("status", "ans1", "--json").stdout)
        assert status["state"] == "running" and status["limits"]["MemoryMax"] == "64M"
        assert status["enabled"]  # starts at boot: its unit file is in machines.target
        assert host.run(["systemctl", "is-enabled", "pymachine-ans1.service"]).returncode == 0
    _, out = ansible(MACHINE.format(memory="64M", state="started"))
    assert {h: recap(out)[h]["changed"] for h in "ab"} == {"a": 0, "b": 0}, out

    # --check --diff: says what would change (the definition file), changes nothing
    _, out = ansible(MACHINE.format(memory="128M", state="started"), "--check", "--diff")
    assert recap(out)["a"]["changed"] == 1, out
    assert "-MemoryMax=64M" in out and "+MemoryMax=128M" in out, out
    for host in hosts.values():
        assert "MemoryMax=64M" in host.pymachine("show", "ans1").stdout

    # a real change: new definition, the machine restarted with it
    _, out = ansible(MACHINE.format(memory="128M", state="started"))
    assert recap(out)["b"]["changed"] == 1, out
    status = json.loads(hosts["b"].pymachine("status", "ans1", "--json").stdout)
    assert status["state"] == "running" and status["limits"]["MemoryMax"] == "128M"

    # a bad limit: pymachine's one line, nothing changed
    rc, out = ansible(MACHINE.format(memory="lots", state="started"), check=False)
    assert rc != 0 and "pymachine: " in out and "MemoryMax" in out, out
    assert "MemoryMax=128M" in hosts["b"].pymachine("show", "ans1").stdout

    _, out = ansible(MACHINE.format(memory="128M", state="stopped"))
    assert recap(out)["a"]["changed"] == 1
    assert hosts["a"].pymachine("status", "ans1", check=False).returncode == 3
    _, out = ansible(MACHINE.format(memory="128M", state="absent"))
    assert recap(out)["a"]["changed"] == 1
    _, out = ansible(MACHINE.format(memory="128M", state="absent"))
    assert recap(out)["a"]["changed"] == 0
    for host in hosts.values():
        assert host.pymachine("show", "ans1", check=False).returncode == 4
        enabled = host.run(["systemctl", "is-enabled", "pymachine-ans1.service"], check=False)
        assert enabled.returncode != 0  # disabled before the removal


def test_image_and_machine_info_modules(ansible, remote_hosts):
    _, out = ansible(
        """\
- hosts: b
  gather_facts: false
  tasks:
    - pymachine.machines.image: {name: tiny2, distro: busybox}
    - pymachine.machines.machine:
        name: info1
        image: tiny2
        command: [/bin/sh, -c, "while :; do sleep 1; done"]
        network: none
        properties: {TasksMax: 40}
        state: started
    - pymachine.machines.machine_info: {name: [info1]}
      register: info
    - ansible.builtin.assert:
        that:
          - info.machines.info1.state == 'running'
          - info.machines.info1.limits.TasksMax == "40"
          - "'memory' in info.machines.info1 and 'tasks' in info.machines.info1"
          - info.machines.info1.address is none
    - pymachine.machines.machine: {name: info1, state: absent}
    - pymachine.machines.image: {name: tiny2, state: absent}
    - pymachine.machines.image: {name: tiny2, state: absent}
      register: again
    - ansible.builtin.assert: {that: [not again.changed]}
    - ansible.builtin.command: pymachine export-tar tiny /tmp/tiny.tar
    - pymachine.machines.image: {name: tiny3, source: import, path: /tmp/tiny.tar}
    - pymachine.machines.image: {name: tiny3, source: import, path: /tmp/tiny.tar}
      register: again
    - ansible.builtin.assert: {that: [not again.changed, again.image.name == 'tiny3']}
"""
    )
    assert recap(out)["b"]["failed"] == 0, out
    images = json.loads(remote_hosts.b.pymachine("images", "--json").stdout)
    assert "tiny2" not in [i["name"] for i in images]
    assert "tiny3" in [i["name"] for i in images]
    remote_hosts.b.pymachine("image", "remove", "tiny3")


def _python_machine(host, name: str) -> None:
    """A machine with a Python for Ansible's modules: busybox with the host's
    /usr bound read-only (and /lib, /lib64 leading into it, as on Debian)."""
    if host.run(["test", "-d", "/var/lib/machines/pyimg"], check=False).returncode:
        host.pymachine("image", "clone", "tiny", "pyimg")
        host.run(
            "cd /var/lib/machines/pyimg && rm -rf lib lib64 && ln -s usr/lib lib "
            "&& ln -s usr/lib64 lib64"
        )
    host.pymachine(
        "create", name, "--image", "pyimg", "--network", "none", "--bind", "/usr:/usr:ro",
        "--", "/bin/sh", "-c", "while :; do sleep 1; done",
    )  # fmt: skip
    host.pymachine("start", name)


def test_connection_plugin_installs_a_file_in_machines_of_both_hosts(ansible, remote_hosts):
    a, b = remote_hosts.a, remote_hosts.b
    _python_machine(a, "conn1")
    _python_machine(b, "conn2")
    try:
        inventory = f"{ROOT}/conn.ini"
        a.run(
            ["sh", "-c", f"cat > {inventory}"],
            input="conn1 ansible_connection=pymachine.machines.pymachine\n"
            "conn2@b ansible_connection=pymachine.machines.pymachine "
            "ansible_pymachine_machine=conn2 ansible_pymachine_host=b\n"
            "[all:vars]\nansible_python_interpreter=/usr/bin/python3\n",
        )
        _, out = ansible(
            """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: /etc/greeting
        content: "hello from {{ inventory_hostname }}\\n"
        mode: "0644"
    - ansible.builtin.slurp: {src: /etc/greeting}
      register: back
    - ansible.builtin.assert:
        that: "(back.content | b64decode) == 'hello from ' + inventory_hostname + '\\n'"
    - ansible.builtin.fetch: {src: /etc/greeting, dest: /tmp/fetched, flat: false}
""",
            "-i",
            inventory,
        )
        assert recap(out)["conn1"]["failed"] == 0 and recap(out)["conn2@b"]["failed"] == 0, out
        # inside the machines, not on the hosts
        assert (
            a.pymachine("exec", "conn1", "--", "cat", "/etc/greeting").stdout
            == "hello from conn1\n"
        )
        assert (
            b.pymachine("exec", "conn2", "--", "cat", "/etc/greeting").stdout
            == "hello from conn2@b\n"
        )
        assert a.run(["test", "-e", "/etc/greeting"], check=False).returncode != 0
        assert a.run(["cat", "/tmp/fetched/conn1/etc/greeting"]).stdout == "hello from conn1\n"
    finally:
        for host, name in ((a, "conn1"), (b, "conn2")):
            host.pymachine("stop", name, check=False)
            host.pymachine("remove", name, check=False)


def test_inventory_plugin_sees_the_machines_of_both_hosts(ansible, remote_hosts):
    a, b = remote_hosts.a, remote_hosts.b
    for host, name in ((a, "inv-a"), (b, "inv-b")):
        host.pymachine("create", name, "--image", "tiny", "--network", "none", "--",
                       "/bin/sh", "-c", "while :; do sleep 1; done")  # fmt: skip
    a.pymachine("start", "inv-a")
    try:
        path = f"{ROOT}/machines.pymachine.yml"
        a.run(
            ["sh", "-c", f"cat > {path}"],
            input="plugin: pymachine.machines.pymachine\nhosts: [local, b]\n",
        )
        cp = a.run([str(BIN / "ansible-inventory"), "-i", path, "--list"], env=ansible.env)
        inv = json.loads(cp.stdout)
        assert "inv-a" in inv["state_running"]["hosts"]
        assert "inv-b@b" in inv["state_stopped"]["hosts"]
        assert {"inv-a", "inv-b@b"} <= set(inv["image_tiny"]["hosts"])
        assert "inv-b@b" in inv["pymachine_host_b"]["hosts"]
        hostvars = inv["_meta"]["hostvars"]
        assert plain(hostvars["inv-b@b"]["ansible_pymachine_host"]) == "b"
        assert plain(hostvars["inv-a"]["ansible_connection"]) == "pymachine.machines.pymachine"
        assert plain(hostvars["inv-a"]["pymachine_state"]) == "running"
    finally:
        for host, name in ((a, "inv-a"), (b, "inv-b")):
            host.pymachine("stop", name, check=False)
            host.pymachine("remove", name, check=False)
