# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
name: pymachine
short_description: Run tasks inside a pymachine machine
description:
  - Runs commands inside a running pymachine machine with C(pymachine exec) and moves files
    with C(pymachine copy-to) and C(pymachine copy-from), so a playbook configures what runs
    in a machine without an sshd in it.
  - With O(pymachine_host), the machine is on another host, reached with C(pymachine -H)
    over ssh; files then travel through C(pymachine exec) (copy-to and copy-from work on
    the local host's files only).
  - The machine needs a Python for most modules (C(ansible.builtin.raw) needs none).
version_added: "0.1.0"
author: pymachine developers
options:
  remote_addr:
    description: The machine's name.
    type: str
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_pymachine_machine
  pymachine_host:
    description: The C([USER@]HOST) whose machine it is (default this host).
    type: str
    vars:
      - name: ansible_pymachine_host
  pymachine_executable:
    description: The pymachine command on the controller.
    type: str
    default: pymachine
    vars:
      - name: ansible_pymachine_executable
"""

import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_native
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()


class Connection(ConnectionBase):
    """``pymachine exec``/``copy-to``/``copy-from`` as an Ansible connection."""

    transport = "pymachine.machines.pymachine"
    has_pipelining = True

    def _pymachine(self):
        argv = [self.get_option("pymachine_executable")]
        host = self.get_option("pymachine_host")
        return argv + (["-H", host] if host else [])

    def _machine(self):
        return self.get_option("remote_addr") or self._play_context.remote_addr

    def _run(self, args, in_data=None):
        cmd = self._pymachine() + args
        display.vvv("PYMACHINE: %s" % shlex.join(cmd), host=self._machine())
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise AnsibleConnectionFailure("cannot run pymachine: %s" % to_native(exc)) from None
        out, err = proc.communicate(in_data)
        return proc.returncode, out, err

    def _connect(self):
        super(Connection, self)._connect()
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        return self._run(["exec", self._machine(), "--", "/bin/sh", "-c", cmd], in_data)

    def _failed(self, what, rc, err):
        line = to_native(err).strip().splitlines()
        raise AnsibleError("%s: %s" % (what, line[-1] if line else "exit status %d" % rc))

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self._machine())
        if not os.path.exists(to_bytes(in_path)):
            raise AnsibleError("file or module does not exist: %s" % in_path)
        if self.get_option("pymachine_host"):
            with open(to_bytes(in_path), "rb") as f:
                rc, out, err = self._run(
                    ["exec", self._machine(), "--", "/bin/sh", "-c", 'cat > "$1"', "sh", out_path],
                    f.read(),
                )
        else:
            rc, out, err = self._run(["copy-to", self._machine(), in_path, out_path])
        if rc:
            self._failed("copying %s into %s" % (in_path, self._machine()), rc, err)

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self._machine())
        if self.get_option("pymachine_host"):
            rc, out, err = self._run(
                ["exec", self._machine(), "--", "/bin/sh", "-c", 'cat -- "$1"', "sh", in_path]
            )
            if not rc:
                with open(to_bytes(out_path), "wb") as f:
                    f.write(out)
        else:
            rc, out, err = self._run(["copy-from", self._machine(), in_path, out_path])
        if rc:
            self._failed("copying %s out of %s" % (in_path, self._machine()), rc, err)

    def close(self):
        self._connected = False
