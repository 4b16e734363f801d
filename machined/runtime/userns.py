"""User namespaces: root inside a machine is an unprivileged UID range outside.

``PrivateUsers=`` (``[Exec]``) takes nspawn's ``--private-users`` forms:

* ``pick``: a free range of 65536 host UIDs/GIDs, chosen once per machine
  between 0x00080000 and 0x6FFF0000 (nspawn's ``UID_SHIFT_PICK_MIN/MAX``),
  recorded in ``Paths.state/userns.json`` under a lock so two machines never
  share one, and kept across restarts (the writable layer is owned by it);
* ``UID[:COUNT]``: that range (refused if it overlaps another machine's);
* ``no``: root inside is root outside (capabilities and seccomp still apply).

How the pieces fit the runtime (``supervisor.py``):

1. :func:`prepare` (host side, before the overlay is mounted): allocate the
   range; give the image (the overlay's lower layer) an *idmapped mount* on
   the range (``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)``), so the
   image stays shared and unchanged on disk while the container sees its own
   files as its own; own the writable layer by the range (shifting it once
   if it was written under another mapping). If the kernel or the image's
   file system refuses an idmapped mount (kernels before 5.19 under
   overlayfs, file systems without FS_ALLOW_IDMAP), the start fails with an
   error naming ``PrivateUsers=no``: the shared image is never chowned.
2. the container's side (``leader.py``, ``mounts.py``): the intermediate
   unshares the user namespace and the runtime writes its maps; the runtime
   makes the machine's mounts in its own mount namespace, and PID 1's mount
   namespace, unshared later inside the user namespace, is a copy in which
   the kernel *locks* them: read-only ``/sys``, read-only binds and the masks
   over ``/proc`` cannot be remounted or unmounted from inside.
3. :func:`open_ns` / :func:`join` (``pymachine exec``): join the machine's
   user namespace last and become its root.

Standard library and ctypes only: :func:`enter` runs in the forked PID 1.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

from machined.runtime import linux

PICK_MIN = 0x00080000
PICK_MAX = 0x6FFF0000
DEFAULT_COUNT = 0x10000
DEFAULT = "pick"  # PrivateUsers= when a definition does not say (systemd-nspawn@.service's -U)
REGISTRY = "userns.json"
LOCK = ".userns.lock"
SHIFT_FILE = "userns-base"  # in the machine's state dir: the mapping its layer is owned by

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

# --- specs -------------------------------------------------------------------


class UsernsSpec(namedtuple("UsernsSpec", "mode base count", defaults=(None, DEFAULT_COUNT))):
    """A definition's ``PrivateUsers=``: no, pick a free range, or a fixed one.
    mode: "pick", "no" or "fixed" (BASE, COUNT). A namedtuple, as the runtime's
    other records: a dataclass costs every start ~0.3 ms to create."""

    __slots__ = ()

    @property
    def text(self) -> str:
        if self.mode == "fixed":
            return f"{self.base}:{self.count}" if self.count != DEFAULT_COUNT else str(self.base)
        return self.mode


def parse_spec(text: str) -> UsernsSpec:
    value = text.strip().lower()
    if value in ("pick", "yes", "1", "true", "on"):
        return UsernsSpec("pick")
    if value in ("no", "0", "false", "off"):
        return UsernsSpec("no")
    base_text, _, count_text = value.partition(":")
    if not base_text.isdigit() or (count_text and not count_text.isdigit()):
        raise ValueError(f"invalid PrivateUsers= {text!r}: expected pick, no or UID[:COUNT]")
    base, count = int(base_text), int(count_text or DEFAULT_COUNT)
    if count < 1 or base + count > 2**32 - 1 or base == 0:
        raise ValueError(f"invalid PrivateUsers= {text!r}: the range must lie within 1…4294967294")
    return UsernsSpec("fixed", base, count)


# --- allocation ----------------------------------------------------------------


def _overlaps(a: int, a_count: int, b: int, b_count: int) -> bool:
    return a < b + b_count and b < a + a_count


def _host_ids() -> set[int]:
    ids: set[int] = set()
    for path in ("/etc/passwd", "/etc/group"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 3 and fields[2].isdigit():
                    ids.add(int(fields[2]))
    return ids


@contextlib.contextmanager
def _locked(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_registry(state_dir: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((state_dir / REGISTRY).read_text())
    except (OSError, ValueError):
        return {}
    return {k: [int(v[0]), int(v[1])] for k, v in data.items() if isinstance(v, list)}


def _write_registry(state_dir: Path, data: dict[str, list[int]]) -> None:
    tmp = state_dir / f".{REGISTRY}.tmp"
    tmp.write_text(json.dumps(data, sort_keys=True, indent=1))
    os.rename(tmp, state_dir / REGISTRY)


def _candidate(name: str, attempt: int, count: int) -> int:
    """Deterministic per machine name first (stable across re-creation), then probing."""
    import hashlib

    slots = (PICK_MAX - PICK_MIN) // count
    digest = hashlib.sha256(f"{name}/{attempt}".encode()).digest()
    return PICK_MIN + (int.from_bytes(digest[:8], "little") % slots) * count


def allocate(state_dir: Path | str, name: str, spec: UsernsSpec) -> tuple[int, int] | None:
    """The machine's (base, count), allocated on first use and then kept;
    None for ``PrivateUsers=no``. Raises ValueError if a fixed range is taken."""
    state_dir = Path(state_dir)
    if spec.mode == "no":
        return None
    with _locked(state_dir):
        registry = _read_registry(state_dir)
        others = {k: v for k, v in registry.items() if k != name}
        mine = registry.get(name)
        if spec.mode == "fixed":
            wanted = (spec.base, spec.count)
            for other, (b, c) in others.items():
                if _overlaps(spec.base, spec.count, b, c):
                    raise ValueError(
                        f"PrivateUsers={spec.text}: overlaps machine {other}'s range {b}:{c}"
                    )
        elif mine and PICK_MIN <= mine[0] < PICK_MAX:
            wanted = (mine[0], mine[1])
        else:
            host = _host_ids()
            for attempt in range(4096):
                base = _candidate(name, attempt, spec.count)
                if any(_overlaps(base, spec.count, b, c) for b, c in others.values()):
                    continue
                if any(base <= i < base + spec.count for i in host):
                    continue
                wanted = (base, spec.count)
                break
            else:
                raise ValueError("no free UID range left for PrivateUsers=pick")
        if mine != list(wanted):  # a start of an allocated machine writes nothing
            registry[name] = list(wanted)
            _write_registry(state_dir, registry)
        return wanted


def release(state_dir: Path | str, name: str) -> None:
    """Forget the machine's range (``pymachine remove``)."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        registry = _read_registry(state_dir)
        if registry.pop(name, None) is not None:
            _write_registry(state_dir, registry)


def allocations(state_dir: Path | str) -> dict[str, tuple[int, int]]:
    return {k: (v[0], v[1]) for k, v in _read_registry(Path(state_dir)).items()}


# --- system calls --------------------------------------------------------------


def map_text(base: int, count: int) -> str:
    return f"0 {base} {count}\n"


def write_maps(pid: int | str, base: int, count: int) -> None:
    """uid_map and gid_map of PID's user namespace: 0…COUNT-1 → BASE…"""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as handle:
            handle.write(map_text(base, count))


@contextlib.contextmanager
def mapped_userns(base: int, count: int):
    """A file descriptor of a fresh user namespace mapped on the range (for idmapped mounts)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            linux.unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    fd = -1
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "could not create a user namespace")
        write_maps(pid, base, count)
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(ready_r)
        os.close(done_w)  # the helper exits
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def idmapped_mount(source: str | os.PathLike, target: str | os.PathLike, userns_fd: int) -> None:
    """Mount SOURCE on TARGET (recursively), its owners seen through USERNS_FD's
    mapping: host UID 0 on disk appears as the range's first UID."""
    tree = linux.open_tree_clone(source)
    try:
        linux.mount_setattr(tree, linux.MOUNT_ATTR_IDMAP, userns_fd)
        linux.move_mount(tree, target)
    finally:
        os.close(tree)


# --- ownership of the writable layer ------------------------------------------


def _shift_id(value: int, old: int, new: int, count: int) -> int:
    if old <= value < old + count:
        return value - old + new
    return value


def shift_tree(root: str | os.PathLike, old_base: int, new_base: int, count: int) -> int:
    """Re-own every entry under ROOT from one mapping to another (lchown, no
    symlinks followed); set-ID bits chown clears are restored. Returns how many
    entries changed."""
    changed = 0
    root = os.fspath(root)

    def fix(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        uid = _shift_id(st.st_uid, old_base, new_base, count)
        gid = _shift_id(st.st_gid, old_base, new_base, count)
        if (uid, gid) == (st.st_uid, st.st_gid):
            return
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    fix(root)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            fix(os.path.join(directory, name))
    return changed


def own_layer(machine_state: Path, upper: Path, base: int | None, count: int) -> None:
    """Make the writable layer belong to BASE's range (0 = no user namespace),
    shifting it when it was written under another mapping."""
    marker = machine_state / SHIFT_FILE
    try:
        old = recorded = int(marker.read_text())
    except (OSError, ValueError):
        old, recorded = 0, None
    new = base or 0
    if old != new and upper.exists():
        shift_tree(upper, old, new, count or DEFAULT_COUNT)
    elif upper.exists():
        st = upper.stat()
        if st.st_uid != new:
            os.chown(upper, new, new)
    if recorded != new:  # the common start: recorded already, nothing to write
        machine_state.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{new}\n")


# --- the supervisor's side ------------------------------------------------------


def spec_of(definition) -> UsernsSpec:
    """The definition's ``PrivateUsers=`` (duck-typed, as ``security.policy_for``)."""
    return parse_spec(str(getattr(definition, "private_users", None) or DEFAULT))


def prepare(paths, definition, layers, mapped: Callable[[int, int], int]) -> dict[str, int | None]:
    """Host side, before the overlay is mounted (in the runtime's private mount
    namespace). MAPPED(base, count): an fd of a user namespace mapped on the
    machine's range, for the image's idmapped mount (the container's own: no
    helper process). Returns ``uid_base``/``uid_count`` for ``security.policy_for``."""
    spec = spec_of(definition)
    try:
        allocated = allocate(paths.state, definition.name, spec)
    except ValueError as exc:
        raise OSError(errno.EBUSY, str(exc)) from None
    if allocated is None:
        if not definition.ephemeral:
            own_layer(paths.machine_state(definition.name), layers.upper, None, DEFAULT_COUNT)
        return {"uid_base": None, "uid_count": 0}
    base, count = allocated
    layers.upper.mkdir(parents=True, exist_ok=True)
    layers.work.mkdir(parents=True, exist_ok=True)
    state_dir = layers.upper.parent
    own_layer(state_dir, layers.upper, base, count)
    lower = layers.runtime_dir / "lower"
    lower.mkdir(parents=True, exist_ok=True)
    fd = mapped(base, count)
    try:
        idmapped_mount(layers.image, lower, fd)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"PrivateUsers={spec.text}: cannot give image {layers.image} an idmapped mount "
            f"({exc.strerror or exc}); set PrivateUsers=no for this machine",
        ) from None
    layers.image = lower
    return {"uid_base": base, "uid_count": count}


def chown_cgroup(cgroup_dir: Path, base: int | None) -> None:
    """Boot mode: the container's root (and its systemd) owns its cgroup subtree,
    as nspawn does for a user-namespaced container."""
    if base is None:
        return
    os.chown(cgroup_dir, base, base)
    for name in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        with contextlib.suppress(FileNotFoundError):
            os.chown(cgroup_dir / name, base, base)


# --- the container's side --------------------------------------------------------


def open_ns(leader: int) -> int | None:
    """``exec``: an fd of the machine's user namespace, None if it is ours."""
    path = f"/proc/{leader}/ns/user"
    if os.readlink(path) == os.readlink("/proc/self/ns/user"):
        return None
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def join(fd: int | None) -> None:
    """``exec``: after the other namespaces, become root of the machine's user namespace."""
    if fd is None:
        return
    linux.setns(fd, CLONE_NEWUSER)
    os.close(fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def mode_of(leader: int) -> str:
    """For ``status``: 'no' or 'BASE:COUNT' of the running machine's leader."""
    try:
        line = Path(f"/proc/{leader}/uid_map").read_text().split()
    except OSError:
        return "unknown"
    if line[:3] == ["0", "0", "4294967295"]:
        return "no"
    return f"{line[1]}:{line[2]}"
