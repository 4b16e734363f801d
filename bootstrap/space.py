"""A disk-space budget for imports: refuse cleanly before the file system fills up.

A few KiB of archive can ask for GiBs (a compressed run of zeros, a sparse
member). Holes are kept as holes, so what counts is what gets written: every
entry charges its blocks and an inode before it is written, and the import
stops with one clear line (exit 1) once the free space, less a reserve for
the rest of the host, would run out. The staging dir is then removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from machined.cli.output import human_bytes
from machined.errors import PymachineError

RESERVE_FRACTION = 100  # keep 1% of the file system free …
RESERVE_MAX = 256 << 20  # … but never more than this


class NoSpace(PymachineError):
    """The import would not fit (or the file system filled up while writing)."""


@dataclass
class SpaceBudget:
    where: str
    free: int  # bytes available when the import started
    reserve: int
    block: int
    bytes_left: int
    inodes_left: int | None  # None: the file system does not count inodes (btrfs)

    @classmethod
    def for_path(cls, path: str | os.PathLike[str]) -> SpaceBudget:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        reserve = min(st.f_blocks * st.f_frsize // RESERVE_FRACTION, RESERVE_MAX)
        inodes = None if st.f_files == 0 else st.f_favail - st.f_files // RESERVE_FRACTION
        return cls(
            where=os.fspath(path),
            free=free,
            reserve=reserve,
            block=max(st.f_frsize, 512),
            bytes_left=free - reserve,
            inodes_left=inodes,
        )

    def charge(self, nbytes: int, inodes: int = 0) -> None:
        """Account for ``nbytes`` of data (rounded up to blocks) and ``inodes`` new inodes."""
        self.bytes_left -= -(-nbytes // self.block) * self.block
        if self.inodes_left is not None:
            self.inodes_left -= inodes
        if self.bytes_left < 0:
            raise NoSpace(
                f"not enough space for this image in {os.path.dirname(self.where)}: "
                f"it needs more than the {human_bytes(self.free)} free "
                f"(keeping {human_bytes(self.reserve)} for the rest of the system)"
            )
        if self.inodes_left is not None and self.inodes_left < 0:
            raise NoSpace(
                f"not enough inodes for this image in {os.path.dirname(self.where)}: "
                "the archive has more entries than the file system has room for"
            )
