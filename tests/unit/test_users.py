"""resolve() against a fake container /etc/passwd and /etc/group (no real files
of this host read), and reader_in_root(), the runtime's read of them from the host."""

from __future__ import annotations

import os
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
    real_read = users._read
    seen: list[str] = []

    def read(path: str) -> str | None:
        seen.append(path)
        return real_read(str(tmp_path) + path)

    monkeypatch.setattr(users, "_read", read)
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
    real_read = users._read
    monkeypatch.setattr(users, "_read", lambda path: real_read(str(tmp_path) + path))
    assert resolve("123:456") == User(123, 456, "/", "/bin/sh", "123", ())
    with pytest.raises(LookupError, match="'root' not found"):
        resolve("root")


def test_entries_parses_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text("# c\n\na:x:1:2:g:/h:/s\nb:x:3:4::/:\n")
    assert users._entries(str(path), users._read) == [
        ["a", "x", "1", "2", "g", "/h", "/s"],
        ["b", "x", "3", "4", "", "/", ""],
    ]
    assert users._entries(str(tmp_path / "missing"), users._read) == []


def test_with_a_dict_of_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "/etc/passwd": "svc:x:999:998::/var/lib/svc:/bin/false\n",
        "/etc/group": "svc:x:998:\ndocker:x:997:svc\n",
    }
    assert resolve("svc", files.get) == User(999, 998, "/var/lib/svc", "/bin/false", "svc", (997,))


# --- reader_in_root: the runtime reads a hostile image's files from the host ---


@pytest.fixture
def image(tmp_path: Path):
    """An image root under tmp_path/root, and an fd of it; tmp_path/host-passwd
    is a file of "the host" that no link of the image may reach."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (tmp_path / "host-passwd").write_text("alice:x:0:0::/root:/bin/sh\n")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield root, fd
    os.close(fd)


def test_reader_in_root_reads_the_images_files(image) -> None:
    root, fd = image
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    assert resolve("alice", users.reader_in_root(fd)).uid == 1000


@pytest.mark.parametrize(
    "target", ["/../host-passwd", "../../host-passwd", "/../../../host-passwd"]
)
def test_a_link_in_the_image_never_reaches_a_host_file(image, target: str) -> None:
    """/etc/passwd -> a path above the root resolves inside the root, where
    there is no such file: the host's alice (uid 0) is never found."""
    root, fd = image
    (root / "etc/passwd").symlink_to(target)
    with pytest.raises(LookupError, match="'alice' not found"):
        resolve("alice", users.reader_in_root(fd))
    (root / "host-passwd").write_text("alice:x:1000:1000::/:/bin/sh\n")  # inside: followed
    assert resolve("alice", users.reader_in_root(fd)).uid == 1000


def test_a_fifo_or_directory_is_not_read(image) -> None:
    """A FIFO as /etc/passwd would block an open for reading (or a read): it is
    not opened at all; nor is a directory."""
    root, fd = image
    os.mkfifo(root / "etc/passwd")
    (root / "etc/group").mkdir()
    read = users.reader_in_root(fd)
    assert read("/etc/passwd") is None and read("/etc/group") is None
    assert resolve("77:88", read).uid == 77


def test_a_huge_or_binary_file_is_read_bounded(image) -> None:
    root, fd = image
    (root / "etc/passwd").write_bytes(b"bob:x:5:5::/:/bin/sh\n\xff\xfe\n" + b"x" * (5 << 20))
    text = users.reader_in_root(fd)("/etc/passwd")
    assert text is not None and len(text) == users.MAX_SIZE
    assert resolve("bob", users.reader_in_root(fd)).uid == 5


def test_group_id_by_name(container: list[str]) -> None:
    """Device=: the machine's GID of the host node's group (kvm, render…)."""
    assert users.group_id("wheel") == 10
    assert users.group_id("audio") == 29
    assert users.group_id("nosuch") is None
    assert users.group_id("weird") is None  # no numeric GID: no group
    assert users.group_id("comment") is None  # a commented-out line
