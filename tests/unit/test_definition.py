"""Pure-logic tests of machined.definition: the .machine file format and store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from machined import definition as defs
from machined.definition import (
    BindMount,
    MachineDefinition,
    from_text,
    parse_bool,
    parse_env,
    parse_seconds,
    to_text,
)
from machined.errors import InvalidInput, NotFound
from machined.network.config import NetworkConfig, NetworkMode, PortForward
from machined.paths import Paths
from machined.properties import UINT64_MAX, machine_settings, to_properties


def full_definition() -> MachineDefinition:
    return MachineDefinition(
        name="web",
        image="tiny",
        boot=False,
        command=["sh", "-c", "echo a b"],
        environment={"A": "1", "B_2": "two words", "EMPTY": "", "EQ": "x=y"},
        working_directory="/srv",
        user="nobody:nogroup",
        stop_timeout=2.5,
        binds=[BindMount("/data", "/data"), BindMount("/etc/hosts", "/etc/hosts2", True)],
        read_only=True,
        ephemeral=True,
        network=NetworkConfig(
            mode=NetworkMode.BRIDGE,
            bridge="br-test",
            address="10.219.0.5",
            ports=[PortForward("tcp", 8080, 80), PortForward("udp", 53, 5353)],
        ),
        resources={"MemoryMax": "64M", "CPUQuota": "20%", "TasksMax": "32", "AllowedCPUs": "0-1,3"},
    )


# --- round trip -----------------------------------------------------------------


def test_round_trip_every_key() -> None:
    original = full_definition()
    text = to_text(original)
    assert from_text("web", text) == original


def test_text_has_every_key_in_its_section() -> None:
    text = to_text(full_definition())
    assert text == (
        "[Machine]\n"
        "Image=tiny\n"
        "\n"
        "[Exec]\n"
        "Command=sh -c 'echo a b'\n"
        "Environment=A=1\n"
        "Environment=B_2=two words\n"
        "Environment=EMPTY=\n"
        "Environment=EQ=x=y\n"
        "WorkingDirectory=/srv\n"
        "User=nobody:nogroup\n"
        "StopTimeoutSec=2.5\n"
        "\n"
        "[Files]\n"
        "Bind=/data:/data\n"
        "Bind=/etc/hosts:/etc/hosts2:ro\n"
        "ReadOnly=yes\n"
        "Ephemeral=yes\n"
        "\n"
        "[Network]\n"
        "Mode=bridge\n"
        "Bridge=br-test\n"
        "Address=10.219.0.5\n"
        "Port=tcp:8080:80\n"
        "Port=udp:53:5353\n"
        "\n"
        "[Resources]\n"
        "MemoryMax=64M\n"
        "CPUQuota=20%\n"
        "TasksMax=32\n"
        "AllowedCPUs=0-1,3\n"
    )


def test_minimal_definition_omits_defaults() -> None:
    text = to_text(MachineDefinition(name="w", image="tiny"))
    assert "[Exec]" not in text and "[Files]" not in text and "[Resources]" not in text
    assert "Boot=" not in text and "StopTimeoutSec=" not in text
    parsed = from_text("w", text)
    assert parsed == MachineDefinition(name="w", image="tiny")
    assert parsed.stop_timeout == defs.DEFAULT_STOP_TIMEOUT


def test_boot_round_trip() -> None:
    original = MachineDefinition(name="os", image="debian", boot=True)
    text = to_text(original)
    assert "Boot=yes" in text
    assert from_text("os", text).boot is True


@pytest.mark.parametrize("mode", [NetworkMode.NONE, NetworkMode.HOST])
def test_non_bridge_mode_round_trip(mode: NetworkMode) -> None:
    original = MachineDefinition(name="w", image="tiny", network=NetworkConfig(mode=mode))
    text = to_text(original)
    assert f"Mode={mode}" in text
    assert "Bridge=" not in text and "Address=" not in text
    assert from_text("w", text).network.mode == mode


@pytest.mark.parametrize(
    "command",
    [
        ["sh", "-c", "echo a b"],
        ["/bin/echo", "it's", '"quoted"'],
        ["printf", "%s\\n", "$HOME"],
        ["x", ""],
        ["tab\there"],
    ],
)
def test_command_quoting_round_trip(command: list[str]) -> None:
    original = MachineDefinition(name="w", image="tiny", command=command)
    assert from_text("w", to_text(original)).command == command


def test_command_is_shell_split() -> None:
    d = from_text("w", "[Machine]\nImage=tiny\n[Exec]\nCommand=sh -c 'echo a b'\n")
    assert d.command == ["sh", "-c", "echo a b"]


def test_environment_repeated_later_wins() -> None:
    d = from_text(
        "w", "[Machine]\nImage=tiny\n[Exec]\nEnvironment=A=1\nEnvironment=B=2\nEnvironment=A=3\n"
    )
    assert d.environment == {"A": "3", "B": "2"}


@pytest.mark.parametrize("text", ["1", "yes", "true", "on", "YES", "True"])
def test_parse_bool_true(text: str) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "no", "false", "off", "No", "OFF"])
def test_parse_bool_false(text: str) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize(("text", "seconds"), [("10", 10.0), ("2.5s", 2.5), (" 3 ", 3.0)])
def test_parse_seconds(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1", "abc", "10ms", "1min", ""])
def test_parse_seconds_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_seconds(text)


# --- errors name file and line ----------------------------------------------------


def test_unknown_key_names_file_line_and_section() -> None:
    text = (
        "# web machine\n"  # 1
        "[Machine]\n"  # 2
        "Image=tiny\n"  # 3
        "\n"  # 4
        "[Exec]\n"  # 5
        "Command=/bin/true\n"  # 6
        "Foo=bar\n"  # 7
    )
    with pytest.raises(InvalidInput) as info:
        from_text("web", text, "/x/web.machine")
    assert str(info.value) == "/x/web.machine:7: unknown key Foo= in [Exec]"


def test_key_of_another_section_is_unknown_there() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\nCommand=/bin/true\n", "/x/w.machine")
    assert str(info.value) == "/x/w.machine:3: unknown key Command= in [Machine]"


def test_unknown_section_is_named_with_line() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Service]\nType=simple\n", "/x/w.machine")
    message = str(info.value)
    assert message.startswith("/x/w.machine:3: unknown section [Service]")
    assert "Machine, Exec, Files, Network, Resources" in message


def test_empty_unknown_section_names_line() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Service]\n", "/x/w.machine")
    assert str(info.value).startswith("/x/w.machine:3: unknown section [Service]")


def test_missing_image() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Exec]\nCommand=/bin/true\n", "/x/w.machine")
    assert str(info.value) == "/x/w.machine: [Machine] Image= is missing"


def test_empty_file_is_missing_image() -> None:
    with pytest.raises(InvalidInput, match="Image= is missing"):
        from_text("w", "", "/x/w.machine")


def test_bad_bool_names_line_and_value() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Files]\nReadOnly=maybe\n", "/x/w.machine")
    assert str(info.value) == "/x/w.machine:4: invalid boolean 'maybe': expected yes or no"


def test_bad_resource_value_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Resources]\nMemoryMax=12Q\n", "/x/w.machine")
    message = str(info.value)
    assert message.startswith("/x/w.machine:4: invalid value for MemoryMax: '12Q'")


def test_unknown_resource_key_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Resources]\nMemoryLimit=1G\n", "/x/w.machine")
    assert str(info.value).startswith("/x/w.machine:4: unknown property 'MemoryLimit'")


def test_boot_with_command_rejected() -> None:
    text = "[Machine]\nImage=tiny\nBoot=yes\n[Exec]\nCommand=/bin/sh\n"
    with pytest.raises(InvalidInput) as info:
        from_text("w", text, "/x/w.machine")
    assert str(info.value) == (
        "/x/w.machine: a boot-mode machine runs the image's init; it takes no command"
    )


def test_bad_env_name_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Exec]\nEnvironment=1A=x\n", "/x/w.machine")
    assert str(info.value) == "/x/w.machine:4: invalid environment variable name '1A'"


def test_unbalanced_quote_in_command() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Exec]\nCommand=sh -c 'oops\n", "/x/w.machine")
    assert str(info.value).startswith('/x/w.machine:4: invalid command "sh -c \'oops"')


def test_bad_bind_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Files]\nBind=data:/data\n", "/x/w.machine")
    assert str(info.value).startswith("/x/w.machine:4: invalid bind 'data:/data'")


def test_bad_network_mode_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=tiny\n[Network]\nMode=nat\n", "/x/w.machine")
    assert str(info.value) == (
        "/x/w.machine:4: invalid network mode 'nat': expected none, host or bridge"
    )


def test_bad_image_name_in_file() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "[Machine]\nImage=../etc\n", "/x/w.machine")
    assert str(info.value).startswith("/x/w.machine: invalid image name '../etc'")


def test_relative_working_directory_rejected() -> None:
    with pytest.raises(InvalidInput, match="must be absolute"):
        from_text("w", "[Machine]\nImage=tiny\n[Exec]\nWorkingDirectory=srv\n", "/x/w.machine")


def test_ports_need_bridge_mode() -> None:
    text = "[Machine]\nImage=tiny\n[Network]\nMode=host\nPort=8080\n"
    with pytest.raises(InvalidInput, match="Port= needs Mode=bridge"):
        from_text("w", text, "/x/w.machine")


def test_duplicate_host_port_rejected() -> None:
    text = "[Machine]\nImage=tiny\n[Network]\nPort=8080:80\nPort=tcp:8080:81\n"
    with pytest.raises(InvalidInput, match="duplicate host port tcp:8080"):
        from_text("w", text, "/x/w.machine")


def test_malformed_file_error_names_path() -> None:
    with pytest.raises(InvalidInput) as info:
        from_text("w", "Image=tiny\n", "/x/w.machine")
    assert str(info.value).startswith("/x/w.machine:1:")


# --- validate ---------------------------------------------------------------------


def test_validate_rejects_non_positive_stop_timeout() -> None:
    with pytest.raises(InvalidInput, match="stop timeout"):
        MachineDefinition(name="w", image="tiny", stop_timeout=0).validate()


def test_validate_rejects_bad_machine_name() -> None:
    with pytest.raises(InvalidInput, match="invalid machine name"):
        MachineDefinition(name="../w", image="tiny").validate()


def test_validate_returns_self() -> None:
    d = MachineDefinition(name="w", image="tiny")
    assert d.validate() is d


# --- binds and environment ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bind"),
    [
        ("/a:/b:ro", BindMount("/a", "/b", True)),
        ("/a:/b:rw", BindMount("/a", "/b", False)),
        ("/a:/b", BindMount("/a", "/b", False)),
        ("/a", BindMount("/a", "/a", False)),
        ("/a:ro", BindMount("/a", "/a", True)),
        ("/ro", BindMount("/ro", "/ro", False)),
        ("/with space:/x", BindMount("/with space", "/x", False)),
    ],
)
def test_bind_parse(text: str, bind: BindMount) -> None:
    assert BindMount.parse(text) == bind


@pytest.mark.parametrize(
    "text",
    ["relative:/b", "/a:relative", "", "/a:", ":/b", "/a:/b:/c", "/a:/b:ro:ro", "ro", "/a:/b:RO"],
)
def test_bind_parse_rejects_shape(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        BindMount.parse(text)
    assert f"invalid bind {text!r}" in str(info.value)
    assert "expected /HOST/PATH" in str(info.value)


@pytest.mark.parametrize("text", ["/a/../etc:/b", "/a:/b/..", "/..:/x", "/a/..:/b:ro"])
def test_bind_parse_rejects_dotdot(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        BindMount.parse(text)
    assert str(info.value) == f"invalid bind {text!r}: '..' is not allowed"


def test_bind_dotdot_inside_a_name_is_fine() -> None:
    assert BindMount.parse("/a..b:/c") == BindMount("/a..b", "/c")


def test_bind_str_round_trip() -> None:
    for text in ("/a:/b:ro", "/a:/b"):
        assert str(BindMount.parse(text)) == text
    assert str(BindMount.parse("/a")) == "/a:/a"


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("A=x", ("A", "x")),
        ("_a1=", ("_a1", "")),
        ("PATH=/bin:/usr/bin", ("PATH", "/bin:/usr/bin")),
        ("X=a=b", ("X", "a=b")),
    ],
)
def test_parse_env(text: str, pair: tuple[str, str]) -> None:
    assert parse_env(text) == pair


@pytest.mark.parametrize(
    ("text", "name"), [("1A=x", "1A"), ("A-B=x", "A-B"), ("=x", ""), ("É=x", "É"), ("A B=x", "A B")]
)
def test_parse_env_rejects_names(text: str, name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_env(text)
    assert str(info.value) == f"invalid environment variable name {name!r}"


def test_parse_env_needs_equals() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_env("FOO")
    assert "expected NAME=VALUE" in str(info.value) and "'FOO'" in str(info.value)


# --- the store ----------------------------------------------------------------------


def test_save_and_load(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    original = full_definition()
    path = defs.save(original, paths)
    assert path == tmp_path / "etc/pymachine/web.machine"
    assert path.read_text() == to_text(original)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert defs.load("web", paths) == original
    assert defs.exists("web", paths)


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    defs.save(MachineDefinition(name="web", image="one"), paths)
    defs.save(MachineDefinition(name="web", image="two"), paths)
    assert os.listdir(tmp_path / "etc/pymachine") == ["web.machine"]
    assert defs.load("web", paths).image == "two"


def test_save_validates_first(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    bad = MachineDefinition(name="web", image="tiny", resources={"MemoryMax": "12Q"})
    with pytest.raises(InvalidInput, match="12Q"):
        defs.save(bad, paths)
    assert not (tmp_path / "etc/pymachine/web.machine").exists()


def test_save_uses_pymachine_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYMACHINE_ROOT", str(tmp_path))
    defs.save(MachineDefinition(name="envroot", image="tiny"))
    assert (tmp_path / "etc/pymachine/envroot.machine").is_file()
    assert defs.list_names() == ["envroot"]


def test_load_missing_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        defs.load("ghost", Paths(tmp_path))
    assert "machine 'ghost' not found" in str(info.value)
    assert str(tmp_path / "etc/pymachine/ghost.machine") in str(info.value)
    assert info.value.exit_code == 4


def test_load_rejects_bad_name_before_touching_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="invalid machine name"):
        defs.load("../../etc/passwd", Paths(tmp_path))


def test_load_error_names_real_path(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    path = paths.definition_file("web")
    path.parent.mkdir(parents=True)
    path.write_text("[Machine]\nImage=tiny\nBogus=1\n")
    with pytest.raises(InvalidInput) as info:
        defs.load("web", paths)
    assert str(info.value) == f"{path}:3: unknown key Bogus= in [Machine]"


def test_load_binary_file(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    path = paths.definition_file("web")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidInput) as info:
        defs.load("web", paths)
    assert str(info.value) == f"{path}:1: not a text file (invalid UTF-8: byte 0xff)"


def test_list_names(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    assert defs.list_names(paths) == []  # no directory at all
    for name in ("zeta", "alpha", "mid"):
        defs.save(MachineDefinition(name=name, image="tiny"), paths)
    (paths.definitions / ".alpha.machine.tmp123").write_text("x")
    (paths.definitions / ".hidden.machine").write_text("x")
    (paths.definitions / "notes.txt").write_text("x")
    assert defs.list_names(paths) == ["alpha", "mid", "zeta"]


def test_list_definitions_skips_broken(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    defs.save(MachineDefinition(name="good", image="tiny"), paths)
    (paths.definitions / "bad.machine").write_text("[Machine]\n")
    assert [d.name for d in defs.list_definitions(paths)] == ["good"]


def test_exists_false(tmp_path: Path) -> None:
    assert not defs.exists("web", Paths(tmp_path))


# --- bugs ---------------------------------------------------------------------------


def test_infinite_stop_timeout_is_rejected_or_usable() -> None:
    try:
        d = from_text("w", "[Machine]\nImage=tiny\n[Exec]\nStopTimeoutSec=infinity\n")
    except InvalidInput:
        return
    props = to_properties(machine_settings("w", {}, d.stop_timeout, ["/bin/x"], {}))
    assert [p.value for p in props if p.name == "TimeoutStopUSec"] == [UINT64_MAX]


def test_long_stop_timeout_round_trip() -> None:
    original = MachineDefinition(name="w", image="tiny", stop_timeout=1234567)
    assert from_text("w", to_text(original)).stop_timeout == 1234567


def test_environment_whitespace_round_trip() -> None:
    original = MachineDefinition(name="w", image="tiny", environment={"PAD": "  x  "})
    assert from_text("w", to_text(original)).environment == {"PAD": "  x  "}


@pytest.mark.parametrize(
    "changes",
    [
        {"environment": {"A": "x\n[Files]\nBind=/:/host"}},
        {"working_directory": "/srv\nUser=root"},
        {"command": ["/bin/echo", "line1\nline2"]},
    ],
    ids=["environment", "workdir", "command"],
)
def test_newline_in_values_cannot_inject_keys(tmp_path: Path, changes: dict) -> None:
    paths = Paths(tmp_path)
    evil = MachineDefinition(name="w", image="tiny", **changes)
    try:
        defs.save(evil, paths)
    except InvalidInput:
        return  # refusing the value is a fix too
    assert defs.load("w", paths) == evil


def test_reading_a_plain_definition_does_not_load_the_security_module() -> None:
    """start/list/status read definitions: ctypes and the seccomp tables only when
    a key needs them."""
    import subprocess
    import sys

    code = (
        "import sys; from machined.definition import from_text; "
        "d = from_text('m', '[Machine]\\nImage=i\\n[Exec]\\nPrivateUsers=no\\n'); "
        "print(d.private_users, 'machined.runtime.security' in sys.modules)"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.split() == ["no", "False"]


def test_reading_a_definition_without_resources_does_not_load_properties() -> None:
    """The runtime reads the definition on every start and needs no [Resources]
    parsing (systemd applies those): machined.properties only for that section."""
    import subprocess
    import sys

    code = (
        "import sys; from machined.definition import from_text; "
        "d = from_text('m', '[Machine]\\nImage=i\\n[Exec]\\nStopTimeoutSec=5\\n'); "
        "a = 'machined.properties' in sys.modules; "
        "from_text('m', '[Machine]\\nImage=i\\n[Resources]\\nMemoryMax=1G\\n'); "
        "print(d.stop_timeout, a, 'machined.properties' in sys.modules)"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True)
    assert out.split() == ["5.0", "False", "True"]


def test_notify_reads_and_writes_back() -> None:
    text = "[Machine]\nImage=tiny\n[Exec]\nNotify=yes\n"
    parsed = defs.from_text("web", text)
    assert parsed.notify == "yes"
    assert "Notify=yes" in defs.to_text(parsed)
    assert "Notify" not in defs.to_text(defs.from_text("web", "[Machine]\nImage=t\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[Exec]\nNotify=maybe\n", "invalid boolean"),
        ("[Machine]\nBoot=yes\n[Exec]\nHealthCmd=true\nNotify=healthy\n", "boot-mode"),
    ],
)
def test_notify_refuses_what_it_cannot_do(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        defs.from_text(
            "web",
            text.replace("[Machine]\n", "[Machine]\nImage=tiny\n")
            if "[Machine]" in text
            else "[Machine]\nImage=tiny\n" + text,
        )


@pytest.mark.parametrize(
    "text, stored",
    [
        ("/dev/fuse", "/dev/fuse"),
        ("/dev/kvm:rwm", "/dev/kvm"),
        ("/dev/dri/renderD128:wr", "/dev/dri/renderD128:rw"),
        ("/dev/net/tun:r", "/dev/net/tun:r"),
    ],
)
def test_device_lines_read_and_write_back(text: str, stored: str) -> None:
    parsed = defs.from_text("web", f"[Machine]\nImage=tiny\n[Files]\nDevice={text}\n")
    assert f"Device={stored}\n" in defs.to_text(parsed)


@pytest.mark.parametrize(
    "text",
    ["/etc/passwd", "/dev/../etc/shadow", "/dev/", "/dev/fuse:x", "/dev/fuse:rr", "/dev/fuse:",
     "/dev/a b", "/dev//fuse", "dev/fuse", "/dev/fuse/"],
)  # fmt: skip
def test_device_lines_outside_dev_or_with_bad_access_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid device"):
        defs.from_text("web", f"[Machine]\nImage=tiny\n[Files]\nDevice={text}\n")


def test_health_keys_read_and_write_back() -> None:
    text = (
        "[Machine]\nImage=tiny\n[Exec]\nNotify=healthy\nHealthCmd=curl -f localhost || exit 1\n"
        "HealthInterval=5\nHealthTimeout=2.5\nHealthRetries=4\nHealthStartPeriod=10\n"
        "HealthOnFailure=restart\n"
    )
    parsed = defs.from_text("web", text)
    assert parsed.health.init_arguments() == [
        "--health-cmd", "curl -f localhost || exit 1", "--health-interval", "5.0",
        "--health-timeout", "2.5", "--health-retries", "4", "--health-start-period", "10.0",
        "--health-on-failure", "restart",
    ]  # fmt: skip
    assert defs.from_text("web", defs.to_text(parsed)) == parsed


@pytest.mark.parametrize(
    "lines, message",
    [
        ("Notify=healthy\n", "needs a HealthCmd"),
        ("HealthCmd=true\nHealthOnFailure=reboot\n", "HealthOnFailure"),
        ("HealthCmd=true\nHealthRetries=0\n", "HealthRetries"),
        ("HealthCmd=true\nHealthInterval=0\n", "duration"),
        ("HealthCmd= \n", "HealthCmd"),
    ],
)
def test_health_keys_refuse_what_they_cannot_do(lines: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        defs.from_text("web", "[Machine]\nImage=tiny\n[Exec]\n" + lines)


def test_boot_mode_takes_guest_health_and_a_health_command() -> None:
    base = "[Machine]\nImage=tiny\nBoot=yes\n[Exec]\n"
    parsed = defs.from_text("os", base + "HealthOnFailure=restart\nHealthInterval=5\n")
    assert (parsed.health.on_failure, parsed.health.interval) == ("restart", 5.0)
    assert parsed.health.watched()
    checked = defs.from_text("os", base + "HealthCmd=systemctl is-active nginx\n")
    assert checked.health.watched() and checked.health.on_failure == "none"
    assert not defs.from_text("os", base).health.watched()
    with pytest.raises(InvalidInput, match="Notify=healthy is not supported for boot-mode"):
        defs.from_text("os", base + "HealthCmd=true\nNotify=healthy\n")


def test_watchdog_and_restart_read_and_write_back() -> None:
    text = "[Machine]\nImage=tiny\n[Exec]\nWatchdogSec=2.5\nRestart=on-watchdog\n"
    parsed = defs.from_text("web", text)
    assert (parsed.watchdog, parsed.restart) == (2.5, "on-watchdog")
    assert "WatchdogSec=2.5\nRestart=on-watchdog\n" in defs.to_text(parsed)
    assert defs.from_text("web", defs.to_text(parsed)) == parsed
    plain = defs.to_text(defs.from_text("web", "[Machine]\nImage=t\n"))
    assert "WatchdogSec" not in plain and "Restart" not in plain
    off = defs.from_text("web", "[Machine]\nImage=t\n[Exec]\nWatchdogSec=0\n")
    assert off.watchdog is None  # systemd's "off"


@pytest.mark.parametrize(
    "lines, message",
    [
        ("[Exec]\nWatchdogSec=-1\n", "invalid duration"),
        ("[Exec]\nWatchdogSec=soon\n", "invalid duration"),
        ("[Exec]\nRestart=sometimes\n", "invalid Restart= 'sometimes'"),
        ("[Exec]\nRestart=on-failure; rm -rf /\n", "invalid Restart="),
        ("[Machine]\nBoot=yes\n[Exec]\nWatchdogSec=5\n", "not supported for boot-mode"),
    ],
)
def test_watchdog_and_restart_refuse_what_they_cannot_do(lines: str, message: str) -> None:
    text = "[Machine]\nImage=tiny\n" + lines.replace("[Machine]\n", "")
    with pytest.raises(InvalidInput, match=message):
        defs.from_text("web", text)
