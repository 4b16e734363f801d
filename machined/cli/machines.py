"""Machine verbs: create, start, stop, restart, kill, remove, list, status,
exec, run, logs. Output and argument handling only; the logic is in
:mod:`machined.machines`.
"""

from __future__ import annotations

import argparse
import os
import sys

from machined.errors import InvalidInput, PymachineError

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
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="/dev/PATH[:rwm]",
        help="pass a host device node in (e.g. /dev/fuse, /dev/kvm, /dev/dri/renderD128)",
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
    p.add_argument(
        "--notify",
        action="store_true",
        help="count the machine as started once its payload sends READY=1 to $NOTIFY_SOCKET",
    )
    p.add_argument(
        "--notify-healthy",
        action="store_true",
        help="count the machine as started at its first passing health check",
    )
    p.add_argument(
        "--watchdog-sec",
        type=float,
        metavar="SECONDS",
        help="systemd's watchdog: the unit fails (or --restart) when the payload's "
        "WATCHDOG=1 stops for this long",
    )
    p.add_argument(
        "--restart",
        metavar="MODE",
        help="the unit's Restart=: no (default), on-failure, on-watchdog, always, … (systemd's)",
    )
    p.add_argument("--health-cmd", metavar="CMD", help="health check, run by /bin/sh -c inside")
    for flag, meta, text in (
        ("--health-interval", "SECONDS", "between checks (default 30)"),
        ("--health-timeout", "SECONDS", "a check's time limit (default 30)"),
        ("--health-start-period", "SECONDS", "failures then do not count (default 0)"),
    ):
        p.add_argument(flag, type=float, metavar=meta, help=text)
    p.add_argument("--health-retries", type=int, metavar="N", help="failures in a row (default 3)")
    p.add_argument(
        "--health-on-failure",
        choices=["none", "kill", "restart", "stop"],
        help="what an unhealthy machine gets (default none)",
    )
    for flag, meta, text in (
        (
            "--load-credential",
            "ID:PATH",
            "a host file the payload reads as $CREDENTIALS_DIRECTORY/ID",
        ),
        ("--load-credential-encrypted", "ID:PATH", "the same, made by systemd-creds encrypt"),
        (
            "--set-credential",
            "ID:VALUE",
            "a credential's value, kept root-only in /etc/pymachine/credentials/NAME/",
        ),
        ("--set-credential-encrypted", "ID:VALUE", "the same, systemd-creds encrypt's output"),
    ):
        p.add_argument(flag, action="append", default=[], metavar=meta, help=text)
    for key in ("requires", "wants", "after"):
        p.add_argument(
            f"--{key}",
            action="append",
            default=[],
            metavar="MACHINE",
            help=f"{key.capitalize()}= another machine (started first, unless --after)",
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


def _apply_credential_flags(definition, args: argparse.Namespace) -> None:
    from machined.credentials import Credential, check_id

    for encrypted, key in ((False, "load_credential"), (True, "load_credential_encrypted")):
        texts = getattr(args, key, [])
        definition.load_credentials += [Credential.parse(text, encrypted) for text in texts]
    for encrypted, key in ((False, "set_credential"), (True, "set_credential_encrypted")):
        for text in getattr(args, key, []):
            ident, sep, value = text.partition(":")
            if not sep:
                raise InvalidInput(f"invalid credential {ident!r}: expected ID:VALUE")
            definition.set_credentials.append((check_id(ident), encrypted))
            definition.secrets[ident] = os.fsencode(value)


def _build_definition(name: str, args: argparse.Namespace, command: list[str]):
    from machined.definition import BindMount, DeviceNode, MachineDefinition, parse_env
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
    definition.devices = [DeviceNode.parse(d) for d in getattr(args, "device", [])]
    definition.read_only = args.read_only
    definition.ephemeral = args.ephemeral
    for text in args.env:
        key, value = parse_env(text)
        definition.environment[key] = value
    definition.working_directory = args.workdir
    if getattr(args, "notify", False):
        definition.notify = "yes"
    if getattr(args, "notify_healthy", False):
        definition.notify = "healthy"
    if getattr(args, "watchdog_sec", None) is not None:
        definition.watchdog = args.watchdog_sec or None  # 0: off, as systemd reads it
    if getattr(args, "restart", None) is not None:
        definition.restart = args.restart
    health = definition.health
    health.command = getattr(args, "health_cmd", None)
    for key in ("interval", "timeout", "start_period", "retries", "on_failure"):
        if getattr(args, f"health_{key}", None) is not None:
            setattr(health, key, getattr(args, f"health_{key}"))
    _apply_credential_flags(definition, args)
    from machined.dependencies import parse

    for key in ("requires", "wants", "after"):
        for text in getattr(args, key, []):
            getattr(definition, key).extend(parse(text))
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
    definition.command = command  # none: the image's (Machines.create)
    return definition.validate()


def _command(args: argparse.Namespace) -> list[str]:
    return list(args.command or [])


def _machines():
    from machined.machines import Machines

    return Machines()


def _daemon_call(call) -> bool:
    """CALL(client) through pymachined (machined.cli.daemon): False when this
    process is to run the library itself instead (root, without the daemon)."""
    from machined.cli import daemon

    if daemon.in_process():
        return False
    try:
        call(daemon)
    except daemon.NotInstalled:
        return False
    return True


def _create_call(definition):
    from machined.definition import to_text

    return lambda daemon: daemon.call("CreateMachine", "ss", [definition.name, to_text(definition)])


def _batch(method: str, names: list[str], local, signature: str = "as", *extra) -> int:
    """METHOD(NAMES, *EXTRA) of pymachined (each name's error reported, the
    first one's exit code), or LOCAL(machines) in-process without it."""
    answer = []
    if _daemon_call(lambda d: answer.append(d.call(method, signature, [names, *extra]))):
        from machined.cli import daemon

        return _report(daemon.errors(answer[0]))
    with _machines() as machines:
        return local(machines)


def _warn_port_sharers(definition) -> None:
    """create goes on, as podman does, when another machine forwards one of
    its host ports too, and says so: only one of them can run at a time."""
    if not definition.network.ports:
        return
    for port, other in _machines().port_sharers(definition):
        print(
            f"pymachine: warning: host port {port.protocol}:{port.host_port} is also forwarded "
            f"to machine '{other}': only one of them can run at a time",
            file=sys.stderr,
        )


# --- verbs ---------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    definition = _build_definition(args.name, args, _command(args))
    if definition.secrets and os.geteuid() != 0:
        raise InvalidInput("--set-credential needs root: pymachined's API takes no secrets yet")
    if args.dry_run or args.replace:
        return _define(definition, args)
    if definition.secrets or not _daemon_call(_create_call(definition)):
        # a secret goes to root's credential store, never over the bus or into the definition
        with _machines() as machines:
            machines.create(definition)
    _warn_port_sharers(definition)
    if not args.quiet:
        print(f"Created machine {definition.name} from image {definition.image}.")
    return 0


def _define(definition, args: argparse.Namespace) -> int:
    """``create --dry-run``: the definition file ``create`` would write, checked
    and printed, nothing made (what a tool compares with ``show``).
    ``create --replace``: a new definition for an existing stopped machine,
    its writable layer kept (as a hand edit of the file would; root, in-process)."""
    from machined import definition as definitions
    from machined.errors import Conflict, NotFound
    from machined.machines import Machines, apply_image_defaults
    from machined.paths import Paths

    paths = Paths.from_env()
    if not definition.command and not definition.boot:
        apply_image_defaults(definition, paths)  # as create fills them in
    definition.validate()
    if args.dry_run:
        sys.stdout.write(definitions.to_text(definition))
        return 0
    if not definitions.exists(definition.name, paths):
        raise NotFound(f"machine '{definition.name}' not found: nothing to replace")
    if not paths.image(definition.image).is_dir():
        raise NotFound(f"image '{definition.image}' not found in {paths.images}")
    with Machines(paths) as machines:
        if machines.is_running(definition.name):
            raise Conflict(f"machine '{definition.name}' is running: stop it to replace it")
    if definition.secrets:  # as create stores them: the definition names their IDs only
        from machined import credentials

        credentials.save(paths, definition.name, definition.secrets)
    definitions.save(definition, paths)
    if not args.quiet:
        print(f"Replaced the definition of machine {definition.name}.")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """The definition file as pymachine reads it (parsed and written back:
    comments dropped), for a person or, with --json, a program."""
    from machined import definition as definitions
    from machined.paths import Paths

    paths = Paths.from_env()
    text = definitions.to_text(definitions.load(args.name, paths))
    if args.json:
        from machined.cli.output import print_json

        print_json(
            {"name": args.name, "path": str(paths.definition_file(args.name)), "definition": text}
        )
    else:
        sys.stdout.write(text)
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
    return _batch(
        "StartMachines", args.names, lambda m: _together(args.names, m.start, m.start_many)
    )


def cmd_stop(args: argparse.Namespace) -> int:
    return _batch("StopMachines", args.names, lambda m: _together(args.names, m.stop, m.stop_many))


def cmd_restart(args: argparse.Namespace) -> int:
    return _batch(
        "RestartMachines", args.names, lambda m: _together(args.names, m.restart, m.restart_many)
    )


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
    import signal  # kill only

    number = _parse_signal(args.signal)
    if not 0 < number < signal.NSIG:
        raise InvalidInput(f"unknown signal {args.signal!r}")
    return _batch(
        "KillMachines",
        args.names,
        lambda m: _each(args.names, lambda name: m.kill(name, number)),
        "asi",
        number,
    )


def cmd_remove(args: argparse.Namespace) -> int:
    return _batch("RemoveMachines", args.names, lambda m: _each(args.names, m.remove))


def _info_json(props: dict[str, Any]) -> dict[str, Any]:
    """A machine's properties (machines.status_properties) as ``--json`` shows them."""
    import time

    from machined.daemon import NO_VALUE

    since = props["Since"] / 1e6 if props["Since"] else None
    running = props["State"] == "running"
    return {
        "name": props["Name"],
        "state": props["State"],
        "image": props["Image"] or None,
        "unit": props["Unit"],
        "address": (props["Addresses"] or [None])[0],
        "leader": props["Leader"] or None,
        "memory": None if props["MemoryCurrent"] == NO_VALUE else props["MemoryCurrent"],
        "tasks": None if props["TasksCurrent"] == NO_VALUE else props["TasksCurrent"],
        "since": since,
        "uptime": time.time() - since if since and running else None,
        "result": props["Result"] or None,
        "health": _health_json(props.get("Health")),
    }


def _health_json(health: dict[str, str] | None) -> dict[str, Any] | None:
    if not health:
        return None
    streak = health.get("failing_streak", "")
    return {
        "status": health.get("status"),
        "failing_streak": int(streak) if streak.isdigit() else None,
        "last_output": health.get("last_output", ""),
    }


def _properties(answer: Any) -> dict[str, Any]:
    """An ``a{sv}`` of machine properties as pystemd decodes it (a dictionary's
    value as a list of pairs) in the shape the library makes them."""
    props = dict(answer)
    for key in ("Limits", "Security", "Health"):
        props[key] = dict(props.get(key, []))
    return props


def _machine_list() -> list[dict[str, Any]]:
    """Every machine's properties, from pymachined (or the library in-process)."""
    answer = []
    if _daemon_call(lambda d: answer.append(d.call("ListMachines"))):
        return [_properties(props) for _name, _path, props in answer[0]]
    from machined.machines import status_properties

    with _machines() as machines:
        return [status_properties(info, machines.paths) for info in machines.list()]


def _machine_status(name: str) -> dict[str, Any]:
    answer = []
    if _daemon_call(lambda d: answer.append(d.call("GetMachineStatus", "s", [name]))):
        return _properties(answer[0])
    from machined.machines import status_properties

    with _machines() as machines:
        return status_properties(machines.info(name), machines.paths)


def cmd_list(args: argparse.Namespace) -> int:
    from machined.cli.output import human_bytes, human_duration, print_json, print_table

    machines = [_info_json(props) | {"problem": props["Problem"]} for props in _machine_list()]
    for info in machines:  # a broken definition is listed (with what systemd knows) and named
        if info["problem"]:
            print(f"pymachine: warning: {info['problem']}", file=sys.stderr)
    if args.json:
        print_json([{k: v for k, v in i.items() if k != "problem"} for i in machines])
        return 0
    rows = [
        (
            i["name"],
            i["state"] + (f" ({i['health']['status']})" if i.get("health") else ""),
            i["image"],
            i["address"],
            human_bytes(i["memory"]) if i["memory"] is not None else None,
            i["tasks"],
            human_duration(i["uptime"]) if i["uptime"] is not None else None,
        )
        for i in machines
    ]
    print_table(
        ("name", "state", "image", "address", "memory", "tasks", "uptime"),
        rows,
        legend=f"{len(machines)} machines listed.",
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import shlex

    from machined.cli.output import human_bytes, human_duration, print_json
    from machined.errors import ExitCode
    from machined.machines import Journal
    from machined.names import validate_machine_name
    from machined.paths import unit_name

    # journalctl reads the service's journal while we ask pymachined (the scope's, if
    # the machine turns out to run in the foreground, is read afterwards)
    remote = bool(os.environ.get("PYMACHINE_REMOTE"))  # -H: the journal is the other host's
    early = (
        None
        if args.json or remote
        else Journal(unit_name(validate_machine_name(args.name)), args.lines)
    )
    try:
        props = _machine_status(args.name)
    except BaseException:
        if early is not None:
            early.close()
        raise
    info = _info_json(props)
    running = info["state"] == "running"
    if early is not None and early.unit != info["unit"]:
        early.close()  # the scope's journal it is
        early = None
    if args.json:
        info["limits"] = dict(props["Limits"])
        info["exit_status"] = None if props["ExitStatus"] < 0 else props["ExitStatus"]
        info["enabled"] = bool(props["Enabled"])
        print_json(info)
    else:
        result = info["result"]
        dot = "●" if running else "○"
        print(f"{dot} {info['name']} - pymachine machine")
        limits = " ".join(f"{k}={v}" for k, v in props["Limits"].items()) or "-"
        rows = [
            (
                "State",
                info["state"] + (f" (result: {result})" if result and result != "success" else ""),
            ),
            ("Unit", info["unit"] + (" (enabled: starts at boot)" if props["Enabled"] else "")),
            ("Image", info["image"]),
            ("Mode", "boot" if props["Boot"] else "application"),
            ("Leader", str(info["leader"]) if info["leader"] else None),
            ("Address", info["address"]),
            ("Network", props["NetworkMode"] or None),
            ("Limits", limits),
            ("Memory", human_bytes(info["memory"]) if info["memory"] is not None else None),
            ("Tasks", str(info["tasks"]) if info["tasks"] is not None else None),
            ("Uptime", human_duration(info["uptime"]) if info["uptime"] is not None else None),
            ("Command", shlex.join(props["Command"]) if props["Command"] else None),
        ]
        if info.get("health"):
            health = info["health"]
            text = f"{health['status']} (failing streak {health['failing_streak']})"
            rows.append(
                ("Health", text + (f": {health['last_output']}" if health["last_output"] else ""))
            )
        rows += list(props["Security"].items()) if running else []
        if not running and result and props["ExitStatus"] >= 0:
            rows.append(("Exit status", str(props["ExitStatus"])))
        width = max(len(key) for key, value in rows if value)
        for key, value in rows:
            if value:
                print(f"{key:>{width}}: {value}")
        lines = "" if remote else (early or Journal(info["unit"], args.lines)).lines()
        if lines:
            print()
            print(lines)
    return 0 if running else int(ExitCode.NOT_RUNNING)


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
    if preserved:
        # pymachined passes stdio alone into a machine (a caller's other
        # descriptors, a directory's above all, are refused there): root
        # hands them over in-process, as before the daemon.
        if os.geteuid() != 0:
            from machined.errors import AccessDenied

            raise AccessDenied("--preserve-fds needs root: pymachined passes only stdio in")
    else:
        status = _exec_through_daemon(args, command, environment)
        if status is not None:
            return status
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


def _exec_through_daemon(args: argparse.Namespace, command: list[str], environment) -> int | None:
    """``ExecMachine`` with our stdin, stdout and stderr (only stdio crosses into
    the machine), a pipe on which pymachined's helper writes the exit status
    when the command ends, and one on which we send it our signals (the
    command runs in a session of its own: the terminal's Ctrl-C reaches only
    us). None: run it in-process (root, without the daemon)."""
    if os.environ.get("TERM"):
        environment = {"TERM": os.environ["TERM"], **environment}
    import signal

    reader, writer = os.pipe()
    signal_reader, signal_writer = os.pipe()
    forwarded = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)  # held until they can be sent
    try:
        started = _daemon_call(
            lambda d: d.call(
                "ExecMachine",
                "sasasssbhhhhh",
                [
                    args.name,
                    command,
                    [f"{key}={value}" for key, value in environment.items()],
                    args.user or "",
                    args.workdir or "",
                    args.verb == "shell",
                    0,
                    1,
                    2,
                    writer,
                    signal_reader,
                ],
            )
        )
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    finally:
        os.close(writer)
        os.close(signal_reader)
    if not started:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(reader)
        os.close(signal_writer)
        return None

    def forward(number: int, _frame: object) -> None:  # the terminal's Ctrl-C is the command's
        os.write(signal_writer, bytes([number]))

    for number in forwarded:
        signal.signal(number, forward)  # (SIGWINCH: shell's relay copies the new size)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with os.fdopen(reader) as answer:
        text = answer.read().strip()
    if not text.isdigit():
        raise PymachineError(f"lost the command in machine '{args.name}' (no exit status)")
    return int(text)


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
    if os.geteuid() != 0:
        raise PymachineError(
            "pymachine run needs root: this process becomes the machine's runtime "
            "(as another user: pymachine start, then pymachine shell)"
        )
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
    answer = []
    if _daemon_call(lambda d: answer.append(d.call("GarbageCollect"))):
        cleaned = answer[0]
    else:
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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="print the definition file, create nothing"
    )
    mode.add_argument(
        "--replace",
        action="store_true",
        help="rewrite an existing stopped machine's definition (its data kept)",
    )
    p.add_argument("command", nargs="*", help="-- CMD [ARGS…] (default: the image's)")
    p.set_defaults(func=cmd_create)


def _show_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("show", help="print a machine's definition file")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)


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
    "show": _show_parser,
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
