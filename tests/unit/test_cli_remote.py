"""``pymachine -H HOST``: which verbs become D-Bus calls to HOST's pymachined
and which run HOST's own pymachine under ssh (never this host's files)."""

from __future__ import annotations

import pytest

from machined import cli


class Exec(Exception):
    pass


@pytest.fixture
def execs(monkeypatch):
    seen: list[list[str]] = []

    def execvp(path, argv):
        seen.append(argv)
        raise Exec

    monkeypatch.setattr(cli.os, "execvp", execvp)
    for name in ("PYMACHINE_REMOTE", "DBUS_SYSTEM_BUS_ADDRESS"):  # restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return seen


@pytest.mark.parametrize("flag", ["--dry-run", "--replace"])
def test_create_dry_run_and_replace_run_on_the_other_host(execs, flag):
    with pytest.raises(Exec):
        cli._remote(["-H", "root@other", "create", "web", "--image", "tiny", flag], ["/bin/true"])
    argv = execs[0]
    assert argv[0] == "ssh" and "root@other" in argv
    assert argv[-1] == f"pymachine create web --image tiny {flag} -- /bin/true"


def test_show_runs_on_the_other_host(execs):
    with pytest.raises(Exec):
        cli._remote(["-H", "other", "show", "web", "--json"], None)
    assert execs[0][-1] == "pymachine show web --json"


def test_a_plain_create_is_a_call_of_the_other_hosts_pymachined(execs, monkeypatch):
    rest = cli._remote(["-H", "other", "create", "web", "--image", "tiny"], None)
    assert rest == ["create", "web", "--image", "tiny"] and not execs
    assert cli.os.environ["PYMACHINE_REMOTE"] == "other"
    assert "systemd-stdio-bridge" in cli.os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
