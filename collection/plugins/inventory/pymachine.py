# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
name: pymachine
short_description: pymachine machines as inventory hosts
description:
  - Lists the machines of this host and of other hosts (C(pymachine -H HOST list --json),
    over ssh) as inventory hosts that use the P(pymachine.machines.pymachine#connection)
    connection, grouped by image (C(image_NAME)) and by state (C(state_STATE)), and by host
    (C(pymachine_host_HOST)).
  - A machine of this host is named as the machine; one of another host C(NAME@HOST).
  - The inventory file's name ends in C(pymachine.yml) or C(pymachine.yaml).
version_added: "0.1.0"
author: pymachine developers
options:
  plugin:
    description: The plugin's name.
    type: str
    required: true
    choices: [pymachine.machines.pymachine]
  hosts:
    description: C([USER@]HOST) of each host whose machines to list; C(local) is this host.
    type: list
    elements: str
    default: [local]
  executable:
    description: The pymachine command.
    type: str
    default: pymachine
"""

EXAMPLES = r"""
# machines.pymachine.yml
plugin: pymachine.machines.pymachine
hosts:
  - local
  - root@db1.example.org
"""

import json
import re
import subprocess

from ansible.errors import AnsibleParserError
from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.inventory import BaseInventoryPlugin


def _group(prefix, value):
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", value)


class InventoryModule(BaseInventoryPlugin):
    NAME = "pymachine.machines.pymachine"

    def verify_file(self, path):
        return super(InventoryModule, self).verify_file(path) and path.endswith(
            ("pymachine.yml", "pymachine.yaml")
        )

    def _list(self, host):
        cmd = [self.get_option("executable")]
        if host != "local":
            cmd += ["-H", host]
        try:
            out = subprocess.run(cmd + ["list", "--json"], capture_output=True, check=False)
        except OSError as exc:
            raise AnsibleParserError("cannot run pymachine: %s" % to_native(exc)) from None
        if out.returncode:
            err = to_native(out.stderr).strip().splitlines()
            raise AnsibleParserError(
                "%s: %s" % (host, err[-1] if err else "exit status %d" % out.returncode)
            )
        return json.loads(out.stdout)

    def parse(self, inventory, loader, path, cache=True):
        super(InventoryModule, self).parse(inventory, loader, path, cache)
        self._read_config_data(path)
        for host in self.get_option("hosts"):
            for machine in self._list(host):
                name = machine["name"] if host == "local" else "%s@%s" % (machine["name"], host)
                self.inventory.add_host(name)
                for group in (
                    _group("image_", machine.get("image") or "none"),
                    _group("state_", machine["state"]),
                    _group("pymachine_host_", host),
                ):
                    self.inventory.add_group(group)
                    self.inventory.add_child(group, name)
                self.inventory.set_variable(
                    name, "ansible_connection", "pymachine.machines.pymachine"
                )
                self.inventory.set_variable(name, "ansible_pymachine_machine", machine["name"])
                if host != "local":
                    self.inventory.set_variable(name, "ansible_pymachine_host", host)
                for key in ("state", "image", "address"):
                    self.inventory.set_variable(name, "pymachine_" + key, machine.get(key))
