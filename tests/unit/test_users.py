"""resolve() against a fake container /etc/passwd and /etc/group (no real files read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from machined.runtime import users
from machined.runtime.users import User, resolve

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment line
alice:x:1000:1000:Alice,,,:/home/alice:/bin/zsh

bob:x:1001:100::/home/bob:
nohome:x:1002:1002:::
broken:line
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""

GROUP = """\
root:x:0:
users:x:100:alice,bob
wheel:x:10:alice
alice:x:1000:
audio:x:29:bob,alice,carol
# comment:x:5:alice
nogroup:x:65534:
weird:x:notanumber:alice
short:x
"""


@pytest.fixture
def container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The container's /etc under tmp_path; resolve() reads only these files.

    Returns the list of paths resolve() asked for."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(PASSWD)
    (tmp_path / "etc/group").write_text(GROUP)
    real_entries = users._entries
    seen: list[str] = []

    def entries(path: str) -> list[list[str]]:
        seen.append(path)
        return real_entries(str(tmp_path) + path)

    monkeypatch.setattr(users, "_entries", entries)
    return seen


def test_reads_the_containers_passwd_and_group(container: list[str]) -> None:
    resolve("alice")
    assert container == ["/etc/passwd", "/etc/group"]


@pytest.mark.parametrize("spec", [None, "", "root", "0"])
def test_default_and_root(container: list[str], spec: str | None) -> None:
    assert resolve(spec) == User(0, 0, "/root", "/bin/bash", "root", ())


def test_by_name_with_supplementary_groups(container: list[str]) -> None:
    assert resolve("alice") == User(1000, 1000, "/home/alice", "/bin/zsh", "alice", (100, 10, 29))


def test_by_uid_finds_the_name(container: list[str]) -> None:
    assert resolve("1000") == resolve("alice")


def test_empty_shell_defaults_to_bin_sh(container: list[str]) -> None:
    assert resolve("bob") == User(1001, 100, "/home/bob", "/bin/sh", "bob", (100, 29))


def test_empty_home_defaults_to_root_dir(container: list[str]) -> None:
    user = resolve("nohome")
    assert (user.home, user.shell, user.uid, user.gid) == ("/", "/bin/sh", 1002, 1002)


def test_unknown_numeric_uid(container: list[str]) -> None:
    assert resolve("4242") == User(4242, 4242, "/", "/bin/sh", "4242", ())


def test_unknown_numeric_uid_and_gid(container: list[str]) -> None:
    assert resolve("4242:4343") == User(4242, 4343, "/", "/bin/sh", "4242", ())


def test_group_by_name(container: list[str]) -> None:
    user = resolve("alice:audio")
    assert (user.uid, user.gid) == (1000, 29)
    assert user.groups == (100, 10, 29)


def test_group_by_gid(container: list[str]) -> None:
    assert resolve("alice:10").gid == 10


def test_unknown_numeric_gid(container: list[str]) -> None:
    assert resolve("bob:5555").gid == 5555


def test_uid_and_known_gid(container: list[str]) -> None:
    user = resolve("0:100")
    assert (user.name, user.uid, user.gid) == ("root", 0, 100)


def test_unknown_user_name(container: list[str]) -> None:
    with pytest.raises(LookupError) as info:
        resolve("mallory")
    assert str(info.value) == "user 'mallory' not found in the machine's /etc/passwd"


def test_unknown_group_name(container: list[str]) -> None:
    with pytest.raises(LookupError) as info:
        resolve("alice:nosuch")
    assert str(info.value) == "group 'nosuch' not found in the machine's /etc/group"


def test_commented_and_malformed_lines_are_ignored(container: list[str]) -> None:
    with pytest.raises(LookupError):
        resolve("broken")  # only two fields
    with pytest.raises(LookupError):
        resolve("alice:comment")  # commented-out group
    with pytest.raises(LookupError):
        resolve("alice:short")  # too few fields


def test_carol_is_member_but_has_no_passwd_entry(container: list[str]) -> None:
    with pytest.raises(LookupError):
        resolve("carol")


def test_missing_files_only_numeric_ids_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_entries = users._entries
    monkeypatch.setattr(users, "_entries", lambda path: real_entries(str(tmp_path) + path))
    assert resolve("123:456") == User(123, 456, "/", "/bin/sh", "123", ())
    with pytest.raises(LookupError, match="'root' not found"):
        resolve("root")


def test_entries_parses_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# c\n\na:x:1:2:g:/h:/s\nb:x:3:4::/:\n")
    assert users._entries(str(path)) == [
        ["a", "x", "1", "2", "g", "/h", "/s"],
        ["b", "x", "3", "4", "", "/", ""],
    ]
    assert users._entries(str(tmp_path / "missing")) == []


def test_with_a_dict_of_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "/etc/passwd": [["svc", "x", "999", "998", "", "/var/lib/svc", "/bin/false"]],
        "/etc/group": [["svc", "x", "998", ""], ["docker", "x", "997", "svc"]],
    }
    monkeypatch.setattr(users, "_entries", lambda path: files.get(path, []))
    assert resolve("svc") == User(999, 998, "/var/lib/svc", "/bin/false", "svc", (997,))
