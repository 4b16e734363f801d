"""machined.treecopy on real files (as root): an exact copy of a layer, links
to a previous copy only for what is unchanged, and nothing followed."""

from __future__ import annotations

import errno
import os
import time

import pytest

from machined import treecopy
from tests.unit.layers import BASE, fill_layer, tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices, trusted.* need root")


@pytest.fixture
def layer(tmp_path):
    up = tmp_path / "upper"
    up.mkdir()
    fill_layer(up)
    return up


def test_a_copy_is_exact_and_keeps_holes_and_links(layer, tmp_path) -> None:
    copied = treecopy.copy_tree(layer, tmp_path / "copy")
    assert tree(tmp_path / "copy", BASE) == tree(layer, BASE)
    assert copied.entries == len(tree(layer, BASE)) - 1  # the root is not counted
    assert copied.bytes < 1 << 20  # the 64 MiB sparse file's data only
    assert copied.linked == 0 and set(copied.index) >= {"etc/app.conf", "disk.img"}


def test_unchanged_files_are_linked_to_the_previous_copy_only(layer, tmp_path) -> None:
    first = treecopy.copy_tree(layer, tmp_path / "s1")
    trusted = time.time_ns() + 10**9  # as if s1 had started long after the files were written
    (layer / "etc" / "app.conf").write_text("port=8080\n")  # in place: same inode, new ctime
    second = treecopy.copy_tree(
        layer,
        tmp_path / "s2",
        link_dest=tmp_path / "s1",
        link_index=first.index,
        trusted_before_ns=trusted,
    )
    ino = lambda *p: os.lstat(tmp_path.joinpath(*p)).st_ino  # noqa: E731
    assert ino("s2", "bin", "suid") == ino("s1", "bin", "suid") != ino("upper", "bin", "suid")
    assert ino("s2", "disk.img") == ino("s1", "disk.img")
    assert (tmp_path / "s2" / "etc" / "app.conf").read_text() == "port=8080\n"  # copied again
    assert (tmp_path / "s1" / "etc" / "app.conf").read_text() == "port=80\n"
    assert ino("s2", "etc", "app.conf") == ino("s2", "etc", "app.link")  # its own link group
    assert second.linked == 2
    assert tree(tmp_path / "s2", BASE) == tree(layer, BASE)
    # a file written just before the previous copy began is not trusted (coarse ctimes)
    third = treecopy.copy_tree(
        layer,
        tmp_path / "s3",
        link_dest=tmp_path / "s2",
        link_index=second.index,
        trusted_before_ns=0,
    )
    assert third.linked == 0


def test_a_directory_swapped_for_a_link_is_refused_not_followed(layer, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    dir_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.lstat(layer / "etc")
        os.rename(layer / "etc", layer / "etc.old")
        os.symlink(outside, layer / "etc")  # the swap a running machine could attempt
        with pytest.raises(OSError) as caught:
            treecopy.open_same("etc", dir_fd, st, os.O_RDONLY | os.O_DIRECTORY)
        assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)  # O_NOFOLLOW|O_DIRECTORY
        os.unlink(layer / "etc")
        os.mkdir(layer / "etc")  # another directory in its place
        with pytest.raises(OSError) as caught:
            treecopy.open_same("etc", dir_fd, st, os.O_RDONLY | os.O_DIRECTORY)
        assert caught.value.errno == errno.ESTALE
    finally:
        os.close(dir_fd)
