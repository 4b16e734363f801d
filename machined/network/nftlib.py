"""libnftables in this process (ctypes), and a machine's rules removed through it.

The light half of :mod:`machined.network.nft`: a bridged machine's
``ExecStopPost=`` removes its ``Port=`` rules at every stop, and
:mod:`.nft` (dataclasses, typing, threading, ``json``, the definition's
port parser) costs ~5 ms of imports there for one listing and one delete.
Here: ``ctypes``, ``os``, ``_thread`` and :mod:`.jsonlite`. The delete batch
is formatted by hand: handles are integers and the other names constants.
"""

from __future__ import annotations

import _thread
import ctypes
import os

from machined.network.jsonlite import loads

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

FAMILY = "inet"
TABLE = "pymachine"
COMMENT_PREFIX = "pymachine:"
#: the table's listing (libnftables-json(5)), as :func:`remove_machine` asks for it
LIST_TABLE = (
    f'{{"nftables": [{{"list": {{"table": {{"family": "{FAMILY}", "name": "{TABLE}"}}}}}}]}}'
)
NO_TABLE = "No such file or directory"  # nft's error for a table that is not there

#: ``NFT_CTX_OUTPUT_JSON`` (``nftables/libnftables.h``): JSON output, and JSON
#: input tried before nft's own syntax (1.0.6 has no input flag of its own)
_OUTPUT_JSON = 1 << 4
_LIBNFTABLES = "libnftables.so.1"
_loaded: list[ctypes.CDLL | None] = []  # [] until tried, then [lib or None]


class NftError(OSError):
    """nft refused a batch (:mod:`.nft` raises it as a ``PymachineError``)."""


def libnftables() -> ctypes.CDLL | None:
    """libnftables with the prototypes used here, loaded once; None where it
    cannot be loaded (then ``nft`` runs the batch). By soname: ``find_library``
    would run ``ldconfig``."""
    if _loaded:
        return _loaded[0]
    try:
        lib: ctypes.CDLL | None = ctypes.CDLL(_LIBNFTABLES)
    except OSError:
        lib = None
    if lib is not None:
        ctx = ctypes.c_void_p
        lib.nft_ctx_new.argtypes, lib.nft_ctx_new.restype = [ctypes.c_uint], ctx
        lib.nft_ctx_free.argtypes = [ctx]
        lib.nft_ctx_output_set_flags.argtypes = [ctx, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = lib.nft_ctx_buffer_error.argtypes = [ctx]
        for getter in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            getter.argtypes, getter.restype = [ctx], ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctx, ctypes.c_char_p]
    _loaded.append(lib)
    return lib


class Context:
    """A libnftables context of this process and network namespace, kept open.

    Kept because closing a netfilter netlink socket right after a change waits
    for the kernel to release the change's objects (``nft_rcv_nl_event``
    flushes nf_tables' destroy work: an RCU grace period, 7-30 ms in a tier-1
    host, where the change itself takes ~1 ms). Left open, the socket closes
    when the process exits, after the rest of its start or stop. A context
    acts in the network namespace it was made in, as an ``nft`` child of the
    calling thread would: one of another namespace (a test's) or inherited
    through a fork is freed and replaced. Its socket is made close-on-exec
    (libnftables' is not), so no command we run inherits it.
    """

    _lock = _thread.allocate_lock()
    _current: Context | None = None

    def __init__(self, lib: ctypes.CDLL, owner: tuple[int, int]) -> None:
        self.owner = owner
        before = _sockets()
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise NftError("nft failed: libnftables could not make a context")
        for fd in _sockets() - before:  # the one nft_ctx_new opened
            os.set_inheritable(fd, False)
        lib.nft_ctx_output_set_flags(self.ctx, _OUTPUT_JSON)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    @classmethod
    def _for_caller(cls, lib: ctypes.CDLL) -> int:
        """The context for this process and the calling thread's network namespace."""
        owner = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
        current = cls._current
        if current is None or current.owner != owner:
            cls._current = None
            if current is not None:
                lib.nft_ctx_free(current.ctx)
            cls._current = current = cls(lib, owner)
        return current.ctx

    @classmethod
    def run(cls, lib: ctypes.CDLL, text: str) -> tuple[bool, str]:
        """Run ``text``: (True, output) or (False, the error text nft would print)."""
        with cls._lock:
            ctx = cls._for_caller(lib)
            ok = lib.nft_run_cmd_from_buffer(ctx, text.encode()) == 0
            # reading a buffer also empties it for the next command: read both
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        return ok, out if ok else (err.strip() or out.strip())


def _sockets() -> set[int]:
    """This process's socket descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
        except OSError:
            pass
    return found


def execute(text: str) -> tuple[bool, str]:
    """One JSON batch through libnftables; ``nft -j -f -`` where it cannot be loaded."""
    lib = libnftables()
    if lib is None:
        from machined.network.nft import _run_command

        return _run_command(text)
    return Context.run(lib, text)


def machine_of(comment: object) -> str | None:
    """The machine a rule's comment (``pymachine:web:tcp:8080:80``) names; None if not ours."""
    if not isinstance(comment, str) or not comment.startswith(COMMENT_PREFIX):
        return None
    return comment[len(COMMENT_PREFIX) :].partition(":")[0] or None


def rules_of(machine: str, listing_text: str) -> list[tuple[str, int]]:
    """(chain, handle) of the machine's rules in a JSON listing of the table."""
    found = []
    for obj in loads(listing_text).get("nftables", []):
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if rule and machine_of(rule.get("comment")) == machine:
            found.append((rule["chain"], int(rule["handle"])))
    return found


def delete_batch(rules: list[tuple[str, int]]) -> str:
    """The JSON batch deleting rules by (chain, handle)."""
    deletes = ", ".join(
        f'{{"delete": {{"rule": {{"family": "{FAMILY}", "table": "{TABLE}", '
        f'"chain": {_quoted(chain)}, "handle": {int(handle)}}}}}}}'
        for chain, handle in rules
    )
    return f'{{"nftables": [{deletes}]}}'


def _quoted(name: str) -> str:
    """A chain name as a JSON string (ours are plain words; anything else, escaped)."""
    if name.isascii() and all(c.isalnum() or c in "_-." for c in name):
        return f'"{name}"'
    import json

    return json.dumps(name)


def remove_machine(
    machine: str, execute: Callable[[str], tuple[bool, str]] = execute, attempts: int = 3
) -> int:
    """Delete every rule tagged with the machine; the number deleted (0 if none or no table).

    Found by listing the table, so nothing but the name is needed; listed again
    when a concurrent change deleted some of them first (the batch then fails whole).
    """
    for attempt in range(attempts):
        ok, output = execute(LIST_TABLE)
        if not ok:
            if NO_TABLE in output:
                return 0
            raise NftError(f"nft list table failed: {output}")
        rules = rules_of(machine, output)
        if not rules:
            return 0
        ok, output = execute(delete_batch(rules))
        if ok:
            return len(rules)
        if attempt == attempts - 1:
            raise NftError(f"nft failed: {output}")
    return 0
