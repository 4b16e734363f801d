#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: machine_info
short_description: Facts about pymachine machines
description:
  - The state, address, limits and usage (memory, tasks) of the managed host's machines,
    from C(pymachine list --json) and C(pymachine status --json).
version_added: "0.1.0"
author: pymachine developers
options:
  name:
    description: Only these machines (default all).
    type: list
    elements: str
    default: []
  executable:
    description: The pymachine command (default the one on C(PATH)).
    type: path
"""

EXAMPLES = r"""
- pymachine.machines.machine_info:
  register: info

- ansible.builtin.debug:
    msg: "{{ info.machines.web.state }} at {{ info.machines.web.address }}"
"""

RETURN = r"""
machines:
  description: Machine name to its status (state, image, unit, address, leader, memory,
    tasks, since, uptime, result, limits, exit_status, enabled).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pymachine.machines.plugins.module_utils.pymachine import Pymachine


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="list", elements="str", default=[]),
            executable=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    pm = Pymachine(module)
    names = module.params["name"] or sorted(pm.machines())
    machines = {}
    for name in names:
        status = pm.status(name)
        if status is None:
            module.fail_json(msg="pymachine: machine '%s' not found" % name)
        machines[name] = status
    module.exit_json(changed=False, machines=machines)


if __name__ == "__main__":
    main()
