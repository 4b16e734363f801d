"""The compiled seccomp programs' cache (security.seccomp_programs): the same
programs as a compile, no compile on a hit, one entry per policy, recovery
from a damaged entry."""

from __future__ import annotations

import marshal
import stat

import pytest

from machined.runtime import security

DENIED = ("kexec_load", "init_module", "swapon")


def test_a_hit_returns_the_compiled_programs_without_compiling(tmp_path, monkeypatch):
    cache = tmp_path / "seccomp"
    first = security.seccomp_programs(DENIED, cache)
    assert first == security.compile_seccomp(DENIED)
    assert len(list(cache.iterdir())) == 1
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # root's, on the runtime tmpfs

    def no_compile(*_args, **_kwargs):
        raise AssertionError("compiled although cached")

    monkeypatch.setattr(security, "compile_seccomp", no_compile)
    assert security.seccomp_programs(DENIED, cache) == first


def test_each_policy_has_its_own_entry(tmp_path):
    cache = tmp_path / "seccomp"
    a = security.seccomp_programs(DENIED, cache)
    b = security.seccomp_programs((*DENIED, "reboot"), cache)
    assert a != b and len(list(cache.iterdir())) == 2
    assert security.seccomp_programs(DENIED, cache) == a


@pytest.mark.parametrize("damage", [b"", b"not marshal", b"\xe9\x01\x00\x00\x00"])
def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path, damage):
    cache = tmp_path / "seccomp"
    good = security.seccomp_programs(DENIED, cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(damage)
    assert security.seccomp_programs(DENIED, cache) == good
    assert marshal.loads(entry.read_bytes())[1] == good  # the entry is replaced


def test_without_a_cache_directory_it_compiles(tmp_path):
    assert security.seccomp_programs(DENIED, None) == security.compile_seccomp(DENIED)


def test_restrictions_use_the_cache(tmp_path):
    policy = security.policy_for(object())
    cache = tmp_path / "seccomp"
    restrictions = security.restrictions(policy, cache)
    assert restrictions["seccomp_programs"] == security.compile_seccomp(policy.denied_syscalls)
    assert len(list(cache.iterdir())) == 1


def test_an_entry_of_another_key_under_the_same_name_is_a_miss(tmp_path, monkeypatch):
    """Entries are named by a short checksum; the whole key inside decides."""
    cache = tmp_path / "seccomp"
    security.seccomp_programs(DENIED, cache)
    (entry,) = cache.iterdir()
    _key, programs = marshal.loads(entry.read_bytes())
    entry.write_bytes(marshal.dumps(("some other key", [b"not these programs"])))
    assert security.seccomp_programs(DENIED, cache) == programs
