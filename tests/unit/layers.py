"""A writable layer with what overlayfs and a distribution leave in one, and
what a user checks of a tree: shared by the backup and tree-copy tests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

BASE = 0x00100000  # the source machine's UID range


def fill_layer(up: Path) -> None:
    """A layer with what overlayfs and a distribution leave in one."""
    (up / "etc").mkdir()
    (up / "etc" / "app.conf").write_text("port=80\n")
    os.link(up / "etc" / "app.conf", up / "etc" / "app.link")
    (up / "bin").mkdir()
    (up / "bin" / "suid").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    with open(up / "disk.img", "wb") as f:  # sparse: 3 data pieces in 64 MiB
        f.write(b"head")
        f.seek(20 << 20)
        f.write(b"middle" * 1000)
        f.seek((64 << 20) - 3)
        f.write(b"end")
    os.mknod(up / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # a whiteout
    os.mkfifo(up / "fifo")
    os.symlink("/usr/lib/os-release", up / "os-release")
    os.symlink("../../../../../../etc/shadow", up / "etc" / "climbing")
    (up / "opaque").mkdir()
    os.setxattr(up / "opaque", "trusted.overlay.opaque", b"y")
    os.setxattr(up / "etc" / "app.conf", "user.note", b"\x00\xffbinary")
    acl = bytes.fromhex("0200000001000600ffffffff04000400ffffffff10000600ffffffff20000400ffffffff")
    os.setxattr(up / "etc", "system.posix_acl_default", acl)
    for path in [up, *up.rglob("*")]:
        inside = 0 if path == up else 1000
        os.lchown(path, BASE + inside, BASE + inside + 1)
    os.lchown(up / "gone", 0, 0)  # overlayfs makes whiteouts as its mounter: host root
    os.chown(up / "bin" / "suid", BASE, BASE)
    os.chmod(up / "bin" / "suid", 0o4755)  # after the chown, which clears it
    os.setxattr(up / "bin" / "suid", "security.capability", _cap_net_raw())
    os.utime(up / "etc" / "app.conf", ns=(1, 1_600_000_000_123_456_789))


def _cap_net_raw() -> bytes:
    """VFS_CAP_REVISION_2, effective, permitted = CAP_NET_RAW (13)."""
    return (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def tree(root: Path, base: int) -> dict:
    """What a user would check of a tree: every entry's type, mode, owner
    relative to BASE, data digest, link target, device, xattrs, mtime, link
    group, and a sparse file's allocation."""
    result = {}
    inodes: dict[int, str] = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        entry = {
            "mode": oct(st.st_mode),
            "owner": (st.st_uid - base, st.st_gid - base),
            "xattrs": {
                n: os.getxattr(path, n, follow_symlinks=False).hex()
                for n in sorted(os.listxattr(path, follow_symlinks=False))
            },
        }
        if not stat.S_ISDIR(st.st_mode):
            entry["mtime"] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            entry["sha"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["sparse"] = st.st_blocks * 512 < st.st_size // 2
            entry["group"] = inodes.setdefault(st.st_ino, rel)
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode):
            entry["rdev"] = st.st_rdev
        result[rel] = entry
    return result
