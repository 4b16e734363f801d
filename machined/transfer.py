"""Files in and out of a running machine: ``copy-to``, ``copy-from``, ``bind``
(like ``machinectl copy-to``, ``copy-from`` and ``bind``).

Every path inside the machine is resolved in the machine's own view: a
process forked for the job opens what it needs on the host first (the host
file or directory, the machine's ``/proc/LEADER/root``), then ``setns`` into
the machine's mount namespace and ``chroot`` to its root, as ``exec`` does
(:mod:`machined.runtime.enter`). A symlink inside the machine (``/etc ->
/``, ``../../..``) therefore resolves inside the machine and never reaches
the host's files. The process stays host root (it does not join the
machine's user namespace), so it can read every host file it is asked to;
what it writes into the machine it hands to the machine's root (the first
UID/GID of the machine's range on the host, 0 without ``PrivateUsers``),
what it writes on the host to the user running pymachine.

Copies keep modes, access and modification times (nanoseconds) and
symlinks (as symlinks, never followed below the top); FIFOs are re-created;
device nodes and sockets are skipped with a warning (a machine must not be
able to hand the host a device node). Extended attributes, ACLs and hard
links are not preserved (``machinectl`` keeps hard links; rarely needed here).

``bind`` uses the new mount API (Linux 5.2; idmapped mounts 5.12): the host
directory is cloned into a detached mount (``open_tree(OPEN_TREE_CLONE)``),
given the machine's ID mapping (``mount_setattr(MOUNT_ATTR_IDMAP)``) and,
with ``--read-only``, ``MOUNT_ATTR_RDONLY``; then a forked process has the
kernel lock it (:func:`_locked_copy`: root inside cannot make it writable),
joins the machine's mount namespace, resolves the target inside the
machine's root (:mod:`machined.runtime.chase`) and ``move_mount``\\ s it
onto that very inode. The
bind lasts until the machine stops (as with ``machinectl bind``); put it in
``[Files] Bind=`` to have it at every start.

Standard library and ctypes only: the mount API and the namespace joins are
a few system calls that no maintained library wraps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from machined.errors import Conflict, InvalidInput, NotFound, PymachineError
from machined.runtime import chase, linux, restrict, userns
from machined.runtime.state import RuntimeState

# --- the new mount API -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# --- the machine -------------------------------------------------------------------


def root_ids(leader: int) -> tuple[int, int]:
    """Host UID and GID of the machine's root (0, 0 without a user namespace)."""
    ids = []
    for name in ("uid_map", "gid_map"):
        value = 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{leader}/{name}").read_text().splitlines():
                inside, outside, count = (int(x) for x in line.split())
                if inside <= 0 < inside + count:
                    value = outside - inside
                    break
        ids.append(value)
    return ids[0], ids[1]


def id_range(leader: int) -> tuple[int, int] | None:
    """(base, count) of the machine's user namespace, None if it shares ours."""
    if os.readlink(f"/proc/{leader}/ns/user") == os.readlink("/proc/self/ns/user"):
        return None
    with open(f"/proc/{leader}/uid_map") as handle:
        inside, outside, count = (int(x) for x in handle.read().split()[:3])
    return outside - inside, count


class _Failure(Exception):
    """Raised in the forked helper; carried to the caller as KIND + message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_KINDS = {
    "not-found": NotFound,
    "invalid": InvalidInput,
    "conflict": Conflict,
    "failure": PymachineError,
}


def _os_failure(exc: OSError, what: str) -> _Failure:
    kind = "not-found" if exc.errno == errno.ENOENT else "failure"
    return _Failure(kind, f"{what}: {exc.strerror or exc}")


def _create_as(uid: int, gid: int) -> None:
    """Create files as UID:GID (the machine's root) while keeping host root's
    capabilities: file systems the machine mounted in its user namespace
    (its /tmp, /run) refuse to create inodes for an owner they cannot map
    (EOVERFLOW), so host UID 0 cannot create there. setfsuid drops the file
    capabilities from the effective set; they are raised again from the
    permitted set, so host files of any owner stay readable."""
    if (uid, gid) == (0, 0):
        return
    _libc.setfsgid(ctypes.c_uint(gid))
    _libc.setfsuid(ctypes.c_uint(uid))
    if _libc.setfsuid(ctypes.c_uint(uid)) != uid or _libc.setfsgid(ctypes.c_uint(gid)) != gid:
        raise OSError(errno.EPERM, f"cannot act as {uid}:{gid}")
    _effective, permitted, inheritable = restrict.get_capabilities()
    restrict.set_capabilities(permitted, inheritable)


def _in_machine(
    state: RuntimeState, job, owner: tuple[int, int] = (0, 0), before=None
) -> list[str]:
    """Run JOB() in a forked process that joined the machine's mount namespace
    and root (creating files as OWNER); returns its warnings, raises its
    failure as a PymachineError. What JOB needs from the host it must have
    opened before (fds survive). BEFORE(): run in that process first."""
    mnt = os.open(f"/proc/{state.leader}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    root = os.open(f"/proc/{state.leader}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    report_r, report_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
        if pid == 0:  # the helper: never returns into the caller's code
            result: dict = {"warnings": []}
            try:
                os.close(report_r)
                if before is not None:
                    before()
                linux.setns(mnt, linux.CLONE_NEWNS)
                os.fchdir(root)
                os.chroot(".")
                os.chdir("/")
                _create_as(*owner)
                result["warnings"] = job() or []
            except _Failure as exc:
                result["error"] = [exc.kind, str(exc)]
            except OSError as exc:
                result["error"] = ["failure", f"{exc.strerror or exc}"]
            except BaseException as exc:
                result["error"] = ["failure", f"{type(exc).__name__}: {exc}"]
            finally:
                with contextlib.suppress(BaseException):
                    os.write(report_w, json.dumps(result).encode())
                os._exit(0)
        os.close(report_w)
        report_w = -1
        data = b""
        while chunk := os.read(report_r, 65536):
            data += chunk
        os.waitpid(pid, 0)
    finally:
        for fd in (mnt, root, report_r, report_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    try:
        result = json.loads(data)
    except ValueError:
        raise PymachineError(f"machine {state.name}: the helper process died") from None
    if "error" in result:
        kind, message = result["error"]
        raise _KINDS.get(kind, PymachineError)(message)
    return result["warnings"]


# --- copying ---------------------------------------------------------------------------


@dataclass
class _Copier:
    """Copies a tree between two directory fds; owns everything it creates by UID:GID."""

    uid: int
    gid: int
    warnings: list[str] = field(default_factory=list)

    def copy(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, st=None) -> None:
        st = st or os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            self._directory(src_dir, src_name, dst_dir, dst_name, st)
        elif stat.S_ISREG(mode):
            self._file(src_dir, src_name, dst_dir, dst_name, st)
        elif stat.S_ISLNK(mode):
            self._replace_non_directory(dst_dir, dst_name)
            os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
            self._finish_path(dst_dir, dst_name, st)
        elif stat.S_ISFIFO(mode):
            self._replace_non_directory(dst_dir, dst_name)
            os.mkfifo(dst_name, stat.S_IMODE(mode), dir_fd=dst_dir)
            self._finish_path(dst_dir, dst_name, st)
        else:
            kind = "socket" if stat.S_ISSOCK(mode) else "device node"
            self.warnings.append(f"skipped {kind} {self._where(src_dir, src_name)}")

    def _where(self, dir_fd: int, name: str) -> str:
        with contextlib.suppress(OSError):
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        return name

    def _replace_non_directory(self, dst_dir: int, dst_name: str) -> None:
        try:
            existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(existing.st_mode):
            raise _Failure(
                "conflict", f"cannot overwrite directory {dst_name!r} with a non-directory"
            )
        os.unlink(dst_name, dir_fd=dst_dir)

    def _finish_path(self, dst_dir: int, dst_name: str, st) -> None:
        os.chown(dst_name, self.uid, self.gid, dir_fd=dst_dir, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(dst_name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
        os.utime(
            dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False
        )

    def _finish_fd(self, fd: int, st) -> None:
        os.fchown(fd, self.uid, self.gid)  # before chmod: chown clears set-ID bits
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _file(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, st) -> None:
        src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            try:
                existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                self._replace_non_directory(dst_dir, dst_name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            dst = os.open(dst_name, flags, 0o600, dir_fd=dst_dir)
            try:
                _copy_data(src, dst, st.st_size)
                self._finish_fd(dst, st)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _directory(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str, st) -> None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        src = os.open(src_name, flags, dir_fd=src_dir)
        try:
            try:
                os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            except FileExistsError:
                existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
                if not stat.S_ISDIR(existing.st_mode):
                    raise _Failure(
                        "conflict", f"cannot overwrite non-directory {dst_name!r} with a directory"
                    ) from None
            dst = os.open(dst_name, flags, dir_fd=dst_dir)
            try:
                with os.scandir(src) as entries:
                    children = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
                for name, child in children:
                    self.copy(src, name, dst, name, child)
                self._finish_fd(dst, st)  # last: the children changed its mtime
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _copy_data(src: int, dst: int, size: int) -> None:
    """copy_file_range (reflinks where the file system can), sendfile otherwise."""
    copied = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, 1 << 30)
            if n == 0:
                return
            copied += n
    except OSError as exc:
        if copied or exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while os.sendfile(dst, src, None, 1 << 30):
        pass


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of an absolute path; the root itself is refused."""
    pure = PurePosixPath(os.path.normpath(path))
    if pure.name in ("", ".", ".."):
        raise InvalidInput(f"{path!r} names no file (the root itself cannot be a copy's end)")
    return str(pure.parent), pure.name


def _machine_path(text: str) -> str:
    if not text.startswith("/"):
        raise InvalidInput(f"machine path {text!r} must be absolute")
    return text


def _open_destination(parent: str, name: str, source_name: str) -> tuple[int, str]:
    """cp's rule: an existing directory (symlinks followed in the current
    root) receives the copy under the source's name; otherwise PARENT/NAME
    is created or replaced. Returns (parent dir fd, name)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    full = os.path.join(parent, name)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return os.open(full, flags), source_name
    try:
        return os.open(parent, flags), name
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _os_failure(exc, f"directory {parent}") from None


def copy_to(state: RuntimeState, host_path: str, machine_path: str | None = None) -> list[str]:
    """Copy HOST_PATH (file or directory, recursively) into the running machine
    at MACHINE_PATH (default: the same path). Returns warnings."""
    host_path = os.path.abspath(host_path)
    machine_path = _machine_path(machine_path or host_path)
    try:
        st = os.stat(host_path)  # the top level is followed, as cp does
    except FileNotFoundError:
        raise NotFound(f"{host_path}: no such file or directory on the host") from None
    except OSError as exc:
        raise PymachineError(f"{host_path}: {exc.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise InvalidInput(f"{host_path}: only files and directories can be copied")
    source_name = os.path.basename(host_path)  # what the copy is called
    real_parent, real_name = os.path.split(os.path.realpath(host_path))
    if not source_name or not real_name:
        raise InvalidInput("the host's root directory cannot be copied")
    src_dir = os.open(real_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    uid, gid = root_ids(state.leader)
    parent, name = _split(machine_path)

    def job() -> list[str]:
        dst_dir, dst_name = _open_destination(parent, name, source_name)
        copier = _Copier(uid, gid)
        try:
            copier.copy(src_dir, real_name, dst_dir, dst_name)
        except OSError as exc:
            raise _os_failure(exc, f"copying to {machine_path} in machine {state.name}") from None
        finally:
            os.close(dst_dir)
        return copier.warnings

    try:
        return _in_machine(state, job, (uid, gid))
    finally:
        os.close(src_dir)


def copy_from(state: RuntimeState, machine_path: str, host_path: str | None = None) -> list[str]:
    """Copy MACHINE_PATH (resolved inside the machine) out to HOST_PATH (default:
    the same path), owned by the user running this. Returns warnings."""
    machine_path = _machine_path(machine_path)
    host_path = os.path.abspath(host_path or machine_path)
    source_parent, source_name = _split(machine_path)
    parent, name = _split(host_path)
    try:
        dst_dir, dst_name = _open_destination(parent, name, source_name)
    except _Failure as exc:
        raise NotFound(f"{exc} on the host") from None
    uid, gid = os.getuid(), os.getgid()

    def job() -> list[str]:
        try:
            # the top level is followed (inside the machine), as cp does
            real = os.path.realpath(os.path.join(source_parent, source_name))
            top_parent, top_name = os.path.split(real)
            if not top_name:
                raise _Failure("invalid", "the machine's root directory cannot be copied")
            src_dir = os.open(top_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.stat(top_name, dir_fd=src_dir, follow_symlinks=False)
        except OSError as exc:
            raise _os_failure(exc, f"{machine_path} in machine {state.name}") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise _Failure("invalid", f"{machine_path}: only files and directories can be copied")
        copier = _Copier(uid, gid)
        try:
            copier.copy(src_dir, top_name, dst_dir, dst_name, st)
        except OSError as exc:
            raise _os_failure(exc, f"copying {machine_path} to {host_path}") from None
        finally:
            os.close(src_dir)
        return copier.warnings

    try:
        return _in_machine(state, job)
    finally:
        os.close(dst_dir)


def copy_fd_to(state: RuntimeState, source: int, source_name: str, machine_path: str) -> list[str]:
    """copy-to of one regular file the caller opened (pymachined: a user's own
    file, so it is read with the user's rights): its data, mode without set-ID
    bits (a user's file never becomes set-ID root inside) and times, owned by
    the machine's root, at MACHINE_PATH (an existing directory: under
    SOURCE_NAME)."""
    st = os.fstat(source)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput("only a regular file can be copied from a descriptor")
    if not source_name or "/" in source_name or source_name in (".", ".."):
        raise InvalidInput(f"invalid file name {source_name!r}")
    machine_path = _machine_path(machine_path)
    uid, gid = root_ids(state.leader)
    parent, name = _split(machine_path)

    def job() -> list[str]:
        dst_dir, dst_name = _open_destination(parent, name, source_name)
        copier = _Copier(uid, gid)
        try:
            existing = None
            with contextlib.suppress(FileNotFoundError):
                existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                copier._replace_non_directory(dst_dir, dst_name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            dst = os.open(dst_name, flags, 0o600, dir_fd=dst_dir)
            try:
                os.lseek(source, 0, os.SEEK_SET)
                _copy_data(source, dst, st.st_size)
                copier._finish_fd(dst, st)
                os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
            finally:
                os.close(dst)
        except OSError as exc:
            raise _os_failure(exc, f"copying to {machine_path} in machine {state.name}") from None
        finally:
            os.close(dst_dir)
        return copier.warnings

    return _in_machine(state, job, (uid, gid))


def copy_to_fd(state: RuntimeState, machine_path: str, destination: int) -> list[str]:
    """copy-from of one regular file (resolved inside the machine) into a file
    the caller opened for writing (pymachined: a user's own file)."""
    machine_path = _machine_path(machine_path)

    def job() -> list[str]:
        try:
            real = os.path.realpath(machine_path)  # inside the machine's root
            st = os.stat(real, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):  # (never opens a device or a FIFO)
                raise _Failure(
                    "invalid", f"{machine_path}: only a regular file (a directory: as root)"
                )
            src = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if not stat.S_ISREG(os.fstat(src).st_mode):  # replaced meanwhile
                    raise _Failure("invalid", f"{machine_path}: only a regular file can be copied")
                _copy_data(src, destination, st.st_size)
            finally:
                os.close(src)
        except OSError as exc:
            raise _os_failure(exc, f"{machine_path} in machine {state.name}") from None
        return []

    return _in_machine(state, job)


# --- bind ------------------------------------------------------------------------------


def bind(
    state: RuntimeState,
    host_path: str,
    machine_path: str | None = None,
    *,
    read_only: bool = False,
    mkdir: bool = False,
) -> list[str]:
    """Bind-mount HOST_PATH (a directory or a file) at MACHINE_PATH (default:
    the same path) in the running machine, until it stops. Returns warnings."""
    host_path = os.path.abspath(host_path)
    machine_path = _machine_path(machine_path or host_path)
    if os.path.normpath(machine_path) == "/":
        raise InvalidInput("cannot bind over the machine's root directory")
    try:
        is_dir = stat.S_ISDIR(os.stat(host_path).st_mode)
    except FileNotFoundError:
        raise NotFound(f"{host_path}: no such file or directory on the host") from None
    uid, gid = root_ids(state.leader)
    ids = id_range(state.leader)
    try:
        tree = linux.open_tree_clone(host_path)
    except OSError as exc:
        raise PymachineError(f"cannot bind {host_path}: {exc}") from None
    warnings: list[str] = []
    userns_fd = None
    try:
        userns_fd = userns.open_ns(state.leader) if ids is not None else None
        attrs = linux.MOUNT_ATTR_RDONLY if read_only else 0
        if ids is not None:
            try:
                with userns.mapped_userns(*ids) as fd:
                    linux.mount_setattr(tree, attrs | linux.MOUNT_ATTR_IDMAP, fd)
                attrs = 0
            except OSError as exc:  # a file system without idmapped mounts
                warnings.append(
                    f"{host_path}: no idmapped mount ({exc.strerror or exc}); "
                    "its files show as nobody inside the machine"
                )
        if attrs:
            linux.mount_setattr(tree, attrs)

        locked: list[int] = []

        def lock() -> None:
            locked.append(_locked_copy(tree, os.path.realpath(host_path), userns_fd))

        def job() -> list[str]:
            try:
                target = _bind_target(machine_path, is_dir, mkdir)
                try:
                    linux.attach(locked[0] if locked else tree, target)
                finally:
                    os.close(target)
            except OSError as exc:
                raise _os_failure(exc, f"{machine_path} in machine {state.name}") from None
            return []

        if userns_fd is None:
            warnings += _in_machine(state, job, (uid, gid))
        else:  # root of the machine's user namespace creates as the machine's root
            warnings += _in_machine(state, job, before=lock)
    except OSError as exc:
        raise PymachineError(f"cannot bind {host_path}: {exc}") from None
    finally:
        os.close(tree)
        if userns_fd is not None:
            os.close(userns_fd)
    return warnings


def _locked_copy(tree: int, host_path: str, userns_fd: int) -> int:
    """In the helper, before it joins the machine: a copy of TREE that the
    kernel locks (read-only stays read-only), as it locks the mounts a start
    makes. TREE is attached (over HOST_PATH) in a private mount namespace of
    ours; a mount namespace made from that one for the machine's user
    namespace copies it with its flags locked; the copy cloned from there is
    what goes into the machine."""
    parent, name = os.path.split(host_path)
    if not name:
        raise _Failure("invalid", "the host's root directory cannot be bound")
    os.chdir(parent)  # kept (translated) across both unshares
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    spot = os.open(name, os.O_PATH | os.O_CLOEXEC)
    try:
        linux.attach(tree, spot)
    finally:
        os.close(spot)
    linux.setns(userns_fd, userns.CLONE_NEWUSER)
    linux.unshare(linux.CLONE_NEWNS)
    return linux.open_tree(linux.AT_FDCWD, name)


def _bind_target(machine_path: str, is_dir: bool, mkdir: bool) -> int:
    """Inside the machine (the helper's root): an O_PATH fd of the mount point,
    resolved inside the root and checked to be the right kind; created with
    MKDIR."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = chase.open_in_root(root, machine_path)
        except FileNotFoundError:
            if not mkdir:
                raise _Failure(
                    "not-found",
                    f"{machine_path} does not exist in the machine (--mkdir creates it)",
                ) from None
            fd = chase.open_in_root(root, machine_path, create="dir" if is_dir else "file")
    finally:
        os.close(root)
    if stat.S_ISDIR(os.fstat(fd).st_mode) != is_dir:
        os.close(fd)
        what = "a directory" if is_dir else "a file"
        raise _Failure(
            "conflict", f"{machine_path} in the machine is not {what} like the host path"
        )
    return fd
