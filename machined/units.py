"""Enabled machines: unit files under ``/etc/systemd/system``, rendered from a template.

``pymachine enable web`` does what ``machinectl enable`` does for
``systemd-nspawn@web.service``: it writes ``pymachine-web.service`` (from
``templates/machine.service.j2``), reloads systemd and enables the file over
D-Bus (``Reload``, ``EnableUnitFiles``) into ``machines.target``, so the machine
starts at boot. Its ``[Service]`` lines come from
:func:`machined.properties.machine_settings`, the same list a transient start
sends as D-Bus properties: an enabled and a transient machine run with the same
settings, under the same unit name.

* :func:`render` turns a definition into the unit file's text (pure);
* :func:`enable` / :func:`disable` write/remove it and (un)install it;
* :func:`refresh` re-renders the file of an *enabled* machine after its
  definition changed (cheap no-op for a machine that is not enabled);
* :func:`set_properties` is ``pymachine set``: validate, apply live with
  ``SetUnitProperties``, persist into the definition and the unit file;
* :func:`install_units` copies the static units of ``units/`` into place.

Live changes and drop-ins: ``SetUnitProperties(unit, runtime=True, …)`` makes
systemd write a drop-in, ``50-KEY.conf``. For a transient unit it lives in
``/run/systemd/transient/UNIT.d`` and goes with the unit; for an enabled unit it
goes to ``/run/systemd/system.control/UNIT.d`` and would outlive the change
(and override the unit file until reboot), so a persistent ``set`` removes the
drop-ins it caused once the unit file says the same, and reloads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from machined import definition as definitions
from machined.definition import MachineDefinition
from machined.errors import InvalidInput, NotFound, NotRunning, PymachineError
from machined.names import validate_machine_name
from machined.paths import Paths, unit_name
from machined.properties import (
    RESOURCE_KEYS,
    Property,
    UnitSetting,
    parse_assignment,
    parse_resource,
    quote_word,
)
from machined.properties import single_line as _single_line
from machined.unitfile import write_atomic

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~2 ms a start)
if TYPE_CHECKING:
    from typing import Any

    from machined.machines import Machines
    from machined.systemd import UnitStatus

TEMPLATE = "machine.service.j2"
TARGET = "machines.target"
#: Keys of ``machine_settings`` that belong in ``[Unit]``; every other one is a ``[Service]`` key.
UNIT_SECTION_KEYS = frozenset(
    {"Description", "Documentation", "After", "Before", "Wants", "Requires", "PartOf"}
)
#: File name endings systemd loads as units (what ``install_units`` copies from ``units/``).
UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".slice",
    ".mount",
    ".automount",
)
#: Settings whose values systemd expands specifiers (``%n``…) in: a ``%`` must be doubled.
_SPECIFIER_KEYS = frozenset({"Description", "ExecStart", "Environment", "RequiresMountsFor"})
_ENABLED_STATES = ("enabled", "enabled-runtime", "linked", "linked-runtime", "alias")
_TRANSIENT_DIR = "/run/systemd/transient/"


# --- rendering (pure) ------------------------------------------------------------


def _exec_start(prop: Property) -> str:
    """``a(sasb)`` [(path, argv, ignore_failure)] → the ExecStart= line's value."""
    ((path, argv, ignore_failure),) = prop.value
    if not argv or argv[0] != path:
        raise PymachineError(f"cannot render ExecStart {prop.value!r}: argv[0] is not the path")
    if not path.startswith("/"):
        raise PymachineError(f"cannot render ExecStart {prop.value!r}: path is not absolute")
    return ("-" if ignore_failure else "") + " ".join(quote_word(w, variables=True) for w in argv)


def setting_value(setting: UnitSetting) -> str:
    """The unit-file value of one of :func:`machine_settings`' entries.

    ``ExecStart`` and ``Environment`` are rendered from their typed D-Bus value
    (so a word with a space or a quote reads back as the same word); others use
    the setting's text, with ``%`` doubled where systemd expands specifiers.
    """
    if setting.key in ("ExecStart", "ExecStartPost", "ExecStopPost"):
        return _exec_start(setting.properties[0])
    if setting.key == "Environment":
        return " ".join(quote_word(assignment) for assignment in setting.properties[0].value)
    text = _single_line(setting.key, setting.text)
    return text.replace("%", "%%") if setting.key in _SPECIFIER_KEYS else text


def _environment() -> Any:
    import jinja2

    from machined.resources import templates_dir

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def render(definition: MachineDefinition, paths: Paths | None = None) -> str:
    """The unit file of an enabled machine, from the same settings a transient start
    uses, and a last line with the checksum of what it was rendered from."""
    return _render(_context(definition, paths or Paths.from_env()))


def _render(context: dict[str, Any]) -> str:
    return _stamped(_environment().get_template(TEMPLATE).render(**context), context)


def _context(definition: MachineDefinition, paths: Paths) -> dict[str, Any]:
    """Everything the template is given: the rendered file is a function of this
    and of the template's text alone."""
    from machined.machines import Machines

    definition.validate()
    settings = Machines(paths).settings(definition)  # pure: no D-Bus until systemd is used
    unit_entries: list[tuple[str, str]] = []
    service_entries: list[tuple[str, str]] = []
    for setting in settings:
        entries = unit_entries if setting.key in UNIT_SECTION_KEYS else service_entries
        entries.append((setting.key, setting_value(setting)))
    mounts = (paths.image(definition.image), paths.machine_state(definition.name))
    return {
        "name": definition.name,
        "unit": unit_name(definition.name),
        "definition_file": str(paths.definition_file(definition.name)),
        "unit_entries": unit_entries,
        "service_entries": service_entries,
        "mounts_for": " ".join(quote_word(str(m)) for m in mounts),
    }


#: The rendered file's last line, before the checksum (see :func:`_is_current`).
STAMP = "# pymachine render checksum (settings, template, the text above): "


def _checksum(context: dict[str, Any], body: str) -> str:
    """CRC-32 of the template, its CONTEXT and the rendered BODY. A change
    detector for files root writes, not an integrity check (root may write the
    unit file anyway): CRC-32 misses no change within 4 bytes and others with
    odds of 2^-32, and zlib costs ~0.2 ms to import (when site has not loaded
    it already), where hashlib would cost a start ~2 ms (OpenSSL)."""
    import zlib

    from machined.resources import template_text

    template = template_text(TEMPLATE)
    data = "\0".join((template, repr(sorted(context.items())), body))
    return f"{zlib.crc32(data.encode()):08x}"


def _stamped(body: str, context: dict[str, Any]) -> str:
    return f"{body}\n{STAMP}{_checksum(context, body)}\n"


def _is_current(text: str, context: dict[str, Any]) -> bool:
    """Whether TEXT, a unit file, is what :func:`render` would write from CONTEXT,
    without rendering (jinja2 costs ~16 ms of imports): its checksum line
    matches CONTEXT, the template and the text above the line. A hand edit of
    the definition (what :func:`refresh` is for) changes the settings in
    CONTEXT, a hand edit of the file its text, a pymachine upgrade the settings
    or the template; a file rendered before checksums has none."""
    body, separator, tail = text.rpartition("\n" + STAMP)
    return bool(separator) and tail == _checksum(context, body) + "\n"


def unit_file(name: str, paths: Paths | None = None) -> Path:
    return (paths or Paths.from_env()).unit_file(name)


def is_enabled(name: str, paths: Paths | None = None) -> bool:
    """Whether the machine has a unit file (no D-Bus: the file is the record)."""
    return unit_file(name, paths).is_file()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# --- helpers over systemd -----------------------------------------------------------


@contextlib.contextmanager
def _using(machines: Machines | None) -> Iterator[Machines]:
    if machines is not None:
        yield machines
        return
    from machined.machines import Machines

    with Machines() as own:
        yield own


def _live_status(machines: Machines, name: str) -> UnitStatus | None:
    """The machine's running unit (service or ``run``'s scope), or None."""
    from machined.machines import scope_name

    for unit in (unit_name(name), scope_name(name)):
        status = machines.systemd.status(unit)
        if status is not None and status.running:
            return status
    return None


def _is_transient(status: UnitStatus | None) -> bool:
    if status is None:
        return False
    return bool(status.properties.get("Transient")) or str(
        status.properties.get("FragmentPath", "")
    ).startswith(_TRANSIENT_DIR)


def _change_lines(changes: Iterable[Sequence[str]]) -> list[str]:
    """EnableUnitFiles/DisableUnitFiles' ``a(sss)`` as systemctl prints it."""
    lines = []
    for kind, path, target in changes:
        if kind == "symlink":
            lines.append(f"Created symlink {path} → {target}.")
        elif kind == "unlink":
            lines.append(f'Removed "{path}".')
        else:
            lines.append(f"{kind}: {path}" + (f" → {target}" if target else ""))
    return lines


def control_dropins(name: str, keys: Iterable[str], paths: Paths | None = None) -> list[Path]:
    """The runtime drop-ins ``SetUnitProperties(runtime=True)`` writes for KEYS of
    an enabled machine's unit (``/run/systemd/system.control/UNIT.d/50-KEY.conf``)."""
    paths = paths or Paths.from_env()
    directory = paths.root / "run/systemd/system.control" / f"{unit_name(name)}.d"
    return [directory / f"50-{key}.conf" for key in keys]


def _remove_dropins(files: Iterable[Path]) -> bool:
    removed = False
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed = True
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only once empty
    return removed


# --- enable / disable / refresh ------------------------------------------------------


@dataclass
class Enabled:
    """What ``enable`` did. (Every dataclass here has a docstring: without one,
    dataclasses imports inspect to write it, ~4 ms of every enabled start.)"""

    name: str
    unit: str
    path: Path
    already: bool = False  # file up to date and enabled before: nothing changed
    rewritten: bool = False  # the file existed with other content
    started: bool = False
    running: bool = False  # was running (as its enabled unit) already
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def enable(name: str, *, now: bool = False, machines: Machines | None = None) -> Enabled:
    """Write, reload and enable the machine's unit file; with NOW, start it too."""
    validate_machine_name(name)
    with _using(machines) as m:
        paths = m.paths
        definition = definitions.load(name, paths)  # NotFound / InvalidInput first
        text = render(definition, paths)
        unit = unit_name(name)
        path = paths.unit_files / unit
        result = Enabled(name, unit, path)
        systemd = m.systemd
        old = _read(path)
        state = systemd.unit_file_state(unit)
        live = _live_status(m, name)
        transient = _is_transient(live)
        if transient:
            # EnableUnitFiles by name would find the transient unit's file first and refuse
            # ("transient or generated"); by path it enables ours. No Reload: machines.target
            # would then hold on to the transient unit after it stops, and a later start
            # would run it again instead of loading the unit file.
            result.warnings.append(
                f"machine '{name}' is running as a transient unit; it starts from its unit "
                f"file from its next start on ('pymachine restart {name}')"
            )
        target_state = systemd.unit_file_state(TARGET)
        if target_state is None:
            raise PymachineError(
                f"{TARGET} is not installed on this host (package systemd-container); "
                "'pymachine install-units' installs pymachine's copy"
            )
        if target_state == "masked":
            result.warnings.append(f"{TARGET} is masked: machines will not start at boot")
        result.warnings += _dependency_warnings(definition, paths)

        if old == text and state in _ENABLED_STATES:
            result.already = True
        else:
            if live is None:
                systemd.reset_failed(unit)  # drop a failed transient run still loaded
            result.rewritten = old is not None and old != text
            write_atomic(path, text)
            try:
                to_enable = [str(path) if transient else unit]
                if target_state == "disabled":
                    to_enable.append(TARGET)
                changes = systemd.enable_unit_files(to_enable, runtime=False, force=True)
                if not transient:
                    systemd.reload()
            except BaseException:
                _restore(path, old)
                with contextlib.suppress(Exception):
                    systemd.reload()
                raise
            result.changes = _change_lines(_changes(changes))

        if live is not None:
            result.running = True
        elif now:
            m.start(name)  # StartUnit: the unit file exists now
            result.started = True
    return result


def _dependency_warnings(definition: MachineDefinition, paths: Paths) -> list[str]:
    """A machine enabled to start at boot whose Requires=/Wants= name a machine
    that is not enabled: at boot that machine has no unit (a transient one
    exists only once started), so systemd fails a required one ("Unit not
    found") and leaves a wanted one out. ``systemctl enable`` enables no
    dependency either; it is said, not done."""
    warnings = []
    for key, names, outcome in (
        ("requires", definition.requires, "it will fail to start at boot"),
        ("wants", definition.wants, "it will start at boot without it"),
    ):
        for other in names:
            if not is_enabled(other, paths):
                warnings.append(
                    f"machine '{definition.name}' {key} '{other}', which is not enabled: "
                    f"{outcome} ('pymachine enable {other}')"
                )
    return warnings


def _restore(path: Path, old: str | None) -> None:
    with contextlib.suppress(OSError):
        if old is None:
            path.unlink()
        else:
            write_atomic(path, old)


@dataclass
class Disabled:
    """What ``disable`` did."""

    name: str
    unit: str
    path: Path
    already: bool = False  # was not enabled: nothing changed
    stopped: bool = False
    running: bool = False  # still running (disabled without --now)
    changes: list[str] = field(default_factory=list)


def disable(name: str, *, now: bool = False, machines: Machines | None = None) -> Disabled:
    """Disable and remove the machine's unit file; with NOW, stop it first."""
    validate_machine_name(name)
    with _using(machines) as m:
        paths = m.paths
        unit = unit_name(name)
        path = paths.unit_files / unit
        result = Disabled(name, unit, path)
        systemd = m.systemd
        state = systemd.unit_file_state(unit)
        has_file = path.exists()
        if not has_file and not definitions.exists(name, paths):
            raise NotFound(f"machine '{name}' not found")
        live = _live_status(m, name)
        if now and live is not None:
            systemd.stop_unit(live.name)
            result.stopped = True
            live = None
        if not has_file and state not in _ENABLED_STATES:
            result.already = True
            result.running = live is not None
            return result
        if state is not None:
            changes = systemd.disable_unit_files([unit], runtime=False)
            result.changes = _change_lines(_changes(changes))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if live is None:
            # runtime drop-ins of `set --runtime` would apply to a later transient start
            _remove_dropins(control_dropins(name, RESOURCE_KEYS, paths))
        result.running = live is not None
        systemd.reload()
    return result


def _changes(reply: Any) -> list[Sequence[str]]:
    """The ``a(sss)`` of EnableUnitFiles' ``ba(sss)`` or DisableUnitFiles' ``a(sss)``."""
    if isinstance(reply, (tuple, list)) and len(reply) == 2 and isinstance(reply[0], bool):
        reply = reply[1]
    return [tuple(change) for change in reply or []]


def refresh(
    name: str,
    *,
    machines: Machines | None = None,
    reload: bool = True,
    definition: MachineDefinition | None = None,
) -> bool:
    """Re-render an enabled machine's unit file after its definition changed.

    A no-op (no D-Bus) for a machine that is not enabled, and (no rendering) for
    a file that is current (:func:`_is_current`). Returns True when the file
    changed (and systemd was reloaded, unless RELOAD is false). DEFINITION: the
    machine's, when the caller has just loaded it (``start``).
    """
    validate_machine_name(name)
    paths = machines.paths if machines is not None else Paths.from_env()
    path = unit_file(name, paths)
    old = _read(path)
    if old is None:
        return False
    context = _context(definition or definitions.load(name, paths), paths)
    if _is_current(old, context):
        return False
    text = _render(context)
    if text == old:
        return False
    write_atomic(path, text)
    if reload:
        with _using(machines) as m:
            m.systemd.reload()
    return True


# --- pymachine set -----------------------------------------------------------------


@dataclass
class Applied:
    """What ``set`` did: the assignments, where they went live, whether persisted."""

    name: str
    assignments: list[tuple[str, str]]
    live_unit: str | None = None  # the running unit it was applied to
    persisted: bool = False
    unit_file_rewritten: bool = False
    next_start: list[str] = field(default_factory=list)  # definition keys: not live


def set_properties(
    name: str,
    assignments: Sequence[str],
    *,
    runtime: bool = False,
    machines: Machines | None = None,
) -> Applied:
    """``pymachine set NAME -p KEY=VALUE…``: validate every assignment, apply them
    live if the machine runs, and (unless RUNTIME) save them in the definition and
    the enabled machine's unit file. Bad input changes nothing."""
    if not assignments:
        raise InvalidInput("nothing to set: give at least one -p KEY=VALUE")
    pairs = [parse_setting(text) for text in assignments]
    limits = [(k, v) for k, v in pairs if k not in definitions.SETTABLE]
    later = [(k, v) for k, v in pairs if k in definitions.SETTABLE]
    if runtime and later:
        raise InvalidInput(
            f"{later[0][0]}= applies at the next start: --runtime takes resource limits only"
        )
    validate_machine_name(name)
    with _using(machines) as m:
        paths = m.paths
        definition = definitions.load(name, paths)
        result = Applied(name, pairs, next_start=[k for k, _ in later])
        if later:  # every check create makes, before anything is applied
            definition = definitions.with_assignments(definition, later)
            _check_dependencies(definition, m)
        live = _live_status(m, name)
        if runtime and live is None:
            raise NotRunning(
                f"machine '{name}' is not running; --runtime changes only a running machine"
            )
        if live is not None and limits:
            props = [prop for key, value in limits for prop in parse_resource(key, value)]
            m.systemd.set_properties(live.name, props, runtime=True)
            result.live_unit = live.name
        if runtime:
            return result
        for key, value in limits:
            definition.resources[key] = value
        definitions.save(definition, paths)
        result.persisted = True
        result.unit_file_rewritten = refresh(name, machines=m, reload=False)
        dropins_gone = False
        if live is not None and not _is_transient(live) and is_enabled(name, paths):
            # the unit file says the same now: the drop-ins SetUnitProperties wrote go
            dropins_gone = _remove_dropins(control_dropins(name, [k for k, _ in pairs], paths))
        if result.unit_file_rewritten or dropins_gone:
            m.systemd.reload()
    return result


def parse_setting(text: str) -> tuple[str, str]:
    """A ``set`` assignment: a definition key of :data:`definitions.SETTABLE`
    (its value checked with the whole definition) or a resource limit."""
    key = text.partition("=")[0].strip(" \t")
    if key in definitions.SETTABLE and "=" in text:
        _single_line("property", text)
        return key, text.partition("=")[2].strip(" \t")
    if "=" in text and key not in RESOURCE_KEYS:
        raise InvalidInput(
            f"unknown property {key!r} (resource limits: {', '.join(RESOURCE_KEYS)}; "
            f"definition keys: {', '.join(definitions.SETTABLE)})"
        )
    return parse_assignment(text)


def _check_dependencies(definition: MachineDefinition, machines: Machines) -> None:
    """Requires=/Wants=/After= as create checks them: known machines, no cycle."""
    if definition.requires or definition.wants or definition.after:
        from machined import dependencies

        dependencies.check(definition, machines.load)


# --- units/ ----------------------------------------------------------------------


@dataclass
class Installed:
    """What ``install-units`` did, unit by unit."""

    installed: list[str] = field(default_factory=list)  # copied (new or changed)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (unit, why)
    changes: list[str] = field(default_factory=list)


def shipped_units() -> list[tuple[str, str]]:
    """(name, text) of every unit file shipped in ``units/``."""
    from machined.resources import units_dir

    directory = units_dir()
    if not directory.is_dir():
        return []
    return sorted(
        (entry.name, entry.read_text())
        for entry in directory.iterdir()
        if entry.is_file() and entry.name.endswith(UNIT_SUFFIXES)
    )


def _has_install_section(text: str) -> bool:
    return any(line.strip() == "[Install]" for line in text.splitlines())


def install_units(*, machines: Machines | None = None) -> Installed:
    """Copy ``units/*`` into the unit directory, reload, and enable the ones with
    an ``[Install]`` section. A unit the host already has from elsewhere (e.g.
    ``machines.target`` from systemd-container) is left to the host."""
    result = Installed()
    with _using(machines) as m:
        paths = m.paths
        systemd = m.systemd
        to_enable = []
        for name, text in shipped_units():
            target = paths.unit_files / name
            old = _read(target)
            if old is None and systemd.unit_file_state(name) is not None:
                result.skipped.append((name, "provided by the host"))
                to_enable.append(name)  # still wanted enabled (machines.target)
                continue
            if old == text:
                result.unchanged.append(name)
            else:
                write_atomic(target, text)
                result.installed.append(name)
            if _has_install_section(text):
                to_enable.append(name)
        from machined.daemon import install

        daemon_files, same = install.install(paths)  # pymachined: unit, bus, polkit files
        result.installed += daemon_files
        result.unchanged += same
        # GetUnitFileState and EnableUnitFiles read the files on disk; Reload comes last
        # so that systemd sees the new files and the new .wants/ symlinks at once
        enable_now = [u for u in to_enable if systemd.unit_file_state(u) in (None, "disabled")]
        if enable_now:
            changes = systemd.enable_unit_files(enable_now, runtime=False, force=True)
            result.changes = _change_lines(_changes(changes))
        systemd.reload()
    return result
