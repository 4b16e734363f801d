"""pymachined's objects on the system bus: the Manager, one object per machine.

The daemon holds no state of its own: every answer is read from the files
under /etc/pymachine, /var/lib/pymachine, /run/pymachine and from systemd, and
every change is made by the library (:mod:`machined.machines`, the same code
the CLI ran in-process before), so pymachined can be restarted or killed at
any time and the machines do not notice. The library is synchronous
(pystemd); each call runs in a worker thread with a bus connection of its own.

It is the trust boundary for callers that are not root: every method checks
its polkit action first (:mod:`machined.daemon.polkit`), and what a caller
sends is parsed and validated exactly as the CLI does it (definitions by
:func:`machined.definition.from_text`, names, signals, environment).

No ``from __future__ import annotations`` here: dbus-next reads the D-Bus
signatures from the annotations' values.
"""

import asyncio
import functools
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dbus_next import BusType, DBusError, Message, MessageFlag, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from machined import daemon, machines
from machined.daemon import enter, jobs, network, polkit
from machined.daemon.bus import CURRENT_MESSAGE, Bus, api, to_bus
from machined.errors import AccessDenied, InvalidInput, NotFound, PymachineError
from machined.names import validate_image_name, validate_machine_name
from machined.paths import Paths

log = logging.getLogger("pymachined")


def _pairs(errors: list[PymachineError | None]) -> list[list[str]]:
    """A batch's errors as ``a(ss)``: (error name, message), ("", "") for success."""
    return [["", ""] if e is None else [daemon.error_name(e), str(e)] for e in errors]


class Daemon:
    """What the objects share: the bus, the paths, polkit, the worker threads."""

    def __init__(self, bus: MessageBus, paths: Paths) -> None:
        self.bus = bus
        self.paths = paths
        self.manager = Manager(self)
        self.machines: dict[str, MachineObject] = {}
        self.jobs: dict[int, jobs.Job] = {}
        self.images: dict[str, ImageObject] = {}
        self._children: set[asyncio.Task] = set()
        # The network's work runs under one lock (machined.network.addresses):
        # two threads of its own, not one of the shared pool's per machine
        # started at once, each blocked on that lock with its own pyroute2 loop.
        self.network_executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="pymachined-network"
        )

    def anonymous_authfile(self) -> str:
        """An auth file with no logins (``{"auths": {}}``), for pulls of callers
        that are not root (skopeo would otherwise use root's)."""
        path = self.paths.runtime / ".anonymous-auth.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text('{"auths": {}}\n')
            os.replace(tmp, path)
        return str(path)

    async def authorize(self, action: str, what: str, **details: str) -> None:
        msg = CURRENT_MESSAGE.get()
        interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        await polkit.check(
            self.bus, msg.sender, action, details, interactive=interactive, what=what
        )

    async def blocking(
        self, fn: Callable[..., Any], *args: Any, executor: ThreadPoolExecutor | None = None
    ) -> Any:
        """FN(*ARGS) on a worker thread (of EXECUTOR, else the shared pool): the
        library blocks on systemd's jobs."""
        return await asyncio.get_running_loop().run_in_executor(
            executor, functools.partial(fn, *args)
        )

    async def networking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """FN(*ARGS) on a network worker thread (set-up, clean-up, reconciliation)."""
        return await self.blocking(fn, *args, executor=self.network_executor)

    async def with_machines(self, fn: Callable[..., Any], *args: Any) -> Any:
        """FN(Machines, *ARGS) on a worker thread with a bus connection of its own."""

        def run() -> Any:
            with machines.Machines(self.paths, owns_network=True) as m:
                return fn(m, *args)

        return await self.blocking(run)

    # --- machine objects ----------------------------------------------------
    def machine_object(self, name: str) -> "MachineObject":
        """NAME's object, exported on first use (machines are defined by files,
        which anyone with root may write: the daemon learns of them when asked)."""
        found = self.machines.get(name)
        if found is None:
            found = self.machines[name] = MachineObject(self, name)
            self.bus.export(found.path, found)
        return found

    def forget(self, name: str) -> None:
        found = self.machines.pop(name, None)
        if found is not None:
            self.bus.unexport(found.path, found)

    def changed(self, names: list[str]) -> None:
        """PropertiesChanged of machines whose state this daemon just changed."""
        for name in names:
            found = self.machines.get(name)
            if found is not None:
                found.invalidate()

    async def start_job(
        self, kind: str, image: str, argv: list[str], stdin: int | None = None
    ) -> list[Any]:
        job = jobs.Job(kind, image, self._job_ended, self.authorize)
        self.bus.export(job.path, job)
        self.jobs[job.id] = job
        try:
            await job.run(argv, self.paths, stdin)
        except BaseException:
            self.jobs.pop(job.id, None)
            self.bus.unexport(job.path, job)
            raise
        self.manager.JobNew(job.id, job.path)
        return [job.id, job.path]

    def _job_ended(self, job: "jobs.Job", code: int, message: str) -> None:
        self.jobs.pop(job.id, None)
        self.bus.unexport(job.path, job)
        self.manager.JobRemoved(job.id, job.path, "failed" if code else "done", code, message)

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._children.add(task)
        task.add_done_callback(self._children.discard)


class Manager(ServiceInterface):
    """``org.pymachine.machine1.Manager`` at ``/org/pymachine/machine1``."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon.MANAGER_INTERFACE)
        self.d = d

    # --- reading: no authorization, as machined's ListMachines --------------
    @method()
    @api
    async def ListMachines(self) -> "a(soa{sv})":
        """(name, object, properties) of every machine: its object's properties
        (org.pymachine.machine1.Machine), so ``list`` is one round trip."""
        rows = await self.d.with_machines(_list_rows)
        out = []
        for props in rows:
            found = self.d.machine_object(props["Name"])
            found.remember(props)
            out.append([props["Name"], found.path, variants(props)])
        return out

    @method()
    @api
    async def GetMachine(self, name: "s") -> "o":
        validate_machine_name(name)
        exists = self.d.paths.definition_file(name).is_file()
        if not exists and not await self.d.with_machines(_has_units, name):
            raise NotFound(f"machine '{name}' not found")
        return self.d.machine_object(name).path

    @method()
    @api
    async def GetMachineStatus(self, name: "s") -> "a{sv}":
        """Every property of the machine's object, in one round trip (``status``)."""
        props = await self.d.with_machines(_status, name)
        self.d.machine_object(name).remember(props)
        return variants(props)

    # --- changing machines ---------------------------------------------------
    @method()
    @api
    async def CreateMachine(self, name: "s", definition: "s") -> "o":
        """DEFINITION: the text of a ``.machine`` file, parsed and validated as
        the CLI does; binds, PrivateUsers= other than pick, extra capabilities,
        host networking… need the privileged create action (see docs)."""
        from machined import definition as definitions

        validate_machine_name(name)
        parsed = definitions.from_text(name, definition, f"<{name}.machine>")
        privileged = privileged_features(parsed)
        await self.d.authorize(
            daemon.ACTION_CREATE_MACHINES, f"create machine '{name}'", machine=name
        )
        if privileged:
            await self.d.authorize(
                daemon.ACTION_CREATE_PRIVILEGED,
                f"create machine '{name}' with {', '.join(privileged)}",
                machine=name,
            )
        await self.d.with_machines(lambda m: m.create(parsed))
        found = self.d.machine_object(name)
        self.MachineNew(name, found.path)
        return found.path

    @method()
    @api
    async def StartMachines(self, names: "as") -> "a(ss)":
        return await self._batch(names, "start", lambda m, ok: m.start_many(ok))

    @method()
    @api
    async def StopMachines(self, names: "as") -> "a(ss)":
        return await self._batch(names, "stop", lambda m, ok: m.stop_many(ok))

    @method()
    @api
    async def RestartMachines(self, names: "as") -> "a(ss)":
        return await self._batch(names, "restart", lambda m, ok: m.restart_many(ok))

    @method()
    @api
    async def KillMachines(self, names: "as", signal_number: "i") -> "a(ss)":
        if not 1 <= signal_number <= 64:
            raise InvalidInput(f"invalid signal number {signal_number}")

        def kill(m: machines.Machines, ok: list[str]) -> list[PymachineError | None]:
            return [_tried(m.kill, name, signal_number) for name in ok]

        return await self._batch(names, "kill", kill)

    @method()
    @api
    async def RemoveMachines(self, names: "as") -> "a(ss)":
        def remove(m: machines.Machines, ok: list[str]) -> list[PymachineError | None]:
            return [_tried(m.remove, name) for name in ok]

        errors = await self._batch(names, "remove", remove, daemon.ACTION_CREATE_MACHINES)
        for name, (error, _message) in zip(names, errors, strict=True):
            if not error:
                path = daemon.object_path(daemon.MACHINE_PATH_PREFIX, name)
                self.d.forget(name)
                self.MachineRemoved(name, path)
        return errors

    async def _batch(
        self,
        names: list[str],
        verb: str,
        run: Callable[[machines.Machines, list[str]], list[PymachineError | None]],
        action: str = daemon.ACTION_MANAGE_MACHINES,
    ) -> list[list[str]]:
        """VERB of NAMES as the CLI's batch verbs do it: each name checked (its
        name, then polkit with ``machine=NAME``), the allowed ones run together
        by the library; one (error name, message) per name, in order."""
        errors: list[PymachineError | None] = [None] * len(names)
        for i, name in enumerate(names):
            try:
                validate_machine_name(name)
                await self.d.authorize(action, f"{verb} machine '{name}'", machine=name)
            except PymachineError as exc:
                errors[i] = exc
        allowed = [i for i in range(len(names)) if errors[i] is None]
        if allowed:
            results = await self.d.with_machines(run, [names[i] for i in allowed])
            for i, error in zip(allowed, results, strict=True):
                errors[i] = error
        self.d.changed([names[i] for i in allowed])
        return _pairs(errors)

    @method()
    @api
    async def EnableMachine(self, name: "s", now: "b") -> "a{sv}":
        """``pymachine enable [--now]``: what it did (machined.units.Enabled's fields)."""
        from machined import units

        return await self._unit_verb(
            name, "enable", lambda m: units.enable(name, now=now, machines=m)
        )

    @method()
    @api
    async def DisableMachine(self, name: "s", now: "b") -> "a{sv}":
        from machined import units

        return await self._unit_verb(
            name, "disable", lambda m: units.disable(name, now=now, machines=m)
        )

    @method()
    @api
    async def SetMachineProperties(self, name: "s", assignments: "as", runtime: "b") -> "a{sv}":
        """``pymachine set``: ASSIGNMENTS ("MemoryMax=1G", "Device=/dev/fuse"),
        validated by the library as the CLI's are. A definition key that gives
        the machine a privileged feature it did not have (Device=,
        LoadCredential=: host devices and paths) needs the privileged create
        action, as CreateMachine does."""
        from machined import definition as definitions
        from machined import units

        validate_machine_name(name)
        later = [
            pair
            for pair in (units.parse_setting(text) for text in assignments)
            if pair[0] in definitions.SETTABLE
        ]
        if later:
            old = await self.d.with_machines(lambda m: m.load(name))
            gained = [
                feature
                for feature in privileged_features(definitions.with_assignments(old, later))
                if feature not in privileged_features(old)
            ]
            if gained:
                await self.d.authorize(
                    daemon.ACTION_CREATE_PRIVILEGED,
                    f"give machine '{name}' {', '.join(gained)}",
                    machine=name,
                )
        return await self._unit_verb(
            name,
            "change the limits of",
            lambda m: units.set_properties(name, assignments, runtime=runtime, machines=m),
        )

    async def _unit_verb(
        self, name: str, verb: str, run: Callable[[machines.Machines], Any]
    ) -> dict[str, Variant]:
        """An enabled-unit verb of the library (machined.units), checked and authorized."""
        validate_machine_name(name)
        await self.d.authorize(
            daemon.ACTION_MANAGE_MACHINES, f"{verb} machine '{name}'", machine=name
        )
        result = await self.d.with_machines(run)
        self.d.changed([name])
        return result_fields(result)

    # --- inside a machine --------------------------------------------------------
    @method()
    @api
    async def ExecMachine(
        self,
        name: "s",
        command: "as",
        environment: "as",
        user: "s",
        working_directory: "s",
        pty: "b",
        stdin: "h",
        stdout: "h",
        stderr: "h",
        status: "h",
        signals: "h",
    ) -> None:
        """Run COMMAND (empty: the user's shell), with ENVIRONMENT ("NAME=VALUE"
        strings), in the running machine with the
        caller's STDIN/STDOUT/STDERR (PTY: on a new pseudo-terminal inside,
        relayed to them); its exit status is written to STATUS ("N\\n") when it
        ends. SIGNALS: the read end of the caller's pipe, a byte per signal to
        forward to the command (its Ctrl-C); EOF hangs the command up. Returns
        once it runs: the call is not held open, and the process outlives a
        restart of pymachined."""
        fds = (stdin, stdout, stderr, status, signals)
        try:
            request = exec_request(name, command, environment, user, working_directory, pty)
            for fd in fds[:3]:
                check_stdio(fd)
            await self.d.authorize(
                daemon.ACTION_SHELL, f"run a command in machine '{name}'", machine=name
            )
            await self.d.with_machines(lambda m: m.running_state(name))
            process = await asyncio.create_subprocess_exec(
                *enter.command(request, status, signals),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(status, signals),
                start_new_session=True,
                env=machines.runtime_environment(self.d.paths),
            )
        finally:
            for fd in fds:
                os.close(fd)
        self.d.spawn(process.wait())  # reaped by us while we live; by init if we die

    @method()
    @api
    async def CopyToMachine(self, name: "s", source: "h", source_name: "s", path: "s") -> "as":
        """copy-to of one regular file the caller opened for reading (so it is
        read with the caller's rights) to PATH in the running machine (an
        existing directory there: under SOURCE_NAME). Its warnings."""
        try:
            validate_machine_name(name)
            check_file(source, writing=False)
            await self.d.authorize(
                daemon.ACTION_SHELL, f"copy a file into machine '{name}'", machine=name
            )
            request = {"op": "copy-to", "name": name, "source_name": source_name, "path": path}
            return await self._copy(request, stdin=source)
        finally:
            os.close(source)

    @method()
    @api
    async def CopyFromMachine(self, name: "s", path: "s", destination: "h") -> "as":
        """copy-from of the regular file PATH in the running machine into
        DESTINATION, a file the caller opened for writing. Its warnings."""
        try:
            validate_machine_name(name)
            check_file(destination, writing=True)
            await self.d.authorize(
                daemon.ACTION_SHELL, f"copy a file out of machine '{name}'", machine=name
            )
            return await self._copy(
                {"op": "copy-from", "name": name, "path": path}, stdout=destination
            )
        finally:
            os.close(destination)

    async def _copy(self, request: dict[str, Any], **stdio: int) -> list[str]:
        """The copy in a helper process (it forks into the machine: never from
        this threaded one); its error as the CLI's."""
        process = await asyncio.create_subprocess_exec(
            *enter.copy_command(request),
            stdin=stdio.get("stdin", asyncio.subprocess.DEVNULL),
            stdout=stdio.get("stdout", asyncio.subprocess.DEVNULL),
            stderr=asyncio.subprocess.PIPE,
            env=machines.runtime_environment(self.d.paths),
        )
        _out, err = await process.communicate()
        lines = err.decode(errors="replace").splitlines()
        if process.returncode:
            from machined.errors import ExitCode

            code = ExitCode(process.returncode) if process.returncode in iter(ExitCode) else 1
            message = next((x for x in reversed(lines) if x.startswith("pymachine: ")), "")
            raise DBusError(
                daemon.ERROR_NAMES.get(code, daemon.ERROR_NAMES[ExitCode.FAILURE]),
                message.removeprefix("pymachine: ") or "the copy failed",
            )
        return [x.removeprefix("warning: ") for x in lines if x.startswith("warning: ")]

    @method()
    @api
    async def GarbageCollect(self) -> "as":
        await self.d.authorize(daemon.ACTION_MANAGE_MACHINES, "clean up after machines")
        return await self.d.with_machines(lambda m: m.gc())

    @method()
    @api
    async def SetUpNetwork(self, name: "s", pid: "u") -> "(sisssssas)":
        """The host side of bridged machine NAME's start (its runtime asks once
        PID, the machine's PID 1 or its parent in the machine's namespaces, has
        them): bridge, lease, veth pair, addresses and routes on both ends, nft
        rules, /etc files, dnsmasq, [::1] proxies. Root only (the runtime is
        root; no polkit action: nobody else starts a machine's runtime), and
        PID must be in machine NAME's unit, in a network namespace of its own.
        Answers (host ifname, host ifindex, address/prefix, gateway,
        address6/prefix or "", gateway6 or "", bridge, ports)."""
        validate_machine_name(name)
        if await polkit.caller_uid(self.d.bus, CURRENT_MESSAGE.get().sender) != 0:
            raise AccessDenied("access denied: only a machine's runtime (root) sets up its network")
        s = await self.d.networking(network.set_up, self.d.paths, name, int(pid))
        return [
            s.host_ifname,
            s.host_ifindex,
            s.address,
            s.gateway,
            s.address6 or "",
            s.gateway6 or "",
            s.bridge,
            list(s.ports),
        ]

    # --- images ------------------------------------------------------------------
    @method()
    @api
    async def ListImages(self) -> "a(stdas)":
        """(name, size in bytes, created (seconds), machines using it)."""
        from machined.images import ImageStore

        infos = await self.d.blocking(lambda: ImageStore(self.d.paths).list())
        return [[i.name, int(i.size or 0), float(i.created), list(i.used_by)] for i in infos]

    @method()
    @api
    async def GetImage(self, name: "s") -> "o":
        from machined.images import ImageStore

        validate_image_name(name)
        info = await self.d.blocking(lambda: ImageStore(self.d.paths).info(name))
        found = self.d.images.get(name)
        if found is None:
            found = self.d.images[name] = ImageObject(name)
            self.d.bus.export(found.path, found)
        found.info = info
        return found.path

    @method()
    @api
    async def RemoveImage(self, name: "s") -> None:
        from machined.images import ImageStore

        validate_image_name(name)
        await self.d.authorize(daemon.ACTION_MANAGE_IMAGES, f"remove image '{name}'", image=name)
        await self.d.blocking(lambda: ImageStore(self.d.paths).remove(name))
        found = self.d.images.pop(name, None)
        if found is not None:
            self.d.bus.unexport(found.path, found)

    @method()
    @api
    async def BootstrapImage(
        self,
        image: "s",
        distribution: "s",
        release: "s",
        variant: "s",
        include: "as",
        no_cache: "b",
    ) -> "uo":
        """Build IMAGE as ``pymachine bootstrap`` does, as a job: (id, job).
        No mirror or architecture from a caller (a mirror is a URL root fetches,
        file: ones too); the daemon's configuration decides them."""
        validate_image_name(image)
        if distribution not in ("debian", "ubuntu", "arch", "fedora", "busybox"):
            raise InvalidInput(f"unknown distribution {distribution!r}")
        if variant not in ("", "minbase", "standard"):
            raise InvalidInput(f"unknown variant {variant!r}")
        for text in (release, *include):
            if not _PACKAGE_TEXT.fullmatch(text or "x"):
                raise InvalidInput(f"invalid release or package name {text!r}")
        await self.d.authorize(
            daemon.ACTION_MANAGE_IMAGES, f"bootstrap image '{image}'", image=image
        )
        argv = ["bootstrap", f"--distro={distribution}"]
        argv += [f"--release={release}"] if release else []
        argv += [f"--variant={variant}"] if variant else []
        argv += [f"--include={','.join(include)}"] if include else []
        argv += ["--no-cache"] if no_cache else []
        return await self.d.start_job("bootstrap", image, [*argv, image])

    @method()
    @api
    async def PullImage(
        self, reference: "s", name: "s", platform: "s", force: "b", tls_verify: "b"
    ) -> "uo":
        """Pull REFERENCE into image NAME ("": the repository's last component)
        as ``pymachine pull`` does, as a job: (id, job). Root's pull logs in
        with the daemon's registry credentials (skopeo's usual auth files);
        anyone else's is anonymous: a polkit "yes" to manage images is not a
        share of root's registry logins."""
        from bootstrap.oci import parse_platform
        from bootstrap.reference import candidates

        if reference.startswith("-"):
            raise InvalidInput(f"invalid reference {reference!r}")
        candidates(reference)  # InvalidInput for what is not a reference
        if name:
            validate_image_name(name)
        parse_platform(platform or None)
        image = name or reference
        await self.d.authorize(daemon.ACTION_MANAGE_IMAGES, f"pull image '{image}'", image=image)
        argv = ["pull", reference, *(["--name", name] if name else [])]
        argv += ["--platform", platform] if platform else []
        argv += ["--force"] if force else []
        argv += [] if tls_verify else ["--tls-verify=false"]
        if await polkit.caller_uid(self.d.bus, CURRENT_MESSAGE.get().sender) != 0:
            argv += ["--authfile", self.d.anonymous_authfile()]
        return await self.d.start_job("pull", image, argv)

    @method()
    @api
    async def ImportTar(self, fd: "h", image: "s", allow_devices: "b") -> "uo":
        """Unpack the tar archive read from FD into IMAGE as ``pymachine
        import-tar`` does, as a job: (id, job). Device nodes need the
        privileged action."""
        try:
            validate_image_name(image)
            check_stdio(fd)
            await self.d.authorize(
                daemon.ACTION_MANAGE_IMAGES, f"import image '{image}'", image=image
            )
            if allow_devices:
                await self.d.authorize(
                    daemon.ACTION_CREATE_PRIVILEGED,
                    f"import image '{image}' with device nodes",
                    image=image,
                )
            argv = ["import-tar", "-", image, *(["--allow-devices"] if allow_devices else [])]
            return await self.d.start_job("import-tar", image, argv, stdin=fd)
        finally:
            os.close(fd)

    @method()
    @api
    async def ListJobs(self) -> "a(ussdo)":
        """(id, type, image, progress, job) of the jobs running."""
        return [[j.id, j.kind, j.image, j.progress, j.path] for j in self.d.jobs.values()]

    # --- signals -------------------------------------------------------------------
    @signal()
    def JobNew(self, job_id: "u", path: "o") -> "uo":
        return [job_id, path]

    @signal()
    def JobRemoved(
        self, job_id: "u", path: "o", result: "s", exit_code: "i", message: "s"
    ) -> "uosis":
        """RESULT "done" or "failed"; EXIT_CODE: the CLI's (README), MESSAGE its error."""
        return [job_id, path, result, exit_code, message]

    @signal()
    def MachineNew(self, name: "s", path: "o") -> "so":
        return [name, path]

    @signal()
    def MachineRemoved(self, name: "s", path: "o") -> "so":
        return [name, path]


class MachineObject(ServiceInterface):
    """``org.pymachine.machine1.Machine``: one machine, its properties read from
    the files and systemd when asked (a snapshot serves one GetAll)."""

    SNAPSHOT_SECONDS = 0.5

    def __init__(self, d: Daemon, name: str) -> None:
        super().__init__(daemon.MACHINE_INTERFACE)
        self.d = d
        self.machine = name  # (self.name is the interface's, dbus-next's)
        self.path = daemon.object_path(daemon.MACHINE_PATH_PREFIX, name)
        self._props: dict[str, Any] | None = None
        self._at = 0.0

    def remember(self, props: dict[str, Any]) -> None:
        self._props, self._at = props, asyncio.get_running_loop().time()

    def invalidate(self) -> None:
        self._props = None
        self.emit_properties_changed(
            {},
            [
                "State",
                "Leader",
                "Addresses",
                "MemoryCurrent",
                "TasksCurrent",
                "Since",
                "Result",
                "ExitStatus",
            ],
        )

    def _get(self, key: str) -> Any:
        """A property, from a fresh snapshot (read in the loop: a few ms of pystemd)."""
        now = asyncio.get_running_loop().time()
        if self._props is None or now - self._at > self.SNAPSHOT_SECONDS:
            with machines.Machines(self.d.paths) as m:
                self.remember(_status(m, self.machine, require_definition=False))
        return self._props[key]

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.machine

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._get("State")

    @dbus_property(access=PropertyAccess.READ)
    def Image(self) -> "s":
        return self._get("Image")

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> "s":
        return self._get("Unit")

    @dbus_property(access=PropertyAccess.READ)
    def Leader(self) -> "u":
        return self._get("Leader")

    @dbus_property(access=PropertyAccess.READ)
    def Addresses(self) -> "as":
        return self._get("Addresses")

    @dbus_property(access=PropertyAccess.READ)
    def Limits(self) -> "a{ss}":
        return self._get("Limits")

    @dbus_property(access=PropertyAccess.READ)
    def MemoryCurrent(self) -> "t":
        return self._get("MemoryCurrent")

    @dbus_property(access=PropertyAccess.READ)
    def TasksCurrent(self) -> "t":
        return self._get("TasksCurrent")

    @dbus_property(access=PropertyAccess.READ)
    def Since(self) -> "t":
        return self._get("Since")

    @dbus_property(access=PropertyAccess.READ)
    def Result(self) -> "s":
        return self._get("Result")

    @dbus_property(access=PropertyAccess.READ)
    def ExitStatus(self) -> "i":
        return self._get("ExitStatus")

    @dbus_property(access=PropertyAccess.READ)
    def Enabled(self) -> "b":
        return self._get("Enabled")

    @dbus_property(access=PropertyAccess.READ)
    def Boot(self) -> "b":
        return self._get("Boot")

    @dbus_property(access=PropertyAccess.READ)
    def NetworkMode(self) -> "s":
        return self._get("NetworkMode")

    @dbus_property(access=PropertyAccess.READ)
    def Command(self) -> "as":
        return self._get("Command")

    @dbus_property(access=PropertyAccess.READ)
    def Security(self) -> "a{ss}":
        return self._get("Security")

    @dbus_property(access=PropertyAccess.READ)
    def Problem(self) -> "s":
        return self._get("Problem")

    @dbus_property(access=PropertyAccess.READ)
    def Health(self) -> "a{ss}":
        return self._get("Health")

    @method()
    @api
    async def Start(self) -> None:
        _raise_first(
            await self.d.manager._batch([self.machine], "start", lambda m, ok: m.start_many(ok))
        )

    @method()
    @api
    async def Stop(self) -> None:
        _raise_first(
            await self.d.manager._batch([self.machine], "stop", lambda m, ok: m.stop_many(ok))
        )


class ImageObject(ServiceInterface):
    """``org.pymachine.machine1.Image``: one image as ``GetImage`` last read it."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon.IMAGE_INTERFACE)
        self.image = name
        self.path = daemon.object_path(daemon.IMAGE_PATH_PREFIX, name)
        self.info: Any = None

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.image

    @dbus_property(access=PropertyAccess.READ)
    def Path(self) -> "s":
        return str(self.info.path)

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":
        return int(self.info.size or 0)

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "d":
        return float(self.info.created)

    @dbus_property(access=PropertyAccess.READ)
    def UsedBy(self) -> "as":
        return list(self.info.used_by)

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> "s":
        return self.info.source or ""


# --- helpers (plain functions: the worker threads run them) ---------------------

#: Each property's D-Bus signature, for a{sv} answers.
SIGNATURES = {
    "Name": "s", "State": "s", "Image": "s", "Unit": "s", "Leader": "u", "Addresses": "as",
    "Limits": "a{ss}", "MemoryCurrent": "t", "TasksCurrent": "t", "Since": "t", "Result": "s",
    "ExitStatus": "i", "Enabled": "b", "Boot": "b", "NetworkMode": "s", "Command": "as",
    "Security": "a{ss}", "Problem": "s", "Health": "a{ss}",
}  # fmt: skip


def result_fields(result: Any) -> dict[str, Variant]:
    """A library result (a dataclass of str, bool, path, list of str or of
    pairs) as ``a{sv}``; None fields are left out."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            out[f.name] = Variant("b", value)
        elif isinstance(value, list) and value and isinstance(value[0], tuple):
            out[f.name] = Variant("a(ss)", [[str(a), str(b)] for a, b in value])
        elif isinstance(value, list):
            out[f.name] = Variant("as", [str(v) for v in value])
        else:
            out[f.name] = Variant("s", str(value))
    return out


def variants(props: dict[str, Any]) -> dict[str, Variant]:
    return {key: Variant(SIGNATURES[key], value) for key, value in props.items()}


def _status(m: machines.Machines, name: str, *, require_definition: bool = True) -> dict[str, Any]:
    return machines.status_properties(m.info(name, require_definition=require_definition), m.paths)


def _list_rows(m: machines.Machines) -> list[dict[str, Any]]:
    return [machines.status_properties(info, m.paths) for info in m.list()]


def _has_units(m: machines.Machines, name: str) -> bool:
    return bool(m._unit_states(name))


def _tried(action: Callable[..., Any], *args: Any) -> PymachineError | None:
    try:
        action(*args)
    except PymachineError as exc:
        return exc
    return None


def _raise_first(pairs: list[list[str]]) -> None:
    for error, message in pairs:
        if error:
            raise DBusError(error, message)


def privileged_features(definition: Any) -> list[str]:
    """What in DEFINITION reaches beyond a machine's own sandbox, so that only
    the privileged create action may ask for it (docs/architecture.md, "The
    daemon as the trust boundary"): host paths, host root, host network, host
    ports below 1024, another bridge, capabilities or system calls beyond the
    defaults, no no_new_privileges in an app machine."""
    from machined.network.config import NetworkConfig, NetworkMode

    found = []
    if definition.binds:
        found.append("Bind= (host paths)")
    if definition.devices:
        found.append("Device= (host devices)")
    for encrypted in (False, True):  # systemd reads them as root at start
        if any(c.encrypted == encrypted for c in definition.load_credentials):
            found.append(f"LoadCredential{'Encrypted' if encrypted else ''}= (host paths)")
    if definition.private_users != "pick":
        found.append(f"PrivateUsers={definition.private_users}")
    if definition.capability:
        found.append("Capability=")
    if any(not rule.startswith("~") for rule in definition.system_call_filter):
        found.append("SystemCallFilter= (an allow list)")
    if definition.no_new_privileges is False and not definition.boot:
        found.append("NoNewPrivileges=no")
    if definition.network.mode == NetworkMode.HOST:
        found.append("the host's network")
    if definition.network.bridge != NetworkConfig().bridge:
        found.append(f"Bridge={definition.network.bridge}")
    if any(port.host_port < 1024 for port in definition.network.ports):
        found.append("host ports below 1024")
    return found


def exec_request(
    name: str,
    command: list[str],
    environment: list[str],
    user: str,
    working_directory: str,
    pty: bool,
) -> dict[str, Any]:
    """An exec's arguments checked as the CLI checks them; the request the
    helper (:mod:`machined.daemon.enter`) runs."""
    from machined.definition import parse_env

    validate_machine_name(name)
    variables = dict(parse_env(text) for text in environment)
    for text in [*command, user, working_directory, *environment]:
        if "\0" in text:
            raise InvalidInput("a command, user or directory must not contain NUL")
    if working_directory and not working_directory.startswith("/"):
        raise InvalidInput(f"invalid working directory {working_directory!r}: must be absolute")
    if not command and not pty:
        raise InvalidInput("exec needs a command: pymachine exec NAME -- CMD [ARGS…]")
    return {
        "name": name,
        "command": list(command),
        "environment": variables,
        "user": user or None,
        "working_directory": working_directory or None,
        "pty": bool(pty),
    }


_O_PATH = 0o10000000
#: A release or package name: what apt, dnf and pacman take, nothing an option parser reads.
_PACKAGE_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._:~=-]*")


def check_file(fd: int, *, writing: bool) -> None:
    """A copy's end: a regular file (or pipe) the caller opened for reading
    (WRITING: for writing), never an O_PATH descriptor (reopened by root, it
    would read what the caller may not)."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = os.fstat(fd).st_mode
    access = flags & os.O_ACCMODE
    readable, writable = access in (os.O_RDONLY, os.O_RDWR), access in (os.O_WRONLY, os.O_RDWR)
    if flags & _O_PATH or not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise InvalidInput("a copy takes one regular file")
    if not (writable if writing else readable):
        raise InvalidInput(f"the file is not open for {'writing' if writing else 'reading'}")


def check_stdio(fd: int) -> None:
    """Only stdio crosses into a machine: a terminal, pipe, socket, character
    device or regular file. A directory (or an O_PATH descriptor) would let root
    inside open host files relative to it."""
    import fcntl

    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & _O_PATH:
        raise InvalidInput("only a terminal, pipe, socket or file may be a machine's stdio")


SYSTEMD = "org.freedesktop.systemd1"
_UNIT_PATH = "/org/freedesktop/systemd1/unit/"
_MACHINE_UNIT_PATH = _UNIT_PATH + "pymachine_2d"  # pymachine-…


def _unit_name(path: str) -> str:
    """The unit a systemd object path names (``pymachine_2dweb_2eservice``)."""
    return re.sub(
        r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), path.removeprefix(_UNIT_PATH)
    )


async def _logged(work: Awaitable[Any], what: str) -> None:
    """WORK, its failure logged (a task nobody awaits)."""
    try:
        await work
    except Exception as exc:
        log.warning("pymachined: network clean-up after %s failed: %s", what, exc)


async def follow_systemd(d: Daemon) -> None:
    """PropertiesChanged of a machine's object when its unit changes state,
    whoever changed it (systemctl, a machine powering itself off, another
    client): systemd's own signals, as machined follows its scopes."""
    rule = (
        f"type='signal',sender='{SYSTEMD}',interface='org.freedesktop.DBus.Properties',"
        f"member='PropertiesChanged',path_namespace='{_UNIT_PATH.rstrip('/')}'"
    )
    for message in (
        to_bus("AddMatch", "s", [rule]),
        Message(  # systemd sends its units' signals only while someone subscribed
            destination=SYSTEMD,
            path="/org/freedesktop/systemd1",
            interface="org.freedesktop.systemd1.Manager",
            member="Subscribe",
        ),
    ):
        await d.bus.call(message)

    def on_message(msg: Message) -> None:
        if (
            msg.member == "PropertiesChanged"
            and msg.path
            and msg.path.startswith(_MACHINE_UNIT_PATH)
            and msg.body
            and msg.body[0] == "org.freedesktop.systemd1.Unit"
            and "ActiveState" in msg.body[1]
        ):
            unit = _unit_name(msg.path)
            name = unit.removeprefix("pymachine-").rsplit(".", 1)[0]
            d.changed([name])
            state = msg.body[1]["ActiveState"]
            if getattr(state, "value", state) in ("inactive", "failed"):
                d.spawn(_logged(d.networking(network.unit_stopped, d.paths, name), unit))

    d.bus.add_message_handler(on_message)


async def serve(paths: Paths | None = None) -> None:
    """Own the bus name and answer until the bus goes away."""
    # a worker thread per call in flight: a stop holds one for StopTimeoutSec=,
    # and a list must not queue behind a few of them (asyncio's default is 6)
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=64, thread_name_prefix="pymachined")
    )
    bus = await Bus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
    d = Daemon(bus, paths or Paths.from_env())
    bus.export(daemon.MANAGER_PATH, d.manager)
    await follow_systemd(d)
    reply = await bus.request_name(daemon.BUS_NAME)
    log.info("pymachined: %s on the system bus (%s)", daemon.BUS_NAME, reply)
    # after follow_systemd: a machine that stops meanwhile is cleaned by either
    d.spawn(_logged(d.networking(network.reconcile, d.paths), "the reconciliation at start"))
    await bus.wait_for_disconnect()
