#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: machine
short_description: Manage pymachine machines
description:
  - Create, change, start, stop, restart and remove a pymachine machine (an nspawn-style
    container run as a systemd unit) on the managed host.
  - The wanted definition file is rendered and checked by C(pymachine create --dry-run) and
    compared with the machine's (C(pymachine show --json)); a machine whose definition
    differs gets the new one (C(pymachine create --replace)), and is restarted if it ran.
  - Supports check mode and diff mode (the diff is the definition file).
version_added: "0.1.0"
author: pymachine developers
options:
  name:
    description: The machine's name.
    type: str
    required: true
  image:
    description: The image to run (required unless O(state=absent)).
    type: str
  command:
    description: The command to run (default the image's).
    type: list
    elements: str
  properties:
    description: Resource limits with systemd's names and syntax, for example C(MemoryMax=64M).
    type: dict
    default: {}
  ports:
    description: Forwarded ports, C([tcp|udp:]HOST:CONTAINER).
    type: list
    elements: str
    default: []
  network:
    description: Network mode.
    type: str
    choices: [none, host, bridge]
  binds:
    description: Bind mounts, C(HOST:CONTAINER[:ro]).
    type: list
    elements: str
    default: []
  environment:
    description: Environment variables of the command.
    type: dict
    default: {}
  enabled:
    description: Whether the machine starts at boot (C(pymachine enable)); unchanged when not given.
    type: bool
  state:
    description: The machine's wanted state.
    type: str
    choices: [present, started, stopped, restarted, absent]
    default: present
  executable:
    description: The pymachine command (default the one on C(PATH)).
    type: path
"""

EXAMPLES = r"""
- name: A web server machine with limits and a forwarded port, running and started at boot
  pymachine.machines.machine:
    name: web
    image: tiny
    command: [/bin/sh, -c, "echo hello > /index.html; exec httpd -f -p 80 -h /"]
    properties:
      MemoryMax: 64M
      CPUQuota: 20%
    ports: ["tcp:8080:80"]
    enabled: true
    state: started

- name: Gone
  pymachine.machines.machine:
    name: web
    state: absent
"""

RETURN = r"""
machine:
  description: The machine's status (C(pymachine status --json)) after the task; absent when removed.
  returned: success
  type: dict
definition:
  description: The machine's definition file after the task.
  returned: when O(state) is not C(absent)
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pymachine.machines.plugins.module_utils.pymachine import Pymachine


def create_args(params):
    """``pymachine create`` flags for the wanted definition."""
    args = [params["name"], "--image", params["image"], "--quiet"]
    for key, value in sorted(params["properties"].items()):
        args += ["--property", "%s=%s" % (key, value)]
    for port in params["ports"]:
        args += ["--port", port]
    if params["network"]:
        args += ["--network", params["network"]]
    for bind in params["binds"]:
        args += ["--bind", bind]
    for key, value in sorted(params["environment"].items()):
        args += ["--env", "%s=%s" % (key, value)]
    return args + (["--"] + params["command"] if params["command"] else [])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            image=dict(type="str"),
            command=dict(type="list", elements="str"),
            properties=dict(type="dict", default={}),
            ports=dict(type="list", elements="str", default=[]),
            network=dict(type="str", choices=["none", "host", "bridge"]),
            binds=dict(type="list", elements="str", default=[]),
            environment=dict(type="dict", default={}),
            enabled=dict(type="bool"),
            state=dict(
                type="str",
                default="present",
                choices=["present", "started", "stopped", "restarted", "absent"],
            ),
            executable=dict(type="path"),
        ),
        required_if=[
            ("state", "present", ["image"]),
            ("state", "started", ["image"]),
            ("state", "stopped", ["image"]),
            ("state", "restarted", ["image"]),
        ],
        supports_check_mode=True,
    )
    p = module.params
    pm = Pymachine(module)
    name = p["name"]
    check = module.check_mode
    changed = False
    status = pm.status(name)
    running = bool(status) and status["state"] == "running"
    current = pm.definition(name) if status else None
    before = current["definition"] if current else ""
    header = current["path"] if current else name + ".machine"

    if p["state"] == "absent":
        if status:
            changed = True
            if not check:
                if running:
                    pm.run(["stop", name])
                if status.get("enabled"):
                    pm.run(["disable", name])
                pm.run(["remove", name])
        result = dict(changed=changed)
        if module._diff:
            result["diff"] = dict(
                before=before, after="", before_header=header, after_header=header
            )
        module.exit_json(**result)

    args = create_args(p)
    after = pm.run(["create", "--dry-run"] + args)[1]
    if not status:
        changed = True
        if not check:
            pm.run(["create"] + args)
    elif after != before:
        changed = True
        if not check:
            if running:
                pm.run(["stop", name])
            pm.run(["create", "--replace"] + args)
            if running and p["state"] != "stopped":
                pm.run(["start", name])

    if p["enabled"] is not None and bool(status and status.get("enabled")) != p["enabled"]:
        changed = True
        if not check:
            pm.run(["enable" if p["enabled"] else "disable", name])

    if p["state"] == "started" and not running:
        changed = True
        if not check:
            pm.run(["start", name])
    elif p["state"] == "stopped" and running:
        changed = True
        if not check:
            pm.run(["stop", name])
    elif p["state"] == "restarted":
        changed = True
        if not check:
            pm.run(["restart", name])

    result = dict(changed=changed, definition=after)
    if not check:
        result["machine"] = pm.status(name)
    if module._diff:
        result["diff"] = dict(before=before, after=after, before_header=header, after_header=header)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
