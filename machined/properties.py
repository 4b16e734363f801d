"""Machine definition → systemd unit properties, with their D-Bus types.

Values use systemd.resource-control(5)'s syntax so an admin can copy them from
a unit file: ``MemoryMax=512M``, ``CPUQuota=20%``, ``TasksMax=infinity``. Each
key validates its value once (``parse_resource``); the same text is then either
written into a unit file verbatim (enabled machines) or converted into the typed
property systemd's D-Bus API expects (transient units), e.g. ``CPUQuota=20%`` →
``CPUQuotaPerSecUSec=200000``.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence

from machined.errors import InvalidInput

UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1
_SIZE_SUFFIXES = {
    "": 1,
    "B": 1,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
    "P": 1024**5,
    "E": 1024**6,
}


# namedtuples, not dataclasses: a start's CLI builds its unit's properties, and
# dataclasses cost it ~1 ms to import and ~0.3 ms per class to create.


class Property(namedtuple("Property", "name signature value")):
    """One unit property: name, D-Bus signature, value."""

    __slots__ = ()


def _bad(key: str, value: str, expected: str) -> InvalidInput:
    return InvalidInput(f"invalid value for {key}: {value!r} (expected {expected})")


_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")


def _percent(key: str, value: str, expected: str, *, maximum: float | None = 100.0) -> float:
    """``N%`` with N a plain decimal (no nan/inf, no exponent, ASCII digits only)."""
    number = value[:-1]
    if not _DECIMAL.fullmatch(number):
        raise _bad(key, value, expected)
    percent = float(number)
    if maximum is not None and percent > maximum:
        raise _bad(key, value, expected)
    return percent


def _integer(key: str, value: str, expected: str, low: int, high: int) -> int:
    if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
        raise _bad(key, value, expected)
    return int(value)


def _scale(percent: float) -> int:
    """systemd's *Scale properties: a fraction of UINT32_MAX."""
    return int(percent / 100 * UINT32_MAX)


def _memory(key: str, value: str) -> list[Property]:
    expected = "bytes with K/M/G/T/P/E suffix (base 1024), N% of RAM, or infinity"
    if value == "infinity":
        return [Property(key, "t", UINT64_MAX)]
    if value.endswith("%"):
        return [Property(f"{key}Scale", "u", _scale(_percent(key, value, expected)))]
    match = re.fullmatch(r"([0-9]+)(?:\.([0-9]+))?([KMGTPE]?)", value)
    if not match:
        raise _bad(key, value, expected)
    whole, fraction, suffix = match.groups()
    multiplier = _SIZE_SUFFIXES[suffix]
    # Integer arithmetic: a float would round 2**53+1 and reject 2**64-2.
    number = int(whole) * multiplier
    if fraction:
        number += int(fraction) * multiplier // 10 ** len(fraction)
    if number >= UINT64_MAX:
        raise _bad(key, value, expected)
    return [Property(key, "t", number)]


def _cpu_quota(key: str, value: str) -> list[Property]:
    expected = "a percentage like 20% or 150% (of one CPU), or infinity"
    if value == "infinity":
        return [Property("CPUQuotaPerSecUSec", "t", UINT64_MAX)]
    if not value.endswith("%"):
        raise _bad(key, value, expected)
    usec = int(_percent(key, value, expected, maximum=None) * 10_000)
    if not 0 < usec < UINT64_MAX:
        raise _bad(key, value, expected)
    return [Property("CPUQuotaPerSecUSec", "t", usec)]


def _weight(key: str, value: str) -> list[Property]:
    expected = "an integer from 1 to 10000" + (", or idle" if key == "CPUWeight" else "")
    if key == "CPUWeight" and value == "idle":
        return [Property(key, "t", 0)]
    return [Property(key, "t", _integer(key, value, expected, 1, 10000))]


def _tasks(key: str, value: str) -> list[Property]:
    expected = "a positive integer, N%, or infinity"
    if value == "infinity":
        return [Property(key, "t", UINT64_MAX)]
    if value.endswith("%"):
        return [Property(f"{key}Scale", "u", _scale(_percent(key, value, expected)))]
    return [Property(key, "t", _integer(key, value, expected, 1, UINT64_MAX - 1))]


def parse_cpu_set(key: str, value: str) -> list[int]:
    """``0-3,6`` → [0, 1, 2, 3, 6]."""
    expected = "a CPU list like 0-3,6"
    cpus: set[int] = set()
    for part in value.replace(" ", ",").split(","):
        if not part:
            continue
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match:
            raise _bad(key, value, expected)
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if last < first or last > 8191:
            raise _bad(key, value, expected)
        cpus.update(range(first, last + 1))
    if not cpus:
        raise _bad(key, value, expected)
    return sorted(cpus)


def cpu_set_mask(cpus: list[int]) -> bytes:
    """The ``ay`` systemd wants: bit N of the little-endian byte array = CPU N."""
    mask = bytearray(max(cpus) // 8 + 1)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def _cpu_set(key: str, value: str) -> list[Property]:
    return [Property(key, "ay", cpu_set_mask(parse_cpu_set(key, value)))]


_PARSERS: dict[str, Callable[[str, str], list[Property]]] = {
    "MemoryMax": _memory,
    "MemoryHigh": _memory,
    "MemoryLow": _memory,
    "MemoryMin": _memory,
    "MemorySwapMax": _memory,
    "CPUQuota": _cpu_quota,
    "CPUWeight": _weight,
    "IOWeight": _weight,
    "TasksMax": _tasks,
    "AllowedCPUs": _cpu_set,
    "AllowedMemoryNodes": _cpu_set,
}

RESOURCE_KEYS: tuple[str, ...] = tuple(_PARSERS)


def parse_resource(key: str, value: str) -> list[Property]:
    """Validate one ``[Resources]`` setting and return its D-Bus properties."""
    parser = _PARSERS.get(key)
    if parser is None:
        raise InvalidInput(f"unknown property {key!r} (known: {', '.join(RESOURCE_KEYS)})")
    return parser(key, value.strip(" \t"))


def parse_assignment(text: str) -> tuple[str, str]:
    """``-p KEY=VALUE`` → (key, value), validated."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"invalid property {text!r}: expected KEY=VALUE")
    single_line("property", text)
    key, value = key.strip(" \t"), value.strip(" \t")
    parse_resource(key, value)
    return key, value


def resource_properties(resources: Mapping[str, str]) -> list[Property]:
    properties: list[Property] = []
    for key, value in resources.items():
        properties.extend(parse_resource(key, value))
    return properties


# --- the machine's service / scope -------------------------------------------

STOP_TIMEOUT_MARGIN = 5.0  # seconds systemd waits beyond the init's own escalation


class UnitSetting(namedtuple("UnitSetting", "key text properties")):
    """One line of a machine's unit: its unit-file form (``key``, ``text``) and
    its D-Bus form (``properties``, a tuple of :class:`Property`)."""

    __slots__ = ()


def _setting(key: str, text: str, *props: Property) -> UnitSetting:
    return UnitSetting(key, text, props or (Property(key, "s", text),))


def format_seconds(seconds: float) -> str:
    """``10`` / ``2.5`` / ``1234567``: exact to the microsecond, never an exponent."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".")


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def single_line(key: str, text: str) -> str:
    """A unit file's value: the same refusal as a definition's
    (:func:`machined.unitfile.check_value`), one rule for every file we write."""
    from machined.unitfile import check_value

    return check_value(f"{key}=", text)


def quote_word(word: str, *, specifiers: bool = True, variables: bool = False) -> str:
    """One word as systemd's unit-file parser reads it back unchanged: doubled
    ``%`` (specifiers), doubled ``$`` where systemd expands ``$VAR`` and
    ``${VAR}`` (VARIABLES: the ``Exec*=`` lines, quoted or not), and C-style
    double quotes unless it is plain."""
    single_line("value", word)
    if specifiers:
        word = word.replace("%", "%%")
    if variables:
        word = word.replace("$", "$$")
    if word and _PLAIN_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unit_quote(*words: str) -> str:
    """Words for ExecStart=/Environment= in a unit file, as the file carries them."""
    return " ".join(quote_word(w) for w in words)


def machine_settings(
    name: str,
    resources: Mapping[str, str],
    stop_timeout: float,
    exec_start: list[str],
    environment: Mapping[str, str],
    *,
    scope: bool = False,
    boot: bool = False,
    exec_stop_post: list[str] | None = None,
    pid_file: str | None = None,
    runtime_directory: str | None = None,
    exec_start_post: list[str] | None = None,
    credentials: Sequence[tuple[str, str, bool]] = (),
    dependencies: Mapping[str, Sequence[str]] | None = None,
    devices: Sequence[tuple[str, str]] = (),
    watchdog: float | None = None,
    restart: str = "no",
) -> list[UnitSetting]:
    """Everything a machine's unit carries, in one list that both the transient
    path (D-Bus properties) and the enabled path (rendered unit file) use, so
    the two can never differ.

    ``exec_stop_post``: a clean-up command systemd runs after the main process
    is gone however it ended (a SIGKILLed runtime included); its failure is
    ignored (``-``), so it never turns a clean stop into a failed unit.
    ``runtime_directory``: relative to /run, made at start and removed by
    systemd at stop (see runtime.cleanup.runtime_directory).
    ``exec_start_post``: Notify=yes, the wait for the payload's READY=1 that
    the start job includes (runtime/notify.py); PID 1, the main process,
    relays READY=1/STATUS=/WATCHDOG=1 to systemd (``NotifyAccess=main``).
    ``credentials``: (ID, host path, encrypted): the unit loads them (and
    decrypts the encrypted ones) at start; the runtime passes them in
    (machined.credentials). ``watchdog``: WatchdogSec=, fed by the payload's
    WATCHDOG=1 through PID 1 (so ``NotifyAccess=main`` too); ``restart``:
    Restart=, as systemd takes it."""
    timeout = stop_timeout + STOP_TIMEOUT_MARGIN
    settings = [
        _setting("Description", f"pymachine machine {name}"),
        _setting("Slice", "machine.slice"),
        _setting("Delegate", "yes", Property("Delegate", "b", True)),
    ]
    for key, units in (dependencies or {}).items():  # other machines' units (dependencies.py)
        if units:
            settings.append(_setting(key, " ".join(units), Property(key, "as", list(units))))
    if not scope:
        settings += [
            # The runtime sets the machine up, writes PID 1's PID and exits: PID 1,
            # adopted by systemd, is the main process (see runtime/supervisor.py).
            _setting("Type", "forking"),
            *([_setting("PIDFile", pid_file)] if pid_file else []),
            _setting("KillMode", "mixed"),
        ]
        if boot:
            import signal  # here: list and status import this module too

            # Stop reaches PID 1 directly (the runtime handed the unit over): the
            # image's systemd halts on SIGRTMIN+3, as systemd-nspawn asks it to.
            settings.append(
                _setting(
                    "KillSignal", "SIGRTMIN+3", Property("KillSignal", "i", signal.SIGRTMIN + 3)
                )
            )
        settings += [
            # Delegate=yes would make systemd default to OOMPolicy=continue; a machine
            # whose process the kernel OOM-kills stops with result 'oom-kill', as any
            # other service does by default.
            _setting("OOMPolicy", "stop"),
            # Like systemd-nspawn@.service: only the container's own device nodes.
            _setting("DevicePolicy", "closed"),
            _setting(
                "DeviceAllow",
                "/dev/net/tun rwm",
                Property("DeviceAllow", "a(ss)", [("/dev/net/tun", "rwm")]),
            ),
            _setting(
                "DeviceAllow", "char-pts rw", Property("DeviceAllow", "a(ss)", [("char-pts", "rw")])
            ),
            # Device=: the definition's host nodes. The runtime makes each in the
            # machine's /dev (mknod, from the unit's cgroup): "m" always. A root
            # inside with CAP_MKNOD (PrivateUsers=no) could make another node
            # of the same device only.
            *(
                _setting(
                    "DeviceAllow",
                    f"{path} {access.replace('m', '')}m",
                    Property("DeviceAllow", "a(ss)", [(path, access.replace("m", "") + "m")]),
                )
                for path, access in devices
            ),
            # The init passes SIGTERM's 143 on when the payload obeys a stop: that is success.
            _setting(
                "SuccessExitStatus", "143", Property("SuccessExitStatus", "(aiai)", ([143], []))
            ),
            # A reboot: the runtime's 133 in foreground mode (as systemd-nspawn@.service);
            # in service mode systemd sees PID 1 itself, which the kernel kills with
            # SIGHUP when the container's systemd calls reboot(2) (SIGINT: halt, clean).
            _setting(
                "RestartForceExitStatus",
                "133 SIGHUP",
                Property("RestartForceExitStatus", "(aiai)", ([133], [1])),
            ),
            _setting(
                "ExecStart",
                _unit_quote(*exec_start),
                Property("ExecStart", "a(sasb)", [(exec_start[0], exec_start, False)]),
            ),
        ]
        if exec_start_post or watchdog:
            settings.append(_setting("NotifyAccess", "main"))
        if watchdog:
            settings.append(
                _setting(
                    "WatchdogSec",
                    f"{format_seconds(watchdog)}s",
                    Property("WatchdogUSec", "t", round(watchdog * 1_000_000)),
                )
            )
        if restart != "no":
            settings.append(_setting("Restart", restart))
        if exec_start_post:
            settings += [
                _setting(
                    "ExecStartPost",
                    _unit_quote(*exec_start_post),
                    Property(
                        "ExecStartPost", "a(sasb)", [(exec_start_post[0], exec_start_post, False)]
                    ),
                ),
            ]
        for ident, path, encrypted in credentials:
            key = "LoadCredentialEncrypted" if encrypted else "LoadCredential"
            settings.append(
                _setting(key, f"{ident}:{path}", Property(key, "a(ss)", [(ident, path)]))
            )
        if runtime_directory:
            settings.append(
                _setting(
                    "RuntimeDirectory",
                    runtime_directory,
                    Property("RuntimeDirectory", "as", [runtime_directory]),
                )
            )
        if exec_stop_post:
            settings.append(
                _setting(
                    "ExecStopPost",
                    "-" + _unit_quote(*exec_stop_post),
                    Property(
                        "ExecStopPost", "a(sasb)", [(exec_stop_post[0], exec_stop_post, True)]
                    ),
                )
            )
        if environment:
            settings.append(
                _setting(
                    "Environment",
                    _unit_quote(*(f"{k}={v}" for k, v in environment.items())),
                    Property("Environment", "as", [f"{k}={v}" for k, v in environment.items()]),
                )
            )
    settings.append(
        _setting(
            "TimeoutStopSec",
            f"{format_seconds(timeout)}s",
            Property("TimeoutStopUSec", "t", round(timeout * 1_000_000)),
        )
    )
    for key, value in resources.items():
        settings.append(_setting(key, value, *parse_resource(key, value)))
    return settings


def to_properties(settings: list[UnitSetting]) -> list[Property]:
    return [prop for setting in settings for prop in setting.properties]
