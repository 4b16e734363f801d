# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running pymachine on the managed host: its ``--json`` output and exit
codes, never its tables. A failure fails the task with pymachine's own one
line (``pymachine: ...``) as the message."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

#: pymachine's documented exit codes (README, "Exit codes").
NOT_RUNNING = 3
NOT_FOUND = 4
CONFLICT = 5


def error_line(stderr, rc):
    """pymachine's one-line error (its last line that says ``pymachine:``)."""
    lines = [line for line in (stderr or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("pymachine:"):
            return line
    return lines[-1] if lines else "pymachine exited with status %d" % rc


class Pymachine(object):
    """pymachine on the managed host, called as the module's user."""

    def __init__(self, module):
        self.module = module
        self.path = module.params.get("executable") or module.get_bin_path(
            "pymachine", required=True, opt_dirs=["/usr/local/bin"]
        )

    def run(self, args, ok=(0,), data=None):
        """(rc, stdout, stderr); fails the task unless rc is in OK."""
        cmd = [self.path] + list(args)
        rc, out, err = self.module.run_command(cmd, data=data, binary_data=data is not None)
        if rc not in ok:
            self.module.fail_json(msg=error_line(err, rc), rc=rc, stdout=out, stderr=err, cmd=cmd)
        return rc, out, err

    def json(self, args, ok=(0,)):
        rc, out, err = self.run(list(args) + ["--json"], ok=ok)
        try:
            return rc, json.loads(out) if out.strip() else None
        except ValueError:
            self.module.fail_json(msg="pymachine printed no JSON", stdout=out, stderr=err)

    def machines(self):
        """``list --json``: name -> the machine's entry."""
        return dict((m["name"], m) for m in self.json(["list"])[1])

    def status(self, name):
        """``status NAME --json`` (running or not), or None when there is no such machine."""
        rc, info = self.json(["status", name], ok=(0, NOT_RUNNING, NOT_FOUND))
        return None if rc == NOT_FOUND else info

    def definition(self, name):
        """``show NAME --json``: the definition as pymachine reads it, or None."""
        rc, info = self.json(["show", name], ok=(0, NOT_FOUND))
        return None if rc == NOT_FOUND else info
