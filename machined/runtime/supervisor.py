"""The unit's main process until the machine is up: builds the container from
kernel parts.

Order matters (docs/architecture.md, "the path of start"):

1. private mount namespace; the intermediate (forked first thing,
   :mod:`machined.runtime.leader`) joins it and creates the user namespace
   first (we write its maps, and give the image and binds their idmapped
   mounts through it); overlay root (image = lower, machine = upper);
2. split the delegated cgroup; the intermediate creates the other namespaces
   (not the mount namespace) and forks the container's PID 1, which is
   re-parented to us (subreaper) and hands us the file systems of its
   namespaces (proc, sysfs, cgroup2, devpts);
3. we set up the network for PID 1's netns, mount the machine's file systems
   under its root (:func:`mounts.build_rootfs`: targets resolved inside the
   root) and send PID 1 a message (marshal);
4. PID 1 joins a copy of our mount namespace that the intermediate made as
   root of the user namespace (the kernel locks our mounts in it: read-only
   stays read-only), pivots, confines itself and execs
   ``pymachine-init`` (C) with the payload, or the image's init; the report
   pipe closes on that exec; we register with machined, write the state file;
5. service mode (``Type=forking``): we write PID 1's PID to the unit's
   ``PIDFile=`` and exit — systemd adopts PID 1, sees its exit status, signals
   it on stop, and ``ExecStopPost=`` (:mod:`machined.runtime.cleanup`) tears
   down; foreground mode (``run``, a scope): we stay, forward signals, tear
   down and pass the status on.

Everything mounted lives in namespaces that die with the processes, so a
SIGKILL leaves no mount behind; the network and the state file are removed by
ExecStopPost=, by us in foreground mode, or by the next start.
"""

from __future__ import annotations

import _signal as signal  # the numbers only: signal's enums cost ~0.8 ms (leader.py too)
import contextlib
import os
import stat
import sys
import time
from pathlib import Path

from machined.definition import MachineDefinition
from machined.errors import PymachineError
from machined.network.config import NetworkMode
from machined.paths import SEARCH_ONLY, Paths, private_dirs
from machined.runtime import cgroup, cleanup, init, leader, linux, mounts, security, state, userns

HALT = signal.SIGRTMIN + 3  # what systemd as PID 1 takes as "halt"
REBOOT_EXIT_STATUS = 133  # systemd-nspawn's "the container asked for a reboot"


class StartError(Exception):
    pass


def _log(message: str) -> None:
    print(f"pymachine-runtime: {message}", file=sys.stderr, flush=True)


class Layers:
    """Where the overlay's parts are for one start of a machine."""

    def __init__(self, paths: Paths, definition: MachineDefinition) -> None:
        self.image = paths.image(definition.image)
        self.runtime_dir = paths.machine_runtime(definition.name)
        self.root = self.runtime_dir / "root"
        base = (
            self.runtime_dir / cleanup.EPHEMERAL
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
            import shutil  # here: ~2 ms of imports (bz2, lzma, fnmatch) for ephemeral machines only

            shutil.rmtree(self.runtime_dir / cleanup.EPHEMERAL, ignore_errors=True)


class Supervisor:
    def __init__(
        self,
        definition: MachineDefinition,
        paths: Paths,
        *,
        command: list[str] | None = None,
        foreground: bool = False,
        intermediate: leader.Intermediate | None = None,
        cgroups: cgroup.PayloadSplit | None = None,
    ) -> None:
        self.definition = definition
        self.paths = paths
        self.command = command or definition.command or ["/bin/sh"]
        self.foreground = foreground
        self.layers = Layers(paths, definition)
        self.child = 0
        self.network_state: dict | None = None  # host_ifname, host_ifindex, address, …
        self.registered = False
        self.intermediate = intermediate  # started early by __main__, or by run()
        self.cgroups = cgroups  # the cgroup split, started with it by __main__, or by run()
        self._bus = None  # the system bus, from the network's set-up or _register on
        self.own_network = False  # set up by this process (no pymachined): torn down by it too
        self._network_call = None  # pymachined's SetUpNetwork, under way (_setup_network)
        self._userns_fd: int | None = None  # the container's user namespace (_container_userns)
        self.handed_over = False  # service mode: PID 1 is the unit's main process now
        self.notify = None  # Notify=: the payload's notify socket (runtime/notify.py)
        self.credentials_environment: dict[str, str] = {}  # runtime/credentials.py

    # --- the container side (forked processes) ------------------------------
    # --- the host side ------------------------------------------------------
    def _namespace_flags(self) -> int:
        # not the mount namespace: the intermediate makes PID 1's once we mounted its file systems
        flags = linux.CLONE_NEWUTS | linux.CLONE_NEWIPC | linux.CLONE_NEWCGROUP
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

    def _container_userns(self, base: int, count: int) -> int:
        """The container's user namespace (the intermediate made it), once we
        wrote its ID maps: an fd for the idmapped mounts of the image and binds."""
        if not self.intermediate.started():
            raise StartError("the container exited while creating its user namespace")
        userns.write_maps(self.intermediate.pid, base, count)
        self._userns_fd = os.open(
            f"/proc/{self.intermediate.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC
        )
        return self._userns_fd

    def _idmap_binds(self, binds: list[dict]) -> None:
        staging = self.layers.runtime_dir / "binds"
        for index, bind in enumerate(binds):
            staged = staging / str(index)
            staging.mkdir(parents=True, exist_ok=True)
            if os.path.isdir(bind["source"]):
                staged.mkdir(exist_ok=True)
            else:
                staged.touch()
            try:
                userns.idmapped_mount(bind["source"], staged, self._userns_fd)
            except OSError as exc:
                _log(
                    f"bind {bind['source']}: no idmapped mount ({exc}); its files show as nobody inside"
                )
                # Still staged by us, host root: inside the user namespace the
                # source's own path may not be reachable (e.g. under /root, 0700).
                linux.mount(bind["source"], str(staged), None, linux.MS_BIND | linux.MS_REC)
            bind["source"] = str(staged)

    def _setup_network(self) -> list[dict]:
        """The child's network; returns extra binds (/etc files). ``Mode=none``
        is ours (``lo`` up); a bridge is the host's: pymachined's when it is
        installed (:meth:`_network_from_daemon`), else this process's own."""
        etc_dir = self.layers.runtime_dir / "etc"
        etc_dir.mkdir(parents=True, exist_ok=True)
        # The machine's name, not the image's: many machines share one image.
        (etc_dir / "hostname").write_text(f"{self.definition.name}\n")
        names = ["hostname"]
        mode = self.definition.network.mode
        if mode == NetworkMode.NONE:
            from machined.network import etc
            from machined.runtime.loopback import loopback_up

            loopback_up(self.child)
            etc.write_etc_files(self.definition.name, None, self.paths, etc_dir)
            names += ["hosts", "resolv.conf"]
        elif mode == NetworkMode.BRIDGE:
            if cleanup.daemon_cleans(self.paths):
                from machined.runtime.threads import InThread

                # pymachined writes these in place: they exist for the binds,
                # which the root's mounts make while it answers (_await_network)
                for name in ("hosts", "resolv.conf"):
                    (etc_dir / name).touch()
                self._network_call = InThread(self._network_from_daemon)
            else:
                from machined import network

                own_unit = cgroup.unit_of(cgroup.own_cgroup())
                attached = network.attach(
                    self.definition.name, self.definition.network, self.child, self.paths, own_unit
                )
                self.network_state = attached.to_record()
                self.own_network = True
            names += ["hosts", "resolv.conf"]
        return [
            {"source": str(etc_dir / name), "target": f"/etc/{name}", "read_only": True}
            for name in names
            if (etc_dir / name).exists()
        ]

    def _await_network(self) -> None:
        """pymachined's answer to the call :meth:`_setup_network` started (its
        error, if it failed): before PID 1 is told to go on."""
        if self._network_call is not None:
            call, self._network_call = self._network_call, None
            self.network_state = call.result()

    def _network_from_daemon(self) -> dict:
        """pymachined's ``SetUpNetwork``: one call (it activates the daemon if it
        does not run); the connection is kept for the registration."""
        from machined import daemon
        from machined.dbus import Bus

        self._bus = Bus()
        reply = self._bus.call(
            daemon.BUS_NAME,
            daemon.MANAGER_PATH,
            daemon.MANAGER_INTERFACE,
            "SetUpNetwork",
            "su",
            [self.definition.name, self.child],
        )
        ifname, ifindex, address, gateway, address6, gateway6, bridge, ports = reply  # the struct
        return {
            "host_ifname": ifname,
            "host_ifindex": ifindex,
            "address": address,
            "gateway": gateway,
            "address6": address6 or None,
            "gateway6": gateway6 or None,
            "bridge": bridge,
            "ports": list(ports),
        }

    def _notifies(self) -> bool:
        """Notify=, or an app machine's HealthCmd= or WatchdogSec= (its init's),
        in service mode (``run`` is a scope, started at once; a booted guest's
        checks are runtime/guest.py's)."""
        definition = self.definition
        init_checks = definition.health.command is not None or definition.watchdog is not None
        wanted = definition.notify != "no" or (init_checks and not definition.boot)
        return wanted and not self.foreground

    def _notify_binds(self) -> list[dict]:
        if not self._notifies():
            return []
        from machined.runtime import notify

        self.notify = notify.prepare(
            str(self.layers.runtime_dir),
            health=self.definition.health.command is not None,
            watchdog=self.definition.watchdog,
        )
        return [self.notify.bind()]

    def _credential_binds(self) -> list[dict]:
        """The unit's credentials, for the machine (runtime/credentials.py)."""
        if not (self.definition.load_credentials or self.definition.set_credentials):
            return []
        from machined.runtime import credentials

        bind = credentials.stage(
            str(self.layers.runtime_dir / "credentials"), self._credentials_owner()
        )
        if bind is None:
            return []
        self.credentials_environment = {"CREDENTIALS_DIRECTORY": credentials.INSIDE}
        return [bind]

    def _credentials_owner(self) -> tuple[int, int]:
        """The payload's user and group as the host sees them (systemd gives a
        unit's User= its credentials): User= resolved in the machine's own
        /etc/passwd, as PID 1 will resolve it, mapped into the machine's
        range. A booted guest's systemd (root) imports them."""
        base = self.policy.uid_base or 0
        spec = self.definition.user
        if self.definition.boot or spec in (None, "", "root", "0", "0:0", "root:root"):
            return base, base
        from machined.runtime import users

        try:
            user = self._in_image(lambda read: users.resolve(spec, read))
        except LookupError as exc:
            raise StartError(str(exc)) from None
        count = self.policy.uid_count
        if self.policy.uid_base is not None and not (user.uid < count and user.gid < count):
            raise StartError(
                f"user {spec!r} ({user.uid}:{user.gid}) is outside the machine's "
                f"{count} UIDs: its credentials would belong to another range"
            )
        return base + user.uid, base + user.gid

    def _monitor_guest(self) -> None:
        """Guest health (runtime/guest.py): a child that outlives us."""
        from machined.paths import unit_name
        from machined.runtime import guest

        running = state.read(self.paths, self.definition.name)
        if running is not None:
            guest.monitor(
                self.definition,
                running,
                str(self.layers.runtime_dir),
                unit_name(self.definition.name),
            )

    def _register(self) -> None:
        """Register with machined on the connection the network's set-up opened,
        if it did; a foreground run keeps it for its teardown (it has no signal
        match, so nothing queues up on it while the machine runs). A stale
        registration (a killed run) is dropped first only if machined has one:
        no round trip in the common case."""
        from machined import registry
        from machined.dbus import Bus

        ifindices = [self.network_state["host_ifindex"]] if self.network_state else []
        self._bus = self._bus or Bus()
        if (cleanup.MACHINED_STATE / self.definition.name).exists():
            registry.unregister(self._bus, self.definition.name)
        registry.register(
            self._bus, self.definition.name, self.child, str(self.layers.root), ifindices
        )
        self.registered = True
        if not self.foreground:
            self._bus.close()
            self._bus = None

    def _teardown(self) -> None:
        name = self.definition.name
        if self.registered:
            try:
                from machined import registry
                from machined.dbus import Bus

                # kept for a foreground run, or left open by a start that failed
                # between _register and the proxies
                kept, self._bus = self._bus, None
                with kept or Bus() as bus:
                    registry.unregister(bus, name)
                if kept is not None and (cleanup.MACHINED_STATE / name).exists():
                    with Bus() as bus:  # the kept connection broke while the machine ran
                        registry.unregister(bus, name)
            except Exception as exc:  # the bus may be gone at shutdown
                _log(f"could not unregister from machined: {exc}")
        if self.own_network:  # pymachined's otherwise: it follows the unit's stop
            try:
                from machined import network

                network.teardown(name, self.paths)
            except Exception as exc:
                _log(f"network teardown failed: {exc}")
        with contextlib.suppress(FileNotFoundError):
            (self.layers.runtime_dir / state.STATE_FILE).unlink()
        self.layers.cleanup()

    def run(self) -> int:
        # Every signal waits for _wait (foreground), which passes it on: `run`
        # dies of none before the container has heard of it.
        watched = signal.valid_signals()
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        # Closed to host users before anything of the machine lands in them (and
        # closed again if an older install or systemd's RuntimeDirectory= opened them).
        private_dirs(self.paths.state, self.paths.images)
        private_dirs(self.paths.runtime, self.layers.runtime_dir, mode=SEARCH_ONLY)
        if self.layers.ephemeral:
            private_dirs(self.layers.upper.parent)
        try:
            if not self.definition.boot and (problem := init.missing()):
                raise StartError(problem)
            linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # PID 1 comes back to us
            intermediate = self.intermediate or leader.spawn(foreground=self.foreground)
            self.intermediate = intermediate
            go_write, report_read = intermediate.go_write, intermediate.report_read
            _protect_from_oom_killer()  # after the fork: the container keeps the default
            with_userns = userns.spec_of(self.definition).mode != "no"
            intermediate.start(userns=with_userns, boot=self.definition.boot)
            ids = userns.prepare(self.paths, self.definition, self.layers, self._container_userns)
            self.policy = security.policy_for(self.definition, **ids)
            security.write_state(self.layers.runtime_dir, self.policy)
            self.layers.mount()
            _crash_point("after-overlay")
            binds = self._binds()
            if self._userns_fd is not None:  # the image and binds have their mounts
                os.close(self._userns_fd)
                self._userns_fd = None
            flags = self._namespace_flags()
            # we in supervisor/, it in payload/ (in the thread __main__ started, if it did)
            dirs = (
                self.cgroups.result()
                if self.cgroups
                else cgroup.split_for_payload(intermediate.pid)
            )
            payload_cg = Path(dirs[1])
            if self.definition.boot:
                userns.chown_cgroup(payload_cg, self.policy.uid_base)
            if not intermediate.started():
                raise StartError("the container exited while creating its namespaces")
            intermediate.go(flags)
            # while it creates namespaces
            restrictions = security.restrictions(
                self.policy, security.cache_dir(self.paths.runtime)
            )
            line = leader.read_line(report_read)
            if not line.startswith(b"P"):
                raise StartError("the container exited while creating its namespaces")
            self.child = int(line[1:])
            # while PID 1 opens its file systems (and, bridged with pymachined,
            # until the root's mounts are made: _await_network)
            binds += self._setup_network()
            filesystems = intermediate.filesystems(
                keep_open=self._notifies() and not self.definition.boot
            )
            if filesystems is None:
                raise StartError("the container failed to open its file systems (see above)")
            binds += self._notify_binds()
            binds += self._credential_binds()
            try:  # while pymachined sets up a bridged machine's network
                mounts.build_rootfs(self._rootfs_spec(binds, payload_cg), filesystems)
            finally:
                for fd in filesystems:
                    if fd >= 0:
                        os.close(fd)
            self._await_network()
            _crash_point("after-network")
            message = self._container_message(restrictions)
            leader.send(go_write, message)
            if self.notify is not None and not self.definition.boot:  # PID 1 takes them
                intermediate.send_fds(self.notify.fds)
            _preload_registration()  # while PID 1 pivots and execs the init
            # EOF: PID 1 exec'd the init (the pipe is close-on-exec) and the
            # intermediate, which made PID 1's mount namespace, exited; a byte: PID 1 failed.
            if os.read(report_read, 1):
                raise StartError("the container failed to set up its file systems (see above)")
            _pid, intermediate_status = os.waitpid(intermediate.pid, 0)
            if intermediate_status != 0:
                raise StartError("the container exited while creating its namespaces")
            self._register()
            _crash_point("after-registration")
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
                    address=_without_prefix((self.network_state or {}).get("address")),
                    host_ifname=(self.network_state or {}).get("host_ifname"),
                ),
            )
            if not self.foreground:
                if self.notify is not None and self.definition.boot:
                    from machined.runtime import notify

                    notify.relay_boot(self.notify.fds, self.child)  # before the unit is handed over
                if self.definition.boot and self.definition.health.watched():
                    self._monitor_guest()
                self._hand_over()
                return 0
            linux.set_process_name("pymachine-rt")
            return self._wait(watched)
        except (StartError, OSError, PymachineError) as exc:  # one line, never a traceback
            _log(f"cannot start machine {self.definition.name}: {exc}")
            if self.child:
                try:
                    os.kill(self.child, signal.SIGKILL)
                    os.waitpid(self.child, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            return int(exc.exit_code) if isinstance(exc, PymachineError) else 1  # 5: a conflict
        finally:
            if not self.handed_over:
                self._teardown()

    def _hand_over(self) -> None:
        """Service mode: the unit is Type=forking with PIDFile=, like a classic
        daemon: we write PID 1's host PID and exit. PID 1 is re-parented to
        systemd before systemd hears of our exit, so when it reads the PID file
        PID 1 is its own child: it sees PID 1's exit status and waits for it on
        stop (a MAINPID= notification from us would make PID 1 an "alien" main
        process that systemd 252 neither waits for nor reaps). ExecStopPost=
        (cleanup.py) tears down."""
        pid_file = self.paths.pid_file(self.definition.name)
        tmp = pid_file.with_name(f".{pid_file.name}.tmp")
        tmp.write_text(f"{self.child}\n")
        os.rename(tmp, pid_file)
        self.handed_over = True

    def _rootfs_spec(self, binds: list[dict], payload_cg: Path) -> mounts.RootfsSpec:
        base = self.policy.uid_base
        return mounts.RootfsSpec(
            root=str(self.layers.root),
            read_only=self.definition.read_only,
            writable_cgroup=self.definition.boot,
            binds=tuple(mounts.Bind(**b) for b in binds),
            console=os.ttyname(0) if self.foreground and os.isatty(0) else None,
            cgroup_dir=str(payload_cg),
            owner=(base, base) if base is not None else (0, 0),
            nested=self.definition.boot,
            devices=self._devices(),
        )

    def _devices(self) -> tuple:
        """Device=: each host node's (path, mode, rdev, group); a missing one is
        an error. Group: the machine's group of the same name as the host
        node's (kvm, render…), mapped, or None (root's) where it has none."""
        nodes = []
        for device in self.definition.devices:
            try:
                st = os.stat(device.path)
            except FileNotFoundError:
                raise StartError(f"device {device.path} does not exist on the host") from None
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise StartError(f"{device.path} is not a device node")
            nodes.append((device.path, st.st_mode, st.st_rdev, self._device_group(st.st_gid)))
        return tuple(nodes)

    def _device_group(self, host_gid: int) -> int | None:
        if host_gid == 0:
            return None
        import grp

        try:
            name = grp.getgrgid(host_gid).gr_name
        except KeyError:
            return None
        from machined.runtime import users

        inside = self._in_image(lambda read: users.group_id(name, read))
        base, count = self.policy.uid_base, self.policy.uid_count
        if inside is None or (base is not None and inside >= count):
            return None
        return (base or 0) + inside

    def _in_image(self, use):
        """USE(a reader of the machine's own files: runtime/users.py)."""
        from machined.runtime import users

        root_fd = os.open(self.layers.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return use(users.reader_in_root(root_fd))
        finally:
            os.close(root_fd)

    def _container_message(self, restrictions: dict) -> dict:
        """Everything the container's set-up (container.py) and PID 1 need
        (plain data: it crosses a pipe, marshal-ed)."""
        definition = self.definition
        return {
            "root": str(self.layers.root),
            "hostname": definition.name,
            "boot": definition.boot,
            "terminal": self.foreground and os.isatty(0),
            "term": os.environ.get("TERM"),
            "command": self.command,
            "environment": dict(definition.environment)
            | (self.notify.environment if self.notify is not None else {})
            | self.credentials_environment,
            "notify": self.notify is not None and not definition.boot,
            "init_arguments": definition.health.init_arguments()
            + (["--ready-on-healthy"] if definition.notify == "healthy" else []),
            "working_directory": definition.working_directory,
            "user": definition.user,
            "stop_timeout": definition.stop_timeout,
            "restrictions": restrictions,
        }

    def _wait(self, watched: set[int]) -> int:
        """Foreground mode: forward signals to PID 1 until it exits. As a subreaper
        we also reap the container's set-up child (re-parented to us when the
        intermediate exited): a zombie in the container's PID namespace would
        keep PID 1 waiting for it when it drains."""
        pidfd = os.pidfd_open(self.child)  # our child: no other process can take its PID
        relay = Relay.for_leader(self.child, boot=self.definition.boot)
        try:
            while True:
                info = signal.sigwaitinfo(watched)
                if info.si_signo != signal.SIGCHLD:
                    relay.handle(info, pidfd)
                    continue
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        return 1
                    if pid == 0:
                        break
                    if pid == self.child:
                        return self._exit_status(status)
        finally:
            os.close(pidfd)

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


JOB_STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


class Relay:
    """What ``pymachine run`` does with a signal it gets (but SIGCHLD): pass
    it on to the container's PID 1, queued (pymachine-init takes a queued
    SIGINT for a user's interrupt, a killed one for machinectl's reboot),
    unless it is not the outside's: our own (SIGPIPE of a write of ours), one
    a container process sent to its process group (we are in it on a
    terminal), or the terminal's (Ctrl-C, a resize: SI_KERNEL) when PID 1 is
    in our process group and got it too. A booted machine halts on SIGTERM
    and SIGINT, as under systemd-nspawn. A job-control stop stops us as well,
    as it does any program, so that the shell sees the job stopped; SIGCONT
    wakes us and is passed on."""

    def __init__(self, leader_pidns: int | None, leader_in_our_group: bool, *, boot: bool) -> None:
        self.leader_pidns = leader_pidns
        self.leader_in_our_group = leader_in_our_group
        self.boot = boot

    @classmethod
    def for_leader(cls, leader: int, *, boot: bool) -> Relay:
        return cls(_pid_namespace(leader), _process_group(leader) == os.getpgrp(), boot=boot)

    def handle(self, info, pidfd: int) -> None:
        """Act on a signal from sigwaitinfo (a ``struct_siginfo``)."""
        outside = not self._from_container(info.si_pid)
        if outside and self.passes_on(info.si_code, info.si_pid):
            with contextlib.suppress(ProcessLookupError):
                linux.queue_signal(pidfd, self.translated(info.si_signo))
        if outside and info.si_signo in JOB_STOPS:
            os.kill(os.getpid(), signal.SIGSTOP)

    def passes_on(self, code: int, sender: int) -> bool:
        """Whether a signal from outside the container goes on to PID 1."""
        if code == linux.SI_KERNEL:
            return not self.leader_in_our_group
        return sender != os.getpid()

    def translated(self, sig: int) -> int:
        return HALT if self.boot and sig in (signal.SIGTERM, signal.SIGINT) else sig

    def _from_container(self, sender: int) -> bool:
        return (
            sender > 0
            and self.leader_pidns is not None
            and _pid_namespace(sender) == self.leader_pidns
        )


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


CRASH_ENV = "PYMACHINE_TEST_CRASH_AT"  # fault-injection for tests: a step name below


def _crash_point(step: str) -> None:
    """Die like a SIGKILLed runtime at STEP when the tests ask for it, so they can
    check that nothing is left behind (after-overlay, after-network, after-registration)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _preload_registration() -> None:
    """Import the machined client now, while the container's PID 1 sets itself up."""
    from machined import registry  # noqa: F401
    from machined.dbus import Bus  # noqa: F401


def _protect_from_oom_killer() -> None:
    """The runtime shares the unit's MemoryMax= with the container; when the
    container runs out, the kernel must kill the container's hog, not us (the
    unit's result is then 'oom-kill', as a user expects)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("-1000")


def _without_prefix(address: str | None) -> str | None:
    return address.split("/", 1)[0] if address else None


def main(
    argv: list[str],
    intermediate: leader.Intermediate | None = None,
    cgroups: cgroup.PayloadSplit | None = None,
) -> int:
    """``python -m machined.runtime NAME [--foreground] [--ephemeral] [-- CMD…]``."""
    from machined import definition as definitions

    command: list[str] | None = None
    if "--" in argv:
        index = argv.index("--")
        argv, command = argv[:index], argv[index + 1 :] or None
    if not argv:
        _log("usage: python -m machined.runtime NAME [--foreground] [--ephemeral] [-- CMD…]")
        return 2
    paths = Paths.from_env()
    definition = definitions.load(argv[0], paths)
    if "--ephemeral" in argv[1:]:
        definition.ephemeral = True
    return Supervisor(
        definition,
        paths,
        command=command,
        foreground="--foreground" in argv[1:],
        intermediate=intermediate,
        cgroups=cgroups,
    ).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
