"""pymachined: pymachine's API on the system bus (``org.pymachine.machine1``).

This module holds only what both sides share and is import-light, since the
CLI (the client) imports it on every call: the bus name, object paths,
interface names, polkit action ids and the D-Bus error name of each exit code.
The service itself is :mod:`machined.daemon.service` (dbus-next, asyncio).
"""

from __future__ import annotations

from machined.errors import (
    AccessDenied,
    Conflict,
    ExitCode,
    InvalidInput,
    NotFound,
    NotRunning,
    PymachineError,
)

BUS_NAME = "org.pymachine.machine1"
MANAGER_PATH = "/org/pymachine/machine1"
#: The bus's activation file for BUS_NAME (`install-units` writes it): without it
#: root's CLI runs the library itself and skips a call that could only fail.
ACTIVATION_FILE = "/usr/share/dbus-1/system-services/org.pymachine.machine1.service"
MANAGER_INTERFACE = "org.pymachine.machine1.Manager"
MACHINE_INTERFACE = "org.pymachine.machine1.Machine"
IMAGE_INTERFACE = "org.pymachine.machine1.Image"
MACHINE_PATH_PREFIX = MANAGER_PATH + "/machine/"
IMAGE_PATH_PREFIX = MANAGER_PATH + "/image/"

#: systemd's "no value" for a number (MemoryCurrent= of a stopped unit): D-Bus has no None.
NO_VALUE = 2**64 - 1

#: polkit actions (units/org.pymachine.machine1.policy); reading needs none.
ACTION_MANAGE_MACHINES = "org.pymachine.machine1.manage-machines"  # start stop restart kill set
ACTION_CREATE_MACHINES = "org.pymachine.machine1.create-machines"  # create remove enable disable
ACTION_CREATE_PRIVILEGED = "org.pymachine.machine1.create-privileged-machines"  # binds, caps…
ACTION_SHELL = "org.pymachine.machine1.shell"  # exec, shell: root inside the machine
ACTION_MANAGE_IMAGES = "org.pymachine.machine1.manage-images"

#: Each exit code's D-Bus error name, both ways (README's exit code table).
ERROR_NAMES: dict[ExitCode, str] = {
    ExitCode.FAILURE: "org.pymachine.machine1.Failed",
    ExitCode.INVALID: "org.pymachine.machine1.InvalidInput",
    ExitCode.NOT_RUNNING: "org.pymachine.machine1.NotRunning",
    ExitCode.NOT_FOUND: "org.pymachine.machine1.NotFound",
    ExitCode.CONFLICT: "org.pymachine.machine1.Conflict",
    ExitCode.ACCESS_DENIED: "org.pymachine.machine1.AccessDenied",
}
_ERROR_CLASSES: dict[str, type[PymachineError]] = {
    ERROR_NAMES[ExitCode.INVALID]: InvalidInput,
    ERROR_NAMES[ExitCode.NOT_RUNNING]: NotRunning,
    ERROR_NAMES[ExitCode.NOT_FOUND]: NotFound,
    ERROR_NAMES[ExitCode.CONFLICT]: Conflict,
    ERROR_NAMES[ExitCode.ACCESS_DENIED]: AccessDenied,
    # the bus's own refusal (its policy, or polkit through another service)
    "org.freedesktop.DBus.Error.AccessDenied": AccessDenied,
    "DBusAccessDeniedError": AccessDenied,  # pystemd's name for it
    "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired": AccessDenied,
}


def error_name(exc: PymachineError) -> str:
    return ERROR_NAMES.get(ExitCode(int(exc.exit_code)), ERROR_NAMES[ExitCode.FAILURE])


def error_from(name: str, message: str) -> PymachineError:
    """The exception a client raises for the D-Bus error NAME (FAILURE if unknown)."""
    return _ERROR_CLASSES.get(name, PymachineError)(message)


def object_path(prefix: str, name: str) -> str:
    """PREFIX + NAME escaped as sd_bus_path_encode does (``web-1`` -> ``web_2d1``):
    machine and image names may hold ``-`` and ``.``, object paths may not."""
    if not name:
        return prefix + "_"
    return prefix + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)
