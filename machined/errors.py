"""Errors a user sees, each with an exit code that means something.

The CLI prints ``pymachine: <message>`` on stderr and exits with ``exit_code``;
library users catch :class:`PymachineError`.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the operation was tried and failed (systemd, kernel, payload)
    INVALID = 2  # bad input: name, property, value, usage (argparse uses 2 too)
    NOT_RUNNING = 3  # like systemctl status / LSB: the machine is not running
    NOT_FOUND = 4  # no such machine or image (systemctl's "no such unit")
    CONFLICT = 5  # already running, still in use, already exists
    ACCESS_DENIED = 6  # pymachined (polkit) refused the caller: nothing was changed


class PymachineError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE


class InvalidInput(PymachineError):
    exit_code = ExitCode.INVALID


class NotFound(PymachineError):
    exit_code = ExitCode.NOT_FOUND


class NotRunning(PymachineError):
    exit_code = ExitCode.NOT_RUNNING


class Conflict(PymachineError):
    exit_code = ExitCode.CONFLICT


class AccessDenied(PymachineError):
    exit_code = ExitCode.ACCESS_DENIED
