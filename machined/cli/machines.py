"""Machine verbs: create, start, stop, restart, kill, remove, list, status,
exec, run, logs. Output and argument handling only; the logic is in
:mod:`machined.machines`.
"""

from __future__ import annotations

import argparse
import os
import sys

from machined.errors import InvalidInput

TYPE_CHECKING = False  # typing.TYPE_CHECKING without typing's import (~1.5 ms a call)
if TYPE_CHECKING:
    from typing import Any


def _add_definition_flags(p: argparse.ArgumentParser) -> None:
    """Flags that write definition keys; shared by create and run --ephemeral."""
    p.add_argument("--image", help="image to run (from `pymachine images`)")
    p.add_argument(
        "-p",
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="resource limit with systemd's names and syntax, e.g. MemoryMax=64M, CPUQuota=20%%",
    )
    p.add_argument(
        "--boot", action="store_true", help="run the image's own init (systemd) as PID 1"
    )
    p.add_argument(
        "--bind", action="append", default=[], metavar="HOST:CONTAINER[:ro]", help="bind mount"
    )
    p.add_argument("--read-only", action="store_true", help="mount the root file system read-only")
    p.add_argument("--ephemeral", action="store_true", help="throw the writable layer away at stop")
    p.add_argument(
        "--env",
        "-E",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable",
    )
    p.add_argument("--workdir", metavar="DIR", help="working directory of the command")
    p.add_argument("--user", "-u", metavar="USER[:GROUP]", help="user to run the command as")
    p.add_argument(
        "--stop-timeout", type=float, metavar="SECONDS", help="grace period before SIGKILL at stop"
    )
    p.add_argument(
        "--network", choices=["none", "host", "bridge"], help="network mode (default: bridge)"
    )
    p.add_argument("--bridge", help="bridge to attach to (default: pymachine0)")
    p.add_argument("--address", help="fixed IPv4 address on the bridge (default: auto)")
    p.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="[tcp|udp:]HOST:CONTAINER",
        help="forward a host port to the machine",
    )


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--private-users",
        metavar="pick|no|UID[:COUNT]",
        help="user namespace (default: pick, a range of 65536 host UIDs of its own)",
    )
    p.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="CAP",
        help="keep a capability beyond nspawn's default set",
    )
    p.add_argument(
        "--drop-capability",
        action="append",
        default=[],
        metavar="CAP",
        help="drop a capability from the default set",
    )
    p.add_argument(
        "--system-call-filter",
        action="append",
        default=[],
        metavar="[~]CALL…",
        help="seccomp filter in systemd's syntax",
    )


def _apply_security_flags(definition, args: argparse.Namespace) -> None:
    from machined.runtime import security

    if args.private_users:
        definition.private_users = security.parse_private_users(args.private_users)
    for text in args.capability:
        definition.capability.extend(security.parse_capabilities(text))
    for text in args.drop_capability:
        definition.drop_capability.extend(security.parse_capabilities(text))
    for text in args.system_call_filter:
        definition.system_call_filter.append(security.parse_syscall_filter(text))


def _build_definition(name: str, args: argparse.Namespace, command: list[str]):
    from machined.definition import BindMount, MachineDefinition, parse_env
    from machined.names import validate_image_name, validate_machine_name
    from machined.network.config import NetworkMode, PortForward
    from machined.properties import parse_assignment

    validate_machine_name(name)
    if not args.image:
        raise InvalidInput("--image is required")
    validate_image_name(args.image)
    definition = MachineDefinition(name=name, image=args.image)
    for text in args.property:
        key, value = parse_assignment(text)
        definition.resources[key] = value
    definition.boot = args.boot
    definition.binds = [BindMount.parse(b) for b in args.bind]
    definition.read_only = args.read_only
    definition.ephemeral = args.ephemeral
    for text in args.env:
        key, value = parse_env(text)
        definition.environment[key] = value
    definition.working_directory = args.workdir
    definition.user = args.user
    if args.stop_timeout is not None:
        definition.stop_timeout = args.stop_timeout
    if args.network:
        definition.network.mode = NetworkMode(args.network)
    if args.bridge:
        definition.network.bridge = args.bridge
    if args.address:
        definition.network.address = args.address
    definition.network.ports = [PortForward.parse(p) for p in args.port]
    _apply_security_flags(definition, args)
    definition.command = command
    if not command and not args.boot:
        _apply_image_defaults(definition)
    return definition.validate()


def _apply_image_defaults(definition) -> None:
    """An imported OCI image brings its Entrypoint/Cmd/Env/WorkingDir/User
    along: these values and no others (each is checked as if typed by hand,
    so a hostile config is refused, never written as another key)."""
    from machined.errors import NotFound
    from machined.images import ImageStore

    try:
        config = ImageStore().config(definition.image)
    except NotFound:
        return  # create reports the missing image itself
    except InvalidInput as exc:
        raise InvalidInput(f"image '{definition.image}': {exc}") from None
    definition.command = list(config.command)
    definition.environment = {**config.environment_dict, **definition.environment}
    definition.working_directory = definition.working_directory or config.working_directory
    definition.user = definition.user or config.user


def _command(args: argparse.Namespace) -> list[str]:
    return list(args.command or [])


def _machines():
    from machined.machines import Machines

    return Machines()


# --- verbs ---------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    definition = _build_definition(args.name, args, _command(args))
    with _machines() as machines:
        machines.create(definition)
        shared = machines.port_sharers(definition)
    for port, other in shared:
        print(
            f"pymachine: warning: host port {port.protocol}:{port.host_port} is also forwarded "
            f"to machine '{other}': only one of them can run at a time",
            file=sys.stderr,
        )
    if not args.quiet:
        print(f"Created machine {definition.name} from image {definition.image}.")
    return 0


def _each(names: list[str], action) -> int:
    """Apply ACTION to every name like systemctl does: go on after a failure,
    report each, and exit with the first failure's code."""
    return _together(names, action, lambda batch: [_tried(action, name) for name in batch])


def _together(names: list[str], action, batch) -> int:
    """:func:`_each`, with every machine's job queued before any is waited for:
    BATCH(NAMES) (``Machines.start_many``…) starts them side by side, as
    ``systemctl start a b c`` does, and gives each name's error; they are
    reported in the names' order, the exit code is the first failure's."""
    if len(names) == 1:
        action(names[0])  # one machine: errors propagate as they are
        return 0
    return _report(batch(names))


def _tried(action, name: str):
    """ACTION(NAME)'s error, None if it succeeded."""
    from machined.errors import PymachineError

    try:
        action(name)
    except PymachineError as exc:
        return exc
    return None


def _report(errors) -> int:
    """Print each error (as they come) and return the first one's exit code."""
    status = 0
    for exc in errors:
        if exc is not None:
            print(f"pymachine: {exc}", file=sys.stderr)
            status = status or int(exc.exit_code)
    return status


def cmd_start(args: argparse.Namespace) -> int:
    with _machines() as machines:
        return _together(args.names, machines.start, machines.start_many)


def cmd_stop(args: argparse.Namespace) -> int:
    with _machines() as machines:
        return _together(args.names, machines.stop, machines.stop_many)


def cmd_restart(args: argparse.Namespace) -> int:
    with _machines() as machines:
        return _together(args.names, machines.restart, machines.restart_many)


def _parse_signal(text: str) -> int:
    import signal  # kill only

    name = text.upper()
    if name.isdigit():
        return int(name)
    if name.startswith("RTMIN+") or name.startswith("SIGRTMIN+"):
        return signal.SIGRTMIN + int(name.rsplit("+", 1)[1])
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidInput(f"unknown signal {text!r}") from None


def cmd_kill(args: argparse.Namespace) -> int:
    number = _parse_signal(args.signal)
    with _machines() as machines:
        return _each(args.names, lambda name: machines.kill(name, number))


def cmd_remove(args: argparse.Namespace) -> int:
    with _machines() as machines:
        return _each(args.names, machines.remove)


def _info_json(info) -> dict[str, Any]:
    return {
        "name": info.name,
        "state": str(info.state),
        "image": info.image,
        "unit": info.unit,
        "address": info.address,
        "leader": info.leader,
        "memory": info.memory,
        "tasks": info.tasks,
        "since": info.since,
        "uptime": info.uptime,
        "result": info.result,
    }


def cmd_list(args: argparse.Namespace) -> int:
    from machined.cli.output import human_bytes, human_duration, print_json, print_table

    with _machines() as machines:
        infos = machines.list()
    for info in infos:  # a broken definition is listed (with what systemd knows) and named
        if info.problem:
            print(f"pymachine: warning: {info.problem}", file=sys.stderr)
    if args.json:
        print_json([_info_json(i) for i in infos])
        return 0
    rows = [
        (
            i.name,
            i.state,
            i.image,
            i.address,
            human_bytes(i.memory) if i.memory is not None else None,
            i.tasks,
            human_duration(i.uptime) if i.uptime is not None else None,
        )
        for i in infos
    ]
    print_table(
        ("name", "state", "image", "address", "memory", "tasks", "uptime"),
        rows,
        legend=f"{len(infos)} machines listed.",
    )
    return 0


def _limits_text(info) -> str:
    if info.definition is None or not info.definition.resources:
        return "-"
    return " ".join(f"{k}={v}" for k, v in info.definition.resources.items())


def cmd_status(args: argparse.Namespace) -> int:
    import shlex

    from machined.cli.output import human_bytes, human_duration, print_json
    from machined.errors import ExitCode
    from machined.machines import Journal, MachineState
    from machined.names import validate_machine_name
    from machined.paths import unit_name

    # journalctl reads the service's journal while we ask systemd (the scope's, if
    # the machine turns out to run in the foreground, is read afterwards)
    early = None if args.json else Journal(unit_name(validate_machine_name(args.name)), args.lines)
    try:
        with _machines() as machines:
            info = machines.info(args.name)
    except BaseException:
        if early is not None:
            early.close()
        raise
    if early is not None and early.unit != info.unit:
        early.close()  # the scope's journal it is
        early = None
    if args.json:
        data = _info_json(info)
        data["limits"] = dict(info.definition.resources) if info.definition else {}
        data["exit_status"] = info.exit_status
        print_json(data)
    else:
        definition = info.definition
        dot = "●" if info.state == MachineState.RUNNING else "○"
        print(f"{dot} {info.name} - pymachine machine")
        rows = [
            (
                "State",
                f"{info.state}"
                + (f" (result: {info.result})" if info.result and info.result != "success" else ""),
            ),
            ("Unit", info.unit + (" (enabled: starts at boot)" if _enabled(info.name) else "")),
            ("Image", info.image),
            ("Mode", "boot" if definition and definition.boot else "application"),
            ("Leader", str(info.leader) if info.leader else None),
            ("Address", info.address),
            ("Network", str(definition.network.mode) if definition else None),
            ("Limits", _limits_text(info)),
            ("Memory", human_bytes(info.memory) if info.memory is not None else None),
            ("Tasks", str(info.tasks) if info.tasks is not None else None),
            ("Uptime", human_duration(info.uptime) if info.uptime is not None else None),
            (
                "Command",
                shlex.join(definition.command) if definition and definition.command else None,
            ),
        ]
        rows += _security_rows(info)
        if info.state != MachineState.RUNNING and info.result and info.exit_status is not None:
            rows.append(("Exit status", str(info.exit_status)))
        width = max(len(key) for key, value in rows if value)
        for key, value in rows:
            if value:
                print(f"{key:>{width}}: {value}")
        lines = (early or Journal(info.unit, args.lines)).lines()
        if lines:
            print()
            print(lines)
    return 0 if info.state == MachineState.RUNNING else int(ExitCode.NOT_RUNNING)


def _security_rows(info) -> list[tuple[str, str | None]]:
    """What confines the running machine, from its runtime's record."""
    if info.state != "running":
        return []
    from machined.paths import Paths
    from machined.runtime import security

    # security.read_state, without its preload: that imports pyseccomp and loads
    # libseccomp (~6 ms) for exec, which applies the policy; status only shows it
    record = Paths.from_env().machine_runtime(info.name) / security.POLICY_FILE
    try:
        policy = security.SecurityPolicy.from_json(record.read_text())
    except (OSError, ValueError, TypeError):
        return []
    return list(security.describe(policy).items())


def _enabled(name: str) -> bool:
    """= units.is_enabled, without importing machined.units (jinja2-free, but ~1.5 ms)."""
    from machined.paths import Paths

    return Paths.from_env().unit_file(name).is_file()


def _check_preserved_fds(args: argparse.Namespace) -> int:
    """``--preserve-fds N``: fds 3 … 3+N-1 must be the caller's (checked first
    thing, before this process opens any of its own)."""
    from machined.runtime import fds

    count = getattr(args, "preserve_fds", 0)
    if count < 0:
        raise InvalidInput("--preserve-fds needs a number of file descriptors, 0 or more")
    missing = fds.first_unopened(count)
    if missing is not None:
        raise InvalidInput(f"--preserve-fds {count}: file descriptor {missing} is not open")
    return count


def cmd_exec(args: argparse.Namespace) -> int:
    preserved = _check_preserved_fds(args)
    from machined.definition import parse_env
    from machined.runtime.enter import ExecRequest, run_in_machine
    from machined.runtime.init import DEFAULT_PATH

    command = _command(args)
    if not command and args.verb == "exec":
        raise InvalidInput("exec needs a command: pymachine exec NAME -- CMD [ARGS…]")
    environment = dict(parse_env(e) for e in args.env)
    with _machines() as machines:
        state = machines.running_state(args.name)
        definition = machines.load(args.name)
    base = {"PATH": DEFAULT_PATH, "container": "pymachine", **definition.environment}
    if os.environ.get("TERM"):
        base["TERM"] = os.environ["TERM"]
    request = ExecRequest(
        command,
        environment,
        args.user,
        args.workdir,
        pty=args.verb == "shell",
        preserve_fds=preserved,
    )
    return run_in_machine(state, request, base)


def cmd_run(args: argparse.Namespace) -> int:
    """Foreground: this process moves into a transient scope and becomes the runtime
    (in-process: an exec would start an interpreter and load it all again)."""
    from machined.runtime import fds

    # First: the container's first process is forked from this one (the
    # intermediate, below), and the runtime stays on the host; neither needs
    # the caller's descriptors, and the payload gets only the preserved ones.
    fds.close_inherited(_check_preserved_fds(args))
    from machined.errors import Conflict
    from machined.machines import Machines, scope_name
    from machined.properties import Property, to_properties
    from machined.runtime import leader

    command = _command(args)
    # First, so that its interpreter starts while we talk to systemd; it waits for
    # the runtime's go (and exits on its own if we fail before that).
    intermediate = leader.spawn(foreground=True)
    with Machines() as machines:
        definition, loaded = machines.startable(args.name)
        if args.ephemeral:
            definition.ephemeral = True
        if scope_name(args.name) in loaded:
            machines.systemd.reset_failed(scope_name(args.name))
        props = to_properties(machines.settings(definition, scope=True))
        props.append(Property("PIDs", "au", [os.getpid(), intermediate.pid]))
        try:
            machines.systemd.start_transient(scope_name(args.name), props)
        except Exception as exc:
            raise Conflict(f"cannot create scope for machine '{args.name}': {exc}") from None
    argv = [args.name, "--foreground"]
    if args.ephemeral:
        argv.append("--ephemeral")
    if command:
        argv += ["--", *command]
    sys.stdout.flush()
    from machined.runtime.supervisor import main as supervise

    return supervise(argv, intermediate)


def cmd_logs(args: argparse.Namespace) -> int:
    from machined import definition as definitions
    from machined.machines import scope_name
    from machined.paths import unit_name

    definitions.load(args.name)
    argv = [
        "journalctl",
        "--no-pager",
        "-o",
        "short-iso" if args.timestamps else "cat",
        "-u",
        unit_name(args.name),
        "-u",
        scope_name(args.name),
    ]
    if args.lines is not None:
        argv += ["-n", str(args.lines)]
    if args.follow:
        argv.append("-f")
    if args.since:
        argv += ["--since", args.since]
    os.execvp(argv[0], argv)
    return 1


def cmd_gc(args: argparse.Namespace) -> int:
    with _machines() as machines:
        cleaned = machines.gc()
    for line in cleaned:
        print(f"Removed {line}.")
    if not cleaned and not args.quiet:
        print("Nothing to clean.")
    return 0


def _create_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("create", help="define a machine from an image")
    p.add_argument("name")
    _add_definition_flags(p)
    _add_security_flags(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("command", nargs="*", help="-- CMD [ARGS…] (default: the image's)")
    p.set_defaults(func=cmd_create)


def _names_parser(verb: str, func: Any, text: str, aliases: tuple[str, ...] = ()) -> Any:
    def build(subparsers: Any) -> None:
        p = subparsers.add_parser(verb, help=text, aliases=list(aliases))
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(func=func)

    return build


def _kill_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("kill", help="send a signal to machines' init")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-s", "--signal", default="SIGTERM")
    p.set_defaults(func=cmd_kill)


def _list_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("list", aliases=["ls"], help="list machines")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "-a", "--all", action="store_true", help="also machines that are stopped (default)"
    )
    p.set_defaults(func=cmd_list)


def _status_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="show a machine's state, limits, usage and journal")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=10, help="journal lines to show")
    p.set_defaults(func=cmd_status)


def _exec_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("exec", help="run a command inside a running machine")
    p.add_argument("name")
    p.add_argument("--user", "-u")
    p.add_argument("--env", "-E", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--workdir", "-w")
    _add_preserve_fds(p)
    p.add_argument("command", nargs="*", help="-- CMD [ARGS…]")
    p.set_defaults(func=cmd_exec)


def _add_preserve_fds(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preserve-fds",
        type=int,
        default=0,
        metavar="N",
        help="also pass file descriptors 3 … 3+N-1 in (default: only stdin, stdout, stderr)",
    )


def _shell_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "shell", help="an interactive shell on a new pseudo-terminal inside a machine"
    )
    p.add_argument("name")
    p.add_argument("--user", "-u")
    p.add_argument("--env", "-E", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--workdir", "-w")
    p.add_argument("command", nargs="*", help="-- CMD [ARGS…] (default: the user's shell)")
    p.set_defaults(func=cmd_exec)


def _run_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run a machine in the foreground, in a transient scope")
    p.add_argument("name")
    p.add_argument("--ephemeral", action="store_true", help="throw the writable layer away at exit")
    _add_preserve_fds(p)
    p.add_argument("command", nargs="*", help="-- CMD [ARGS…]")
    p.set_defaults(func=cmd_run)


def _gc_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gc", help="clean what crashed machines left: veths, nft rules, registrations"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_gc)


def _logs_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("logs", help="show a machine's journal")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int)
    p.add_argument("--since")
    p.add_argument("-t", "--timestamps", action="store_true")
    p.set_defaults(func=cmd_logs)


#: Each verb's sub-parser, in --help order: ``pymachine stop …`` builds only its own.
_PARSERS = {
    "create": _create_parser,
    "start": _names_parser("start", cmd_start, "start machines as transient systemd services"),
    "stop": _names_parser("stop", cmd_stop, "stop running machines"),
    "restart": _names_parser("restart", cmd_restart, "stop (if running) and start machines"),
    "remove": _names_parser(
        "remove", cmd_remove, "remove stopped machines: definition and writable layer", ("rm",)
    ),
    "kill": _kill_parser,
    "list": _list_parser,
    "status": _status_parser,
    "exec": _exec_parser,
    "shell": _shell_parser,
    "run": _run_parser,
    "gc": _gc_parser,
    "logs": _logs_parser,
}
_ALIASES = {"rm": "remove", "ls": "list"}
#: The verbs (and aliases) :func:`register` adds: ``pymachine VERB …`` builds only
#: this group's parser, and in it only VERB's sub-parser (machined.cli.build_parser).
VERBS = frozenset(_PARSERS) | frozenset(_ALIASES)


def register(subparsers: Any, verb: str | None = None) -> None:
    """Add the machine verbs' sub-parsers; with VERB (one of VERBS), its own only."""
    if verb is not None:
        _PARSERS[_ALIASES.get(verb, verb)](subparsers)
        return
    for build in _PARSERS.values():
        build(subparsers)
