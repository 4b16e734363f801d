"""The unit's main process: builds the container from kernel parts and waits.

Order matters (ARCHITECTURE.md, "the path of start"):

1. private mount namespace, overlay root (image = lower, machine = upper);
2. split the delegated cgroup, fork the container's PID 1 into a new PID
   namespace *before* importing anything heavy;
3. the child unshares mount/UTS/IPC/net/cgroup namespaces and waits;
4. the parent sets up the network for the child's netns, registers with
   machined, writes the state file;
5. the child mounts /proc, /sys, /dev…, pivots and becomes PID 1 (pymachine's
   init, or the image's own init in boot mode); the parent sends READY=1;
6. on SIGTERM the parent asks PID 1 to stop, then tears down what it set up
   and exits with the container's status.

Everything mounted lives in namespaces that die with the processes, so a
SIGKILL leaves no mount behind; the network and machined registration are
removed here on exit, or by the next start from the persisted state.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import time

from machined.definition import MachineDefinition
from machined.network.config import NetworkMode
from machined.paths import Paths
from machined.runtime import cgroup, init, linux, security, state, userns
from machined.runtime.mounts import Bind, RootfsSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_INITS = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")
HALT = signal.SIGRTMIN + 3  # what systemd as PID 1 takes as "halt"
REBOOT_EXIT_STATUS = 133  # systemd-nspawn's "the container asked for a reboot"


class StartError(Exception):
    pass


def _log(message: str) -> None:
    print(f"pymachine-runtime: {message}", file=sys.stderr, flush=True)


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


class Layers:
    """Where the overlay's parts are for one start of a machine."""

    def __init__(self, paths: Paths, definition: MachineDefinition) -> None:
        self.image = paths.image(definition.image)
        self.runtime_dir = paths.machine_runtime(definition.name)
        self.root = self.runtime_dir / "root"
        base = (
            self.runtime_dir / "ephemeral"
            if definition.ephemeral
            else paths.machine_state(definition.name)
        )
        self.upper = base / "upper"
        self.work = base / "work"
        self.ephemeral = definition.ephemeral

    def mount(self) -> None:
        if not self.image.is_dir():
            raise StartError(f"image directory {self.image} does not exist")
        for directory in (self.root, self.upper, self.work):
            directory.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.image},upperdir={self.upper},workdir={self.work}"
        linux.mount("overlay", str(self.root), "overlay", 0, options)

    def cleanup(self) -> None:
        if self.ephemeral:
            shutil.rmtree(self.runtime_dir / "ephemeral", ignore_errors=True)


def _payload_environment(
    definition: MachineDefinition, home: str, terminal: bool
) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": home,
        "container": "pymachine",
        "HOSTNAME": definition.name,
    }
    if terminal and os.environ.get("TERM"):
        env["TERM"] = os.environ["TERM"]
    env.update(definition.environment)
    return env


class Supervisor:
    def __init__(
        self,
        definition: MachineDefinition,
        paths: Paths,
        *,
        command: list[str] | None = None,
        foreground: bool = False,
    ) -> None:
        self.definition = definition
        self.paths = paths
        self.command = command or definition.command or ["/bin/sh"]
        self.foreground = foreground
        self.layers = Layers(paths, definition)
        self.child = 0
        self.network_state = None
        self.registered = False

    # --- the container side (forked processes) ------------------------------
    def _intermediate(self, go_read: int, report_write: int, flags: int) -> None:
        """Create the namespaces, fork the container's PID 1 into them, exit.

        With PrivateUsers the user namespace comes first, so every other
        namespace (PID, net, UTS, …) is owned by it and root inside holds its
        capabilities over them, as with systemd-nspawn -U. The PID 1 forked
        here is re-parented to the supervisor (a child subreaper)."""
        status = 1
        try:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.read(go_read, 1) != b"1":
                os._exit(1)
            if self.policy.uid_base is not None:
                linux.unshare(linux.CLONE_NEWUSER)
                os.write(report_write, b"U")
                if os.read(go_read, 1) != b"m":  # the supervisor wrote our UID/GID maps
                    os._exit(1)
                os.setgroups([])
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            linux.unshare(flags | linux.CLONE_NEWPID)
            leader = os.fork()
            if leader == 0:
                self._container(go_read, report_write)
            os.write(report_write, f"P{leader}\n".encode())
            status = 0
        except BaseException as exc:  # report, never fall back into the parent's code
            _log(f"cannot create the container's namespaces: {exc}")
        finally:
            sys.stderr.flush()
            os._exit(status)

    def _container(self, go_read: int, report_write: int) -> None:
        """The container's PID 1: mounts, pivot_root, then init. Never returns."""
        status = 1
        try:
            line = _read_line(go_read)
            # The intermediate has exited: our parent is the supervisor now. Die
            # with it (as nspawn's inner child does), so a SIGKILLed runtime never
            # leaves a container running headless, e.g. in a `pymachine run` scope.
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
            if not line or _writer_gone(go_read):
                raise StartError("the supervisor is gone")
            message = json.loads(line)
            spec = RootfsSpec(
                root=str(self.layers.root),
                hostname=self.definition.name,
                read_only=self.definition.read_only,
                writable_cgroup=self.definition.boot,
                binds=tuple(Bind(**b) for b in message.get("binds", [])),
                console=os.ttyname(0) if self.foreground and os.isatty(0) else None,
                cgroup_dir=message.get("cgroup_dir"),
            )
            # Import now: after pivot_root the host's Python library is out of reach.
            from machined.runtime import users  # noqa: F401
            from machined.runtime.mounts import setup_rootfs

            setup_rootfs(spec)
            security.apply(self.policy)
            os.write(report_write, b"r")
            os.close(report_write)
            os.close(go_read)
            if self.definition.boot:
                self._exec_boot()
            status = self._run_init()
        except BaseException as exc:  # report, never fall back into the parent's code
            _log(f"container set-up failed: {exc}")
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _exec_boot(self) -> None:
        env = {"PATH": DEFAULT_PATH, "container": "pymachine", "TERM": "vt220"}
        env.update(self.definition.environment)
        for path in BOOT_INITS:
            if os.access(path, os.X_OK):
                os.execve(path, [path], env)
        raise StartError(f"boot mode: none of {', '.join(BOOT_INITS)} exists in the image")

    def _run_init(self) -> int:
        from machined.runtime import users

        user = users.resolve(self.definition.user)
        terminal = self.foreground and os.isatty(0)
        payload = init.Payload(
            argv=self.command,
            environment=_payload_environment(self.definition, user.home, terminal),
            working_directory=self.definition.working_directory or "/",
            uid=user.uid,
            gid=user.gid,
            groups=list(user.groups),
            terminal=terminal,
        )
        linux.set_process_name("pymachine-init")
        return init.run(payload, stop_timeout=self.definition.stop_timeout)

    # --- the host side ------------------------------------------------------
    def _namespace_flags(self) -> int:
        flags = linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWCGROUP
        if self.definition.network.mode != NetworkMode.HOST:
            flags |= linux.CLONE_NEWNET
        return flags

    def _binds(self) -> list[dict]:
        """The definition's binds; with PrivateUsers each source gets an idmapped
        mount first, so host root's files are root's inside (nspawn's ``:idmap``)."""
        binds = []
        for bind in self.definition.binds:
            if not os.path.exists(bind.source):
                raise StartError(f"bind source {bind.source} does not exist")
            binds.append(
                {"source": bind.source, "target": bind.target, "read_only": bind.read_only}
            )
        if binds and self.policy.uid_base is not None:
            self._idmap_binds(binds)
        return binds

    def _idmap_binds(self, binds: list[dict]) -> None:
        staging = self.layers.runtime_dir / "binds"
        with userns.mapped_userns(self.policy.uid_base, self.policy.uid_count) as fd:
            for index, bind in enumerate(binds):
                staged = staging / str(index)
                staging.mkdir(parents=True, exist_ok=True)
                if os.path.isdir(bind["source"]):
                    staged.mkdir(exist_ok=True)
                else:
                    staged.touch()
                try:
                    userns.idmapped_mount(bind["source"], staged, fd)
                except OSError as exc:
                    _log(
                        f"bind {bind['source']}: no idmapped mount ({exc}); its files show as nobody inside"
                    )
                    # Still staged by us, host root: inside the user namespace the
                    # source's own path may not be reachable (e.g. under /root, 0700).
                    linux.mount(bind["source"], str(staged), None, linux.MS_BIND | linux.MS_REC)
                bind["source"] = str(staged)

    def _setup_network(self) -> list[dict]:
        """Configure the child's netns from here; returns extra binds (/etc files)."""
        etc_dir = self.layers.runtime_dir / "etc"
        etc_dir.mkdir(parents=True, exist_ok=True)
        # The machine's name, not the image's: many machines share one image.
        (etc_dir / "hostname").write_text(f"{self.definition.name}\n")
        names = ["hostname"]
        if self.definition.network.mode != NetworkMode.HOST:
            from machined import network

            self.network_state = network.setup(
                self.definition.name, self.definition.network, self.child, self.paths
            )
            network.render_etc_files(self.definition.name, self.network_state, self.paths, etc_dir)
            names += ["hosts", "resolv.conf"]
        return [
            {"source": str(etc_dir / name), "target": f"/etc/{name}", "read_only": False}
            for name in names
            if (etc_dir / name).exists()
        ]

    def _register(self) -> None:
        from machined import registry
        from machined.dbus import Bus

        ifindices = [self.network_state.host_ifindex] if self.network_state else []
        with Bus() as bus:
            registry.unregister(bus, self.definition.name)  # a stale one from a killed run
            registry.register(
                bus, self.definition.name, self.child, str(self.layers.root), ifindices
            )
        self.registered = True

    def _start_loopback_proxies(self) -> None:
        """``Port=`` on the host's [::1] (nftables cannot): see machined.proxies."""
        if self.network_state is None or not self.definition.network.ports:
            return
        from machined import network, proxies
        from machined.systemd import Systemd

        wanted = network.loopback_proxies(self.network_state)
        own_unit = next(
            (
                part
                for part in cgroup.own_cgroup().split("/")
                if part.endswith((".service", ".scope"))
            ),
            None,
        )
        if not wanted or own_unit is None:
            return
        try:
            with Systemd() as systemd:
                proxies.start(systemd, self.definition.name, own_unit, wanted)
        except Exception as exc:  # the IPv4 and other IPv6 forwards still work
            _log(f"port forwards on [::1] are not available: {exc}")

    def _teardown(self) -> None:
        name = self.definition.name
        if self.registered:
            try:
                from machined import registry
                from machined.dbus import Bus

                with Bus() as bus:
                    registry.unregister(bus, name)
            except Exception as exc:  # the bus may be gone at shutdown
                _log(f"could not unregister from machined: {exc}")
        if self.definition.network.mode == NetworkMode.BRIDGE:  # none/host: no veth, no rules
            try:
                from machined import network

                network.teardown(name, self.paths)
            except Exception as exc:
                _log(f"network teardown failed: {exc}")
        with contextlib.suppress(FileNotFoundError):
            (self.layers.runtime_dir / state.STATE_FILE).unlink()
        self.layers.cleanup()

    def _forward(self, sig: int) -> None:
        if self.child:
            target = HALT if (sig == signal.SIGTERM and self.definition.boot) else sig
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, target)

    def run(self) -> int:
        forwarded = {
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGWINCH,
            signal.SIGRTMIN + 3,
            signal.SIGRTMIN + 4,
            signal.SIGRTMIN + 5,
            signal.SIGRTMIN + 6,
        }
        watched = forwarded | {signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        self.layers.runtime_dir.mkdir(parents=True, exist_ok=True)
        try:
            ids = userns.prepare(self.paths, self.definition, self.layers)
            self.policy = security.policy_for(self.definition, **ids)
            security.write_state(self.layers.runtime_dir, self.policy)
            self.layers.mount()
            _crash_point("after-overlay")
            binds = self._binds()
            _supervisor_cg, payload_cg = cgroup.split_for_payload()
            if self.definition.boot:
                userns.chown_cgroup(payload_cg, self.policy.uid_base)
            go_read, go_write = os.pipe()
            report_read, report_write = os.pipe()
            flags = self._namespace_flags()
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # PID 1 comes back to us
            gc.freeze()  # keep the collector off the pages PID 1 shares with us
            intermediate = os.fork()
            if intermediate == 0:
                os.close(go_write)
                os.close(report_read)
                self._intermediate(go_read, report_write, flags)
            os.close(go_read)
            os.close(report_write)
            _protect_from_oom_killer()  # after the fork: the container keeps the default
            cgroup.move(intermediate, payload_cg)
            os.write(go_write, b"1")
            if self.policy.uid_base is not None:
                if os.read(report_read, 1) != b"U":
                    raise StartError("the container exited while creating its user namespace")
                userns.write_maps(intermediate, self.policy.uid_base, self.policy.uid_count)
                os.write(go_write, b"m")
            line = _read_line(report_read)
            _pid, intermediate_status = os.waitpid(intermediate, 0)
            if not line.startswith(b"P") or intermediate_status != 0:
                raise StartError("the container exited while creating its namespaces")
            self.child = int(line[1:])
            binds += self._setup_network()
            _crash_point("after-network")
            message = {"binds": binds, "cgroup_dir": str(payload_cg)}
            os.write(go_write, json.dumps(message).encode() + b"\n")
            if os.read(report_read, 1) != b"r":
                raise StartError("the container failed to set up its file systems (see above)")
            self._register()
            _crash_point("after-registration")
            self._start_loopback_proxies()
            state.write(
                self.paths,
                state.RuntimeState(
                    name=self.definition.name,
                    leader=self.child,
                    supervisor=os.getpid(),
                    payload_cgroup=str(payload_cg),
                    root=str(self.layers.root),
                    boot=self.definition.boot,
                    started=time.time(),
                    network_mode=str(self.definition.network.mode),
                    address=_without_prefix(getattr(self.network_state, "address", None)),
                    host_ifname=getattr(self.network_state, "host_ifname", None),
                ),
            )
            from machined.runtime.notify import notify

            notify(f"READY=1\nSTATUS=Container running.\nX_PYMACHINE_LEADER={self.child}")
            linux.set_process_name("pymachine-rt")
            return self._wait(watched)
        except (StartError, OSError) as exc:
            _log(f"cannot start machine {self.definition.name}: {exc}")
            if self.child:
                try:
                    os.kill(self.child, signal.SIGKILL)
                    os.waitpid(self.child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            return 1
        finally:
            self._teardown()

    def _wait(self, watched: set[int]) -> int:
        while True:
            info = signal.sigwaitinfo(watched)
            if info.si_signo != signal.SIGCHLD:
                self._forward(info.si_signo)
                continue
            try:
                pid, status = os.waitpid(self.child, os.WNOHANG)
            except ChildProcessError:
                return 1
            if pid == self.child:
                return self._exit_status(status)

    def _exit_status(self, wait_status: int) -> int:
        """The container's status, passed on as the unit's. In a container,
        systemd-shutdown ends by killing itself with SIGINT (halt/power-off) or
        SIGHUP (reboot), as systemd-nspawn expects: 0, or 133 = "restart me"
        (the unit has RestartForceExitStatus=133, like systemd-nspawn@.service)."""
        if self.definition.boot and os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            if sig == signal.SIGINT:
                return 0
            if sig == signal.SIGHUP:
                return REBOOT_EXIT_STATUS
        return init.exit_status(wait_status)


CRASH_ENV = "PYMACHINE_TEST_CRASH_AT"  # fault-injection for tests: a step name below


def _crash_point(step: str) -> None:
    """Die like a SIGKILLed runtime at STEP when the tests ask for it, so they can
    check that nothing is left behind (after-overlay, after-network, after-registration)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _writer_gone(fd: int) -> bool:
    """Whether every writer of the pipe FD has exited (the supervisor keeps one open)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _fd, events in poller.poll(0))


def _protect_from_oom_killer() -> None:
    """The runtime shares the unit's MemoryMax= with the container; when the
    container runs out, the kernel must kill the container's hog, not us (the
    unit's result is then 'oom-kill', as a user expects)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("-1000")


def _without_prefix(address: str | None) -> str | None:
    return address.split("/", 1)[0] if address else None


def cleanup(name: str, paths: Paths) -> None:
    """What :meth:`Supervisor._teardown` does, from the persisted state only: the
    unit's ``ExecStopPost=``, so a runtime SIGKILLed at any step leaves no veth,
    nft rule or state file behind even if the machine is never started again.
    After a clean stop there is nothing left and nothing heavy is imported."""
    from machined.names import validate_machine_name
    from machined.network import state as network_state

    validate_machine_name(name)
    if network_state.read(paths, name) is not None:
        try:
            from machined import network

            network.teardown(name, paths)
        except Exception as exc:
            _log(f"network clean-up of {name} failed: {exc}")
    runtime_dir = paths.machine_runtime(name)
    with contextlib.suppress(FileNotFoundError):
        (runtime_dir / state.STATE_FILE).unlink()
    shutil.rmtree(runtime_dir / "ephemeral", ignore_errors=True)


def main(argv: list[str]) -> int:
    """``python -m machined.runtime NAME [--foreground] [-- CMD…]``, or
    ``python -m machined.runtime NAME --cleanup`` (the unit's ExecStopPost)."""
    from machined import definition as definitions

    command: list[str] | None = None
    if "--" in argv:
        index = argv.index("--")
        argv, command = argv[:index], argv[index + 1 :] or None
    if not argv:
        _log("usage: python -m machined.runtime NAME [--foreground] [--ephemeral] [-- CMD…]")
        return 2
    paths = Paths.from_env()
    if "--cleanup" in argv[1:]:
        cleanup(argv[0], paths)
        return 0
    definition = definitions.load(argv[0], paths)
    if "--ephemeral" in argv[1:]:
        definition.ephemeral = True
    return Supervisor(
        definition, paths, command=command, foreground="--foreground" in argv[1:]
    ).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
