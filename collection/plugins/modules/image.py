#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: image
short_description: Manage pymachine images
description:
  - Make an image on the managed host by bootstrapping a distribution, pulling an OCI
    image from a registry or importing a tar archive; or remove one.
  - An image that exists is left alone unless O(force=true), which makes it again
    (refused by pymachine while a machine uses it).
  - Supports check mode.
version_added: "0.1.0"
author: pymachine developers
options:
  name:
    description: The image's name.
    type: str
    required: true
  source:
    description: Where a new image comes from.
    type: str
    choices: [bootstrap, pull, import]
    default: bootstrap
  distro:
    description: The distribution to bootstrap (C(busybox), C(debian), ...).
    type: str
  release:
    description: The release to bootstrap.
    type: str
  packages:
    description: Extra packages to include in a bootstrap.
    type: list
    elements: str
    default: []
  reference:
    description: The registry reference to pull.
    type: str
  path:
    description: The tar archive on the managed host to import.
    type: path
  force:
    description: Make the image again even when it exists.
    type: bool
    default: false
  state:
    description: Whether the image should exist.
    type: str
    choices: [present, absent]
    default: present
  executable:
    description: The pymachine command (default the one on C(PATH)).
    type: path
"""

EXAMPLES = r"""
- name: A busybox image, offline in about a second
  pymachine.machines.image:
    name: tiny
    distro: busybox

- name: Debian with a few packages
  pymachine.machines.image:
    name: deb
    distro: debian
    release: bookworm
    packages: [systemd, dbus]

- name: An OCI image from a registry
  pymachine.machines.image:
    name: alpine
    source: pull
    reference: docker.io/library/alpine:3.20
"""

RETURN = r"""
image:
  description: The image as C(pymachine images --json) shows it.
  returned: when O(state=present) and not in check mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pymachine.machines.plugins.module_utils.pymachine import Pymachine


def make_args(p):
    if p["source"] == "bootstrap":
        args = ["bootstrap", "--distro", p["distro"]]
        if p["release"]:
            args += ["--release", p["release"]]
        if p["packages"]:
            args += ["--include", ",".join(p["packages"])]
        return args + [p["name"]]
    if p["source"] == "pull":
        return (
            ["pull", "--name", p["name"]] + (["--force"] if p["force"] else []) + [p["reference"]]
        )
    return ["import-tar", p["path"], p["name"]]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            source=dict(type="str", default="bootstrap", choices=["bootstrap", "pull", "import"]),
            distro=dict(type="str"),
            release=dict(type="str"),
            packages=dict(type="list", elements="str", default=[]),
            reference=dict(type="str"),
            path=dict(type="path"),
            force=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            executable=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    needed = {"bootstrap": "distro", "pull": "reference", "import": "path"}[p["source"]]
    if p["state"] == "present" and not p[needed]:
        module.fail_json(msg="source=%s needs %s" % (p["source"], needed))
    pm = Pymachine(module)
    images = dict((i["name"], i) for i in pm.json(["images"])[1])
    exists = p["name"] in images
    changed = False
    if p["state"] == "absent":
        if exists:
            changed = True
            if not module.check_mode:
                pm.run(["image", "remove", p["name"]])
        module.exit_json(changed=changed)
    if not exists or p["force"]:
        changed = True
        if not module.check_mode:
            if exists and p["source"] != "pull":  # pull replaces by itself (--force)
                pm.run(["image", "remove", p["name"]])
            pm.run(make_args(p))
    result = dict(changed=changed)
    if not module.check_mode:
        result["image"] = dict((i["name"], i) for i in pm.json(["images"])[1]).get(p["name"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
