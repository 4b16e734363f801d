"""paths.private_dirs: state directories made closed, and closed again (issue 15, item 5)."""

from __future__ import annotations

import os
import stat

from machined.paths import PRIVATE, SEARCH_ONLY, private_dirs


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_directories_and_missing_parents_are_made_closed(tmp_path):
    target = tmp_path / "var/lib/pymachine"
    private_dirs(target)
    assert _mode(target) == PRIVATE
    assert (tmp_path / "var/lib").is_dir()


def test_an_older_install_s_open_directories_are_closed(tmp_path):
    old = tmp_path / "machines"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o4777)
    private_dirs(old)
    assert _mode(old) == PRIVATE


def test_the_umask_takes_no_search_bit_a_machine_needs(tmp_path):
    previous = os.umask(0o077)
    try:
        private_dirs(tmp_path / "run", tmp_path / "run/m", mode=SEARCH_ONLY)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "run") == _mode(tmp_path / "run/m") == SEARCH_ONLY
