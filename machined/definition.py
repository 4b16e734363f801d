"""The machine definition, read from and written to
``/etc/pymachine/NAME.machine`` in systemd's unit-file syntax.

One table (``_KEYS``) drives both the parser and the writer, so a key cannot be
readable but not writable or the other way round. Every value is validated
when read, so a bad definition is a clear error before anything is started.
"""

from __future__ import annotations

import re
import shlex
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

from machined import unitfile
from machined.credentials import Credential, parse_stored
from machined.errors import InvalidInput, NotFound
from machined.names import validate_image_name, validate_machine_name
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths
from machined.records import Record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~1.6 ms in the
if TYPE_CHECKING:  # runtime, which runs without site: nothing there imports it)
    from typing import Any

#: Notify=: "no", the unit is started once the payload runs; "yes", once it
#: sent READY=1 to $NOTIFY_SOCKET (runtime/notify.py).
NOTIFY_MODES = ("no", "yes", "healthy")  # healthy: at HealthCmd='s first pass
HEALTH_ACTIONS = ("none", "kill", "restart", "stop")  # HealthOnFailure=, podman's
#: Restart=: systemd.service(5)'s, carried to the unit as they are
RESTART_MODES = (
    "no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always",
)  # fmt: skip
DEFAULT_STOP_TIMEOUT = 10.0  # seconds, like docker/podman; systemd's 90 s is for whole OSes


# Plain classes and namedtuples, no dataclasses: the runtime reads a
# definition on every start, and dataclasses cost it ~1 ms to import and
# ~0.3 ms per class to create.


class BindMount(namedtuple("BindMount", "source target read_only", defaults=(False,))):
    """A ``Bind=`` line: host path, path inside, read-only or not."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> BindMount:
        """``HOST:CONTAINER[:ro|rw]`` or ``PATH[:ro]`` (same path on both sides)."""
        if text != text.strip():
            raise InvalidInput(f"invalid bind {text!r}: white space around it")
        parts = text.split(":")
        read_only = False
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        if len(parts) == 1:
            parts.append(parts[0])
        if len(parts) != 2 or not all(p.startswith("/") for p in parts):
            raise InvalidInput(f"invalid bind {text!r}: expected /HOST/PATH[:/CONTAINER/PATH][:ro]")
        if any(".." in Path(p).parts for p in parts):
            raise InvalidInput(f"invalid bind {text!r}: '..' is not allowed")
        return cls(parts[0], parts[1], read_only)

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


class DeviceNode(namedtuple("DeviceNode", "path access", defaults=("rwm",))):
    """A ``Device=/dev/PATH[:rwm]`` line: a host device node the machine may use."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> DeviceNode:
        path, sep, access = text.partition(":")
        if not sep:
            access = "rwm"
        if (
            not path.startswith("/dev/")
            or not re.fullmatch(r"/dev/[A-Za-z0-9_.+@-]+(?:/[A-Za-z0-9_.+@-]+)*", path)
            or ".." in path.split("/")
            or not access
            or not set(access) <= set("rwm")
            or len(set(access)) != len(access)
        ):
            raise InvalidInput(
                f"invalid device {text!r}: expected /dev/PATH[:rwm] (r, w, m: read, write, mknod)"
            )
        return cls(path, "".join(c for c in "rwm" if c in access))

    def __str__(self) -> str:
        return self.path if self.access == "rwm" else f"{self.path}:{self.access}"


class HealthCheck(Record):
    """HealthCmd= and its settings (podman's names and defaults): run by the
    machine's init (pymachine-init.c), which the runtime gives them as flags."""

    def __init__(
        self,
        command: str | None = None,
        interval: float = 30.0,
        timeout: float = 30.0,
        retries: int = 3,
        start_period: float = 0.0,
        on_failure: str = "none",
    ) -> None:
        self.command = command
        self.interval = interval
        self.timeout = timeout
        self.retries = retries
        self.start_period = start_period
        self.on_failure = on_failure

    def validate(self) -> None:
        if self.command is not None and not self.command.strip():
            raise InvalidInput("invalid HealthCmd=: empty")
        check_seconds(self.interval, what="health interval")
        check_seconds(self.timeout, what="health timeout")
        if self.start_period:
            check_seconds(self.start_period, what="health start period")
        if not 1 <= self.retries <= 1000:
            raise InvalidInput(f"invalid HealthRetries= {self.retries}: 1 to 1000")
        if self.on_failure not in HEALTH_ACTIONS:
            raise InvalidInput(
                f"invalid HealthOnFailure= {self.on_failure!r}: expected {', '.join(HEALTH_ACTIONS)}"
            )

    def watched(self) -> bool:
        """Boot mode: whether the guest is checked (runtime/guest.py): for a
        HealthCmd=, or for its action on the guest's own state."""
        return self.command is not None or self.on_failure != "none"

    def init_arguments(self) -> list[str]:
        """pymachine-init's flags (none without a command)."""
        if self.command is None:
            return []
        return [
            "--health-cmd", self.command,
            "--health-interval", repr(self.interval),
            "--health-timeout", repr(self.timeout),
            "--health-retries", str(self.retries),
            "--health-start-period", repr(self.start_period),
            "--health-on-failure", self.on_failure,
        ]  # fmt: skip


class MachineDefinition(Record):
    """A machine as ``/etc/pymachine/NAME.machine`` defines it (mutable; equal
    when every attribute is)."""

    def __init__(
        self,
        name: str,
        image: str,
        *,
        boot: bool = False,
        command: list[str] | None = None,
        environment: dict[str, str] | None = None,
        working_directory: str | None = None,
        user: str | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        binds: list[BindMount] | None = None,
        read_only: bool = False,
        ephemeral: bool = False,
        network: NetworkConfig | None = None,
        resources: dict[str, str] | None = None,
        capability: list[str] | None = None,
        drop_capability: list[str] | None = None,
        system_call_filter: list[str] | None = None,
        no_new_privileges: bool | None = None,  # None: yes for app machines, no in boot mode
        private_users: str = "pick",
        notify: str = "no",
        load_credentials: list[Credential] | None = None,
        set_credentials: list[tuple[str, bool]] | None = None,
        requires: list[str] | None = None,
        wants: list[str] | None = None,
        after: list[str] | None = None,
        devices: list[DeviceNode] | None = None,
        health: HealthCheck | None = None,
        watchdog: float | None = None,
        restart: str = "no",
    ) -> None:
        self.name = name
        self.image = image
        self.boot = boot
        self.command = command if command is not None else []
        self.environment = environment if environment is not None else {}
        self.working_directory = working_directory
        self.user = user
        self.stop_timeout = stop_timeout
        self.binds = binds if binds is not None else []
        self.read_only = read_only
        self.ephemeral = ephemeral
        self.network = network if network is not None else NetworkConfig()
        self.resources = resources if resources is not None else {}
        self.capability = capability if capability is not None else []
        self.drop_capability = drop_capability if drop_capability is not None else []
        self.system_call_filter = system_call_filter if system_call_filter is not None else []
        self.no_new_privileges = no_new_privileges
        self.private_users = private_users
        self.notify = notify  # NOTIFY_MODES: when the unit counts as started
        # LoadCredential[Encrypted]= lines; SetCredential[Encrypted]= IDs (machined.credentials)
        self.load_credentials = load_credentials if load_credentials is not None else []
        self.set_credentials = set_credentials if set_credentials is not None else []
        # create --set-credential's values (ID → bytes): written to the credential
        # store by create, never to the definition file
        self.secrets: dict[str, bytes] = {}
        # other machines, by name (machined.dependencies)
        self.requires = requires if requires is not None else []
        self.wants = wants if wants is not None else []
        self.after = after if after is not None else []
        self.devices = devices if devices is not None else []  # Device= host nodes
        self.health = health if health is not None else HealthCheck()
        # WatchdogSec=: the unit's; the payload's WATCHDOG=1 (relayed by the init) feeds it
        self.watchdog = watchdog
        self.restart = restart  # Restart=: the unit's, systemd's values

    def validate(self) -> MachineDefinition:
        validate_machine_name(self.name)
        validate_image_name(self.image)
        for key, value in self.resources.items():
            _parse_resource(key, value)
        for var in self.environment:
            _check_env_name(var)
        if self.working_directory is not None and not self.working_directory.startswith("/"):
            raise InvalidInput(
                f"invalid working directory {self.working_directory!r}: must be absolute"
            )
        check_seconds(self.stop_timeout, what="stop timeout")
        for what, value in self._text_values():
            unitfile.check_value(what, value)
        for what, value in (("user", self.user), ("working directory", self.working_directory)):
            if value is not None and (not value or value != value.strip()):
                raise InvalidInput(f"invalid {what} {value!r}: empty, or white space around it")
        if self.notify not in NOTIFY_MODES:
            raise InvalidInput(f"invalid Notify= {self.notify!r}: expected yes, healthy or no")
        if self.boot and self.notify == "healthy":
            raise InvalidInput("Notify=healthy is not supported for boot-mode machines yet")
        if self.notify == "healthy" and self.health.command is None:
            raise InvalidInput("Notify=healthy needs a HealthCmd=")
        self.health.validate()
        if self.watchdog is not None:
            check_seconds(self.watchdog, what="WatchdogSec=")
            if self.boot:
                raise InvalidInput("WatchdogSec= is not supported for boot-mode machines yet")
        if self.restart not in RESTART_MODES:
            raise InvalidInput(
                f"invalid Restart= {self.restart!r}: expected {', '.join(RESTART_MODES)}"
            )
        ids = [c.id for c in self.load_credentials] + [i for i, _ in self.set_credentials]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInput(f"credential {twice[0]!r} is given twice")
        if self.boot and self.command:
            raise InvalidInput("a boot-mode machine runs the image's init; it takes no command")
        self.network.validate()
        return self

    def _text_values(self) -> list[tuple[str, str]]:
        """Every free-text value, for checks a line-based file format needs:
        the ones a user or an image's config (Cmd, Env, WorkingDir, User) fills."""
        values = [("command argument", arg) for arg in self.command]
        values += [("environment value", f"{k}={v}") for k, v in self.environment.items()]
        values += [("working directory", self.working_directory or ""), ("user", self.user or "")]
        values += [("bind", str(b)) for b in self.binds]
        values += [("device", str(d)) for d in self.devices]
        values += [("health command", self.health.command or "")]
        values += [("credential", str(c)) for c in self.load_credentials]
        values += [("credential ID", i) for i, _ in self.set_credentials]
        return values


# --- value codecs ------------------------------------------------------------


def _check_env_name(name: str) -> str:
    if (
        not name
        or not (name[0].isalpha() or name[0] == "_")
        or not all(c.isalnum() or c == "_" for c in name)
        or not name.isascii()
    ):
        raise InvalidInput(f"invalid environment variable name {name!r}")
    return name


def parse_env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"invalid environment assignment {text!r}: expected NAME=VALUE")
    return _check_env_name(name), value


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise InvalidInput(f"invalid boolean {text!r}: expected yes or no")


MAX_SECONDS = 365 * 24 * 3600.0


def parse_seconds(text: str) -> float:
    value = text.strip().removesuffix("s")
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value):
        raise InvalidInput(f"invalid duration {text!r}: expected seconds, e.g. 10 or 2.5s")
    return check_seconds(float(value), text)


def check_seconds(seconds: float, text: object = None, what: str = "duration") -> float:
    if not 0 < seconds <= MAX_SECONDS:  # also false for nan
        shown = text if text is not None else seconds
        raise InvalidInput(
            f"invalid {what} {shown!r}: must be more than 0 and at most {MAX_SECONDS:.0f} seconds"
        )
    return seconds


def _parse_resource(key: str, value: str) -> None:
    """Validate one ``[Resources]`` line. :mod:`machined.properties` (its tables
    and patterns: ~2 ms) loads only for a definition that has one: the
    runtime reads every definition and needs none of it."""
    from machined.properties import parse_resource

    parse_resource(key, value)


def _security():
    """``machined.runtime.security`` (ctypes, the seccomp tables: ~4 ms), loaded
    only by a definition with a Capability=, SystemCallFilter= or unusual
    PrivateUsers= line: ``start``, ``list`` and ``status`` read definitions."""
    from machined.runtime import security

    return security


def _parse_private_users(text: str) -> str:
    # the two keywords as written are their own canonical form (userns.parse_spec)
    return text if text in ("pick", "no") else _security().parse_private_users(text)


def _parse_notify(text: str) -> str:
    lowered = text.lower()
    if lowered in NOTIFY_MODES:
        return lowered
    return "yes" if parse_bool(text) else "no"


def _fmt_bool(value: bool) -> str:
    return "yes" if value else "no"


def _fmt_seconds(value: float) -> str:
    from machined.properties import format_seconds  # see _parse_resource

    return format_seconds(value)


class _Key(namedtuple("_Key", "section key get set")):
    """One key of the file: where it lives, how to write (``get``: the values
    to write, none to omit) and read it (``set``: apply one value read).
    A namedtuple: every start reads a definition, a dataclass costs ~0.3 ms."""

    __slots__ = ()


def _scalar(
    attr: str,
    parse: Callable[[str], Any] = str,
    fmt: Callable[[Any], str] = str,
    default: Any = None,
) -> tuple[Callable, Callable]:
    def get(d: MachineDefinition) -> list[str]:
        value = getattr(d, attr)
        return [] if value is None or value == default else [fmt(value)]

    def set_(d: MachineDefinition, text: str) -> None:
        setattr(d, attr, parse(text))

    return get, set_


def _health_scalar(attr: str, parse: Callable, fmt: Callable, default: Any) -> tuple:
    def get(d: MachineDefinition) -> list[str]:
        value = getattr(d.health, attr)
        return [] if value is None or value == default else [fmt(value)]

    def set_(d: MachineDefinition, text: str) -> None:
        setattr(d.health, attr, parse(text))

    return get, set_


def _parse_int(text: str, key: str) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", text):
        raise InvalidInput(f"invalid {key}= {text!r}: expected a number")
    return int(text)


def _parse_seconds_or_zero(text: str) -> float:
    return 0.0 if text.strip().removesuffix("s") in ("0", "0.0") else parse_seconds(text)


def _set_env(d: MachineDefinition, text: str) -> None:
    if text[:1] in ("'", '"'):  # quoted to keep leading/trailing blanks
        try:
            (text,) = shlex.split(text)
        except ValueError:
            raise InvalidInput(f"invalid environment assignment {text!r}") from None
    name, value = parse_env(text)
    d.environment[name] = value


def _fmt_env(name: str, value: str) -> str:
    text = f"{name}={value}"
    return shlex.quote(text) if text != text.strip() or text[-1:] in "'\"" else text


def _set_command(d: MachineDefinition, text: str) -> None:
    try:
        d.command = shlex.split(text)
    except ValueError as exc:
        raise InvalidInput(f"invalid command {text!r}: {exc}") from None


def _set_network_mode(d: MachineDefinition, text: str) -> None:
    try:
        d.network.mode = NetworkMode(text)
    except ValueError:
        raise InvalidInput(
            f"invalid network mode {text!r}: expected none, host or bridge"
        ) from None


def _dependency_key(key: str) -> _Key:
    attr = key.lower()

    def set_(d: MachineDefinition, text: str) -> None:
        from machined.dependencies import parse

        getattr(d, attr).extend(n for n in parse(text) if n not in getattr(d, attr))

    return _Key(
        "Machine", key, lambda d: [" ".join(getattr(d, attr))] if getattr(d, attr) else [], set_
    )


_KEYS: tuple[_Key, ...] = (
    _Key("Machine", "Image", lambda d: [d.image], lambda d, v: setattr(d, "image", v)),
    _Key("Machine", "Boot", *_scalar("boot", parse_bool, _fmt_bool, default=False)),
    *(_dependency_key(key) for key in ("Requires", "Wants", "After")),
    _Key("Exec", "Command", lambda d: [shlex.join(d.command)] if d.command else [], _set_command),
    _Key(
        "Exec",
        "Environment",
        lambda d: [_fmt_env(k, v) for k, v in d.environment.items()],
        _set_env,
    ),
    _Key("Exec", "WorkingDirectory", *_scalar("working_directory")),
    _Key("Exec", "User", *_scalar("user")),
    _Key(
        "Exec",
        "StopTimeoutSec",
        *_scalar("stop_timeout", parse_seconds, _fmt_seconds, default=DEFAULT_STOP_TIMEOUT),
    ),
    _Key(
        "Exec",
        "Capability",
        lambda d: [" ".join(d.capability)] if d.capability else [],
        lambda d, v: d.capability.extend(_security().parse_capabilities(v)),
    ),
    _Key(
        "Exec",
        "DropCapability",
        lambda d: [" ".join(d.drop_capability)] if d.drop_capability else [],
        lambda d, v: d.drop_capability.extend(_security().parse_capabilities(v)),
    ),
    _Key(
        "Exec",
        "SystemCallFilter",
        lambda d: list(d.system_call_filter),
        lambda d, v: d.system_call_filter.append(_security().parse_syscall_filter(v)),
    ),
    _Key(
        "Exec",
        "NoNewPrivileges",
        lambda d: [] if d.no_new_privileges is None else [_fmt_bool(d.no_new_privileges)],
        lambda d, v: setattr(d, "no_new_privileges", parse_bool(v)),
    ),
    _Key(
        "Exec",
        "PrivateUsers",
        *_scalar("private_users", _parse_private_users, default="pick"),
    ),
    _Key("Exec", "Notify", *_scalar("notify", _parse_notify, default="no")),
    # 0: off, as systemd reads it
    _Key(
        "Exec",
        "WatchdogSec",
        *_scalar("watchdog", lambda v: _parse_seconds_or_zero(v) or None, _fmt_seconds),
    ),
    _Key("Exec", "Restart", *_scalar("restart", default="no")),
    *(
        _Key("Exec", key, *_health_scalar(attr, parse, fmt, default))
        for key, attr, parse, fmt, default in (
            ("HealthCmd", "command", str, str, None),
            ("HealthInterval", "interval", parse_seconds, _fmt_seconds, 30.0),
            ("HealthTimeout", "timeout", parse_seconds, _fmt_seconds, 30.0),
            ("HealthRetries", "retries", lambda v: _parse_int(v, "HealthRetries"), str, 3),
            ("HealthStartPeriod", "start_period", _parse_seconds_or_zero, _fmt_seconds, 0.0),
            ("HealthOnFailure", "on_failure", str, str, "none"),
        )
    ),
    *(
        _Key(
            "Exec",
            key,
            lambda d, enc=enc: [str(c) for c in d.load_credentials if c.encrypted == enc],
            lambda d, v, enc=enc: d.load_credentials.append(Credential.parse(v, enc)),
        )
        for key, enc in (("LoadCredential", False), ("LoadCredentialEncrypted", True))
    ),
    *(
        _Key(
            "Exec",
            key,
            lambda d, enc=enc: [i for i, e in d.set_credentials if e == enc],
            lambda d, v, enc=enc: d.set_credentials.append((parse_stored(v), enc)),
        )
        for key, enc in (("SetCredential", False), ("SetCredentialEncrypted", True))
    ),
    _Key(
        "Files",
        "Bind",
        lambda d: [str(b) for b in d.binds],
        lambda d, v: d.binds.append(BindMount.parse(v)),
    ),
    _Key(
        "Files",
        "Device",
        lambda d: [str(n) for n in d.devices],
        lambda d, v: d.devices.append(DeviceNode.parse(v)),
    ),
    _Key("Files", "ReadOnly", *_scalar("read_only", parse_bool, _fmt_bool, default=False)),
    _Key("Files", "Ephemeral", *_scalar("ephemeral", parse_bool, _fmt_bool, default=False)),
    _Key("Network", "Mode", lambda d: [str(d.network.mode)], _set_network_mode),
    _Key(
        "Network",
        "Bridge",
        lambda d: [d.network.bridge] if d.network.mode == NetworkMode.BRIDGE else [],
        lambda d, v: setattr(d.network, "bridge", v),
    ),
    _Key(
        "Network",
        "Address",
        lambda d: [d.network.address] if d.network.mode == NetworkMode.BRIDGE else [],
        lambda d, v: setattr(d.network, "address", v),
    ),
    _Key(
        "Network",
        "Port",
        lambda d: [str(p) for p in d.network.ports],
        lambda d, v: d.network.ports.append(PortForward.parse(v)),
    ),
)
_BY_SECTION_KEY = {(k.section, k.key): k for k in _KEYS}
SECTIONS = ("Machine", "Exec", "Files", "Network", "Resources")


def to_text(definition: MachineDefinition) -> str:
    sections: dict[str, list[tuple[str, str]]] = {s: [] for s in SECTIONS}
    for key in _KEYS:
        sections[key.section].extend((key.key, value) for value in key.get(definition))
    sections["Resources"] = list(definition.resources.items())
    return unitfile.render(sections)


def from_text(name: str, text: str, path: str = "<string>") -> MachineDefinition:
    parsed = unitfile.parse(text, path)
    definition = MachineDefinition(name=name, image="")
    definition.network.ports = []
    for section, entries in parsed.sections.items():
        if section not in SECTIONS:
            raise parsed.error(
                parsed.section_lines.get(section),
                f"unknown section [{section}] (known: {', '.join(SECTIONS)})",
            )
        for entry in entries:
            try:
                if section == "Resources":
                    _parse_resource(entry.key, entry.value)
                    definition.resources[entry.key] = entry.value
                    continue
                key = _BY_SECTION_KEY.get((section, entry.key))
                if key is None:
                    raise InvalidInput(f"unknown key {entry.key}= in [{section}]")
                key.set(definition, entry.value)
            except InvalidInput as exc:
                raise parsed.error(entry, str(exc)) from None
    if not definition.image:
        raise parsed.error(None, "[Machine] Image= is missing")
    try:
        return definition.validate()
    except InvalidInput as exc:
        raise parsed.error(None, str(exc)) from None


# --- pymachine set -------------------------------------------------------------

#: Definition keys ``pymachine set NAME -p KEY=VALUE`` takes besides the
#: resource limits (which apply live), and their sections. They apply at the
#: next start. A list key's value is added to it (as systemctl set-property
#: adds to DeviceAllow=); an empty value clears the key (back to its default).
SETTABLE = {
    **dict.fromkeys(("Requires", "Wants", "After"), "Machine"),
    **dict.fromkeys(
        (
            "Notify", "WatchdogSec", "Restart", "HealthCmd", "HealthInterval", "HealthTimeout",
            "HealthRetries", "HealthStartPeriod", "HealthOnFailure", "LoadCredential",
            "LoadCredentialEncrypted",
        ),
        "Exec",
    ),
    "Device": "Files",
}  # fmt: skip
LIST_KEYS = frozenset(
    ("Requires", "Wants", "After", "Device", "LoadCredential", "LoadCredentialEncrypted")
)


def with_assignments(
    definition: MachineDefinition, assignments: list[tuple[str, str]]
) -> MachineDefinition:
    """DEFINITION with ASSIGNMENTS (SETTABLE keys) applied, as a new definition
    read back from its text: the file parser's checks, exactly as ``create``'s.
    (No SetCredential=: a value is for ``create --replace --set-credential``,
    root's, never an argument of a D-Bus call.)"""
    parsed = unitfile.parse(to_text(definition))
    sections = {s: [(e.key, e.value) for e in parsed.sections.get(s, [])] for s in SECTIONS}
    for key, value in assignments:
        entries = sections[SETTABLE[key]]
        if key not in LIST_KEYS or not value:
            entries[:] = [(k, v) for k, v in entries if k != key]
        if value:
            entries.append((key, value))
    where = f"<{definition.name}.machine>"
    try:
        return from_text(definition.name, unitfile.render(sections), where)
    except InvalidInput as exc:  # no file:line: the text is ours, the value the caller's
        message = re.sub(rf"^{re.escape(where)}(:[0-9]+)?: ", "", str(exc))
        raise InvalidInput(message) from None


# --- the store ---------------------------------------------------------------


def load(name: str, paths: Paths | None = None) -> MachineDefinition:
    paths = paths or Paths.from_env()
    validate_machine_name(name)
    path = paths.definition_file(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"machine '{name}' not found (no {path})") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(
            f"{path}:{line}: not a text file (invalid UTF-8: byte {data[exc.start]:#04x})"
        ) from None
    return from_text(name, text, str(path))


def save(definition: MachineDefinition, paths: Paths | None = None) -> Path:
    paths = paths or Paths.from_env()
    definition.validate()
    path = paths.definition_file(definition.name)
    unitfile.write_atomic(path, to_text(definition))
    return path


def exists(name: str, paths: Paths | None = None) -> bool:
    paths = paths or Paths.from_env()
    return paths.definition_file(name).is_file()


def list_names(paths: Paths | None = None) -> list[str]:
    paths = paths or Paths.from_env()
    try:
        return sorted(
            p.stem for p in paths.definitions.glob("*.machine") if not p.name.startswith(".")
        )
    except FileNotFoundError:
        return []


def list_definitions(paths: Paths | None = None) -> list[MachineDefinition]:
    """Every readable definition; a broken file is skipped here (``status`` names it)."""
    result = []
    for name in list_names(paths):
        try:
            result.append(load(name, paths))
        except InvalidInput:
            continue
    return result
