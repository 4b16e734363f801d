"""The ``pymachine`` command: argument parsing and dispatch only.

Each verb group lives in its own module exposing ``register(subparsers)``; a
module imports what its verbs need inside the handlers, so ``pymachine list``
never pays for the network code or the bootstrapper.
"""

from __future__ import annotations

from machined import lazy

lazy.defer("inspect")  # first: only dataclasses' docstrings would need it (machined.lazy)

import argparse  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from types import ModuleType  # noqa: E402

from machined.errors import ExitCode, InvalidInput, PymachineError  # noqa: E402

#: What pymachine imports that Python does not ship (pyproject.toml's dependencies).
DEPENDENCIES = frozenset({"pystemd", "jinja2", "pyseccomp", "markupsafe"})

# Verb groups, in the order their verbs appear in --help.
VERB_MODULES = (
    "machined.cli.machines",
    "machined.cli.images",
    "machined.cli.units",
    "machined.cli.transfer",
    "machined.cli.data",
)


def _verb_groups(verb: str | None) -> list[ModuleType]:
    """The verb group modules to register: only the one that declares VERB in its
    ``VERBS`` (the machine verbs do), else all of them. Importing and registering
    every group costs ~5 ms on each call, which ``start``/``stop``/``list`` need not pay."""
    modules = []
    for module_name in VERB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a verb group not written yet
        if verb is not None and verb in getattr(module, "VERBS", ()):
            return [module]
        modules.append(module)
    return modules


def terminal_columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` reads it ($COLUMNS,
    then stdout's terminal, else 80), without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, given the terminal's width: left to itself it
    imports shutil for it (with bz2, lzma and zlib, ~2 ms), and argparse makes a
    formatter on every ``add_argument``, so every call paid for it."""

    def __init__(self, prog: str, *args: object, width: int | None = None, **kw: object) -> None:
        # (other arguments passed on: later Pythons add some, e.g. 3.14's color)
        if width is None:
            width = terminal_columns() - 2  # as argparse does with shutil's
        super().__init__(prog, *args, width=width, **kw)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with :class:`HelpFormatter`; sub-parsers are of this
    class too (``add_subparsers`` makes them of its parser's type)."""

    def __init__(self, *args, formatter_class: type = HelpFormatter, **kw) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kw)


def _version() -> str:
    """``pymachine --version``, and whether pymachined's files are installed and
    this package's (``pymachine install-units``)."""
    from machined.daemon.install import problems
    from machined.paths import Paths

    return "pymachine 0.1.0" + "".join(f"\nwarning: {line}" for line in problems(Paths.from_env()))


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with VERB (the first word of the command line), only
    that verb's group when one declares it: same parsing, usage and errors."""
    parser = ArgumentParser(
        prog="pymachine",
        description="Manage nspawn-style machines as systemd units.",
    )
    parser.add_argument("--version", action="store_true", help="show the version and exit")
    parser.add_argument(
        "-H", "--host", metavar="[USER@]HOST", help="manage the machines of HOST (over ssh)"
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    groups = [] if verb == "--version" else _verb_groups(verb)  # printed before any verb
    for module in groups:
        if verb is not None and verb in getattr(module, "VERBS", ()):
            module.register(subparsers, verb)  # that verb's sub-parser only
        else:
            module.register(subparsers)
    return parser


#: Verbs that are calls of pymachined: over D-Bus to the other host's. The
#: others (a terminal's: exec, shell, run, logs; or not yet in the API) run the
#: other host's pymachine under ``ssh``.
_OVER_DBUS = frozenset(
    {"create", "start", "stop", "restart", "kill", "remove", "rm", "list", "ls", "status", "gc"}
)
#: Verbs that need the caller's files: not with -H.
_LOCAL_FILES = frozenset({"copy-to", "copy-from", "bind", "import-tar", "export-tar", "import-oci"})


def _remote(head: list[str], command: list[str] | None) -> list[str]:
    """``-H [USER@]HOST VERB …``: the verbs that are D-Bus calls go to
    pymachined on HOST over systemd's D-Bus-over-SSH transport (``ssh -xT
    HOST systemd-stdio-bridge``, what ``systemctl -H`` uses); the others run
    the other host's pymachine under ``ssh`` (``-t`` from a terminal). Returns
    the rest of the command line (or does not return)."""
    from machined.remote import bus_address, ssh_argv, validate_host

    if head[0].startswith("--host="):
        host, rest = head[0].split("=", 1)[1], head[1:]
    elif len(head) > 1:
        host, rest = head[1], head[2:]
    else:
        raise InvalidInput("-H needs a host: pymachine -H [USER@]HOST VERB …")
    validate_host(host)
    verb = rest[0] if rest else ""
    if verb in _LOCAL_FILES:
        raise InvalidInput(f"'{verb}' works on this host's files: run it on {host} itself")
    # create's --dry-run and --replace read and write HOST's files: its pymachine does them
    if verb not in _OVER_DBUS or (verb == "create" and {"--dry-run", "--replace"} & set(rest)):
        sys.stdout.flush()
        argv = ssh_argv(
            host, ["pymachine", *rest, *(["--", *command] if command is not None else [])]
        )
        os.execvp(argv[0], argv)
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address(host)
    os.environ["PYMACHINE_REMOTE"] = host  # never the in-process fallback (machined.cli.daemon)
    return rest


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``pymachine exec web -u nobody -- ls -l``: what follows the first ``--``
    is the command, untouched by option parsing."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    head, command = split_command(list(sys.argv[1:] if argv is None else argv))
    if head[:1] in (["-H"], ["--host"]) or head[:1] and head[0].startswith("--host="):
        try:
            head = _remote(head, command)
        except PymachineError as exc:
            print(f"pymachine: {exc}", file=sys.stderr)
            return int(exc.exit_code)
    if head[:1] == ["--version"]:
        print(_version())
        return int(ExitCode.OK)
    parser = build_parser(head[0] if head else None)
    args = parser.parse_args(head)
    if command is not None:
        if not hasattr(args, "command"):
            parser.error(f"'{args.verb}' takes no command after --")
        args.command = [*(args.command or []), *command]
    try:
        result = args.func(args)
    except PymachineError as exc:
        print(f"pymachine: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except PermissionError as exc:  # a verb not (yet) in pymachined's API, run as a user
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"pymachine: access denied{where}: '{args.verb}' needs root on this host",
            file=sys.stderr,
        )
        return int(ExitCode.ACCESS_DENIED)
    except ModuleNotFoundError as exc:
        if exc.name not in DEPENDENCIES:
            raise
        print(
            f"pymachine: the Python package '{exc.name}' is missing for {sys.executable}: "
            "install pymachine with pip (./dev/setup does, into .venv)",
            file=sys.stderr,
        )
        return int(ExitCode.FAILURE)
    except BrokenPipeError:  # `pymachine list | head`: the reader went away
        _discard_stdout()
        return 128 + 13  # what a tool killed by SIGPIPE returns, quietly as it would
    return int(result if result is not None else ExitCode.OK)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered raises no more."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def run() -> None:
    """The ``pymachine`` program: :func:`main`, then an exit without the
    interpreter's finalization (module teardown: 8.3 ms measured after a
    ``start``, on every call), since nothing is left to clean up by then."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left after the last write
        _discard_stdout()
        code = code or 128 + 13
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
