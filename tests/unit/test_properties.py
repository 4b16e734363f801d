"""Pure-logic tests of machined.properties: resource-control syntax → D-Bus properties."""

from __future__ import annotations

import shlex

import pytest

from machined.errors import ExitCode, InvalidInput
from machined.properties import (
    RESOURCE_KEYS,
    STOP_TIMEOUT_MARGIN,
    UINT32_MAX,
    UINT64_MAX,
    Property,
    cpu_set_mask,
    machine_settings,
    parse_assignment,
    parse_cpu_set,
    parse_resource,
    resource_properties,
    to_properties,
)

K, M, G, T, P, E = (1024**i for i in range(1, 7))


def one(key: str, value: str) -> Property:
    props = parse_resource(key, value)
    assert len(props) == 1
    return props[0]


# --- memory -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("1K", K),
        ("64M", 64 * M),
        ("2G", 2 * G),
        ("1.5G", 1536 * M),
        ("0.5K", 512),
        ("3T", 3 * T),
        ("1P", P),
        ("15E", 15 * E),
    ],
)
def test_memory_sizes_are_base_1024(value: str, expected: int) -> None:
    assert one("MemoryMax", value) == Property("MemoryMax", "t", expected)


@pytest.mark.parametrize(
    "key", ["MemoryMax", "MemoryHigh", "MemoryLow", "MemoryMin", "MemorySwapMax"]
)
def test_every_memory_key_uses_its_own_name(key: str) -> None:
    assert one(key, "1M") == Property(key, "t", M)
    assert one(key, "infinity") == Property(key, "t", UINT64_MAX)
    assert one(key, "50%").name == f"{key}Scale"


def test_memory_infinity_is_uint64_max() -> None:
    assert one("MemoryMax", "infinity") == Property("MemoryMax", "t", 2**64 - 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100%", UINT32_MAX),
        ("50%", UINT32_MAX // 2),
        ("10%", 429496729),
        ("0%", 0),
        ("12.5%", 536870911),
    ],
)
def test_memory_percent_becomes_scale_of_uint32(value: str, expected: int) -> None:
    assert one("MemoryMax", value) == Property("MemoryMaxScale", "u", expected)


def test_value_is_stripped_of_surrounding_whitespace() -> None:
    assert one("MemoryMax", "  1G  ") == Property("MemoryMax", "t", G)


@pytest.mark.parametrize(
    "value",
    ["12Q", "", "G", "1.5.G", "-1G", "1 G", "1g", "101%", "-5%", "abc%", "%", "16E", "infinite"],
)
def test_memory_rejects_bad_values_naming_key_and_value(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("MemoryMax", value)
    message = str(info.value)
    assert "MemoryMax" in message
    assert repr(value.strip()) in message
    assert "K/M/G/T/P/E" in message  # says what would have been accepted
    assert info.value.exit_code == ExitCode.INVALID


def test_memory_max_12q_message_is_exact() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("MemoryMax", "12Q")
    assert str(info.value) == (
        "invalid value for MemoryMax: '12Q' "
        "(expected bytes with K/M/G/T/P/E suffix (base 1024), N% of RAM, or infinity)"
    )


# --- CPU quota ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "usec"),
    [
        ("20%", 200_000),
        ("100%", 1_000_000),
        ("150%", 1_500_000),
        ("400%", 4_000_000),
        ("2.5%", 25_000),
    ],
)
def test_cpu_quota_percent_to_usec_per_second(value: str, usec: int) -> None:
    assert parse_resource("CPUQuota", value) == [Property("CPUQuotaPerSecUSec", "t", usec)]


def test_cpu_quota_infinity() -> None:
    assert parse_resource("CPUQuota", "infinity") == [
        Property("CPUQuotaPerSecUSec", "t", UINT64_MAX)
    ]


@pytest.mark.parametrize("value", ["0%", "abc", "20", "-10%", "abc%", "%", "20 percent"])
def test_cpu_quota_rejects(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("CPUQuota", value)
    message = str(info.value)
    assert "CPUQuota" in message and repr(value) in message
    assert "percentage" in message


# --- weights --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["CPUWeight", "IOWeight"])
@pytest.mark.parametrize("value", ["1", "100", "10000"])
def test_weights_in_range(key: str, value: str) -> None:
    assert one(key, value) == Property(key, "t", int(value))


@pytest.mark.parametrize("key", ["CPUWeight", "IOWeight"])
@pytest.mark.parametrize("value", ["0", "10001", "-1", "1.5", "abc", "", "50%"])
def test_weights_out_of_range(key: str, value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource(key, value)
    assert key in str(info.value)
    assert "1 to 10000" in str(info.value)


def test_cpu_weight_idle_is_zero() -> None:
    assert one("CPUWeight", "idle") == Property("CPUWeight", "t", 0)


def test_io_weight_has_no_idle() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("IOWeight", "idle")
    assert "idle" not in str(info.value).split("expected", 1)[1]


# --- tasks ------------------------------------------------------------------------


def test_tasks_max_values() -> None:
    assert one("TasksMax", "1") == Property("TasksMax", "t", 1)
    assert one("TasksMax", "4096") == Property("TasksMax", "t", 4096)
    assert one("TasksMax", "infinity") == Property("TasksMax", "t", UINT64_MAX)
    assert one("TasksMax", "25%") == Property("TasksMaxScale", "u", int(0.25 * UINT32_MAX))


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "", "101%"])
def test_tasks_max_rejects(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("TasksMax", value)
    assert "TasksMax" in str(info.value)
    assert "positive integer" in str(info.value)


# --- CPU sets ---------------------------------------------------------------------


def test_allowed_cpus_mask() -> None:
    assert parse_resource("AllowedCPUs", "0-1,3") == [Property("AllowedCPUs", "ay", b"\x0b")]


def test_allowed_memory_nodes_uses_same_syntax() -> None:
    assert parse_resource("AllowedMemoryNodes", "0") == [
        Property("AllowedMemoryNodes", "ay", b"\x01")
    ]


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0", [0]),
        ("0-3,6", [0, 1, 2, 3, 6]),
        ("6,0-3", [0, 1, 2, 3, 6]),
        ("1,1,1-2", [1, 2]),
        ("0 2", [0, 2]),
        ("5-5", [5]),
        ("0,,2", [0, 2]),
        ("8191", [8191]),
    ],
)
def test_parse_cpu_set(text: str, cpus: list[int]) -> None:
    assert parse_cpu_set("AllowedCPUs", text) == cpus


@pytest.mark.parametrize("text", ["", ",", "3-1", "a", "0-", "-1", "8192", "0-8192", "1.5"])
def test_parse_cpu_set_rejects(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_cpu_set("AllowedCPUs", text)
    assert "AllowedCPUs" in str(info.value)
    assert "CPU list" in str(info.value)


@pytest.mark.parametrize(
    ("cpus", "mask"),
    [
        ([0], b"\x01"),
        ([7], b"\x80"),
        ([8], b"\x00\x01"),
        ([0, 1, 3], b"\x0b"),
        ([0, 9, 17], b"\x01\x02\x02"),
        (list(range(16)), b"\xff\xff"),
    ],
)
def test_cpu_set_mask_little_endian_bits(cpus: list[int], mask: bytes) -> None:
    assert cpu_set_mask(cpus) == mask


# --- keys, assignments ------------------------------------------------------------


def test_unknown_key_is_named_with_the_known_ones() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_resource("MemoryLimit", "1G")
    message = str(info.value)
    assert "'MemoryLimit'" in message
    for key in ("MemoryMax", "CPUQuota", "TasksMax"):
        assert key in message


def test_keys_are_case_sensitive() -> None:
    with pytest.raises(InvalidInput, match="memorymax"):
        parse_resource("memorymax", "1G")


def test_resource_keys_listed() -> None:
    assert set(RESOURCE_KEYS) >= {
        "MemoryMax",
        "MemoryHigh",
        "CPUQuota",
        "CPUWeight",
        "IOWeight",
        "TasksMax",
        "AllowedCPUs",
    }


def test_parse_assignment_returns_stripped_key_and_value() -> None:
    assert parse_assignment("MemoryMax=64M") == ("MemoryMax", "64M")
    assert parse_assignment(" CPUQuota = 20% ") == ("CPUQuota", "20%")


def test_parse_assignment_without_equals() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignment("MemoryMax")
    assert "KEY=VALUE" in str(info.value)
    assert "'MemoryMax'" in str(info.value)


def test_parse_assignment_validates_value() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_assignment("MemoryMax=12Q")
    assert "MemoryMax" in str(info.value) and "12Q" in str(info.value)


def test_parse_assignment_unknown_key() -> None:
    with pytest.raises(InvalidInput, match="unknown property 'Foo'"):
        parse_assignment("Foo=1")


def test_resource_properties_in_order() -> None:
    props = resource_properties({"CPUQuota": "50%", "MemoryMax": "10%", "TasksMax": "32"})
    assert props == [
        Property("CPUQuotaPerSecUSec", "t", 500_000),
        Property("MemoryMaxScale", "u", int(0.1 * UINT32_MAX)),
        Property("TasksMax", "t", 32),
    ]


def test_resource_properties_empty() -> None:
    assert resource_properties({}) == []


def test_resource_properties_stops_at_first_bad() -> None:
    with pytest.raises(InvalidInput, match="CPUWeight"):
        resource_properties({"MemoryMax": "1G", "CPUWeight": "0"})


# --- machine settings ------------------------------------------------------------


def _by_key(settings):
    return {s.key: s for s in settings}


def test_machine_settings_service() -> None:
    exec_start = ["/usr/bin/python3", "-m", "machined.runtime", "web"]
    settings = machine_settings(
        "web", {"MemoryMax": "64M", "CPUQuota": "20%"}, 10.0, exec_start, {"A": "1"}
    )
    keys = [s.key for s in settings]
    assert keys == [
        "Description",
        "Slice",
        "Delegate",
        "Type",
        "KillMode",
        "OOMPolicy",
        "DevicePolicy",
        "DeviceAllow",
        "DeviceAllow",
        "SuccessExitStatus",
        "RestartForceExitStatus",
        "ExecStart",
        "Environment",
        "TimeoutStopSec",
        "MemoryMax",
        "CPUQuota",
    ]
    device_allow = [s.properties for s in settings if s.key == "DeviceAllow"]
    assert device_allow == [
        (Property("DeviceAllow", "a(ss)", [("/dev/net/tun", "rwm")]),),
        (Property("DeviceAllow", "a(ss)", [("char-pts", "rw")]),),
    ]
    by = _by_key(settings)
    assert by["Description"].text == "pymachine machine web"
    assert by["Description"].properties == (Property("Description", "s", "pymachine machine web"),)
    assert by["Slice"].properties == (Property("Slice", "s", "machine.slice"),)
    assert by["Delegate"].text == "yes"
    assert by["Delegate"].properties == (Property("Delegate", "b", True),)
    assert by["Type"].properties == (Property("Type", "s", "forking"),)
    assert by["KillMode"].text == "mixed"
    assert by["SuccessExitStatus"].properties == (
        Property("SuccessExitStatus", "(aiai)", ([143], [])),
    )
    assert by["ExecStart"].properties == (
        Property("ExecStart", "a(sasb)", [("/usr/bin/python3", exec_start, False)]),
    )
    assert by["ExecStart"].text == "/usr/bin/python3 -m machined.runtime web"
    assert by["Environment"].properties == (Property("Environment", "as", ["A=1"]),)
    timeout = 10.0 + STOP_TIMEOUT_MARGIN
    assert by["TimeoutStopSec"].text == f"{timeout:g}s" == "15s"
    assert by["TimeoutStopSec"].properties == (Property("TimeoutStopUSec", "t", 15_000_000),)
    assert by["MemoryMax"].text == "64M"
    assert by["MemoryMax"].properties == (Property("MemoryMax", "t", 64 * M),)
    assert by["CPUQuota"].text == "20%"
    assert by["CPUQuota"].properties == (Property("CPUQuotaPerSecUSec", "t", 200_000),)


def test_machine_settings_fractional_timeout() -> None:
    by = _by_key(machine_settings("w", {}, 2.5, ["/bin/x"], {}))
    assert by["TimeoutStopSec"].text == "7.5s"
    assert by["TimeoutStopSec"].properties == (Property("TimeoutStopUSec", "t", 7_500_000),)


def test_machine_settings_without_environment_has_no_environment_line() -> None:
    keys = [s.key for s in machine_settings("w", {}, 10, ["/bin/x"], {})]
    assert "Environment" not in keys


def test_machine_settings_scope_has_no_exec_lines() -> None:
    settings = machine_settings("w", {"TasksMax": "10"}, 10, ["/bin/x"], {"A": "1"}, scope=True)
    keys = [s.key for s in settings]
    assert keys == ["Description", "Slice", "Delegate", "TimeoutStopSec", "TasksMax"]


def test_machine_settings_watchdog_and_restart() -> None:
    """WatchdogSec= comes with NotifyAccess=main (PID 1 relays the payload's
    WATCHDOG=1); Restart= is written only when it is not systemd's default."""
    by = _by_key(machine_settings("w", {}, 10, ["/bin/x"], {}, watchdog=2.5, restart="on-watchdog"))
    assert by["WatchdogSec"].text == "2.5s"
    assert by["WatchdogSec"].properties == (Property("WatchdogUSec", "t", 2_500_000),)
    assert by["NotifyAccess"].properties == (Property("NotifyAccess", "s", "main"),)
    assert by["Restart"].properties == (Property("Restart", "s", "on-watchdog"),)
    keys = [s.key for s in machine_settings("w", {}, 10, ["/bin/x"], {})]
    assert not {"WatchdogSec", "Restart", "NotifyAccess"} & set(keys)
    both = [s.key for s in machine_settings("w", {}, 10, ["/bin/x"], {}, watchdog=1,
                                               exec_start_post=["/bin/y"])]  # fmt: skip
    assert both.count("NotifyAccess") == 1


def test_machine_settings_rejects_bad_resource() -> None:
    with pytest.raises(InvalidInput, match="MemoryMax"):
        machine_settings("w", {"MemoryMax": "12Q"}, 10, ["/bin/x"], {})


def test_to_properties_flattens_in_order() -> None:
    settings = machine_settings("w", {"AllowedCPUs": "0-1,3"}, 1, ["/bin/x"], {}, scope=True)
    props = to_properties(settings)
    assert [p.name for p in props] == [
        "Description",
        "Slice",
        "Delegate",
        "TimeoutStopUSec",
        "AllowedCPUs",
    ]
    assert props[-1] == Property("AllowedCPUs", "ay", b"\x0b")
    assert props[3] == Property("TimeoutStopUSec", "t", 6_000_000)


# --- bugs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [("MemoryMax", "nan%"), ("TasksMax", "nan%"), ("CPUQuota", "nan%"), ("CPUQuota", "inf%")],
)
def test_non_finite_percent_is_invalid_input(key: str, value: str) -> None:
    with pytest.raises(InvalidInput, match=key):
        parse_resource(key, value)


@pytest.mark.parametrize("key", ["CPUWeight", "IOWeight", "TasksMax"])
def test_superscript_digit_is_invalid_input(key: str) -> None:
    with pytest.raises(InvalidInput, match=key):
        parse_resource(key, "²")


def test_cpu_quota_beyond_uint64_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="CPUQuota"):
        parse_resource("CPUQuota", "1e30%")


def test_cpu_quota_rounding_to_zero_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="CPUQuota"):
        parse_resource("CPUQuota", "0.00001%")


@pytest.mark.parametrize("value", [2**53 + 1, UINT64_MAX - 1])
def test_large_byte_counts_are_exact(value: int) -> None:
    assert parse_resource("MemoryMax", str(value)) == [Property("MemoryMax", "t", value)]


def test_timeout_text_for_long_timeouts() -> None:
    by = _by_key(machine_settings("w", {}, 1_000_000, ["/bin/x"], {}))
    assert by["TimeoutStopSec"].text == "1000005s"


def test_unit_text_quotes_arguments_with_spaces() -> None:
    exec_start = ["/opt/my python/bin/python3", "-m", "machined.runtime", "web"]
    environment = {"PYMACHINE_ROOT": "/tmp/a b"}
    by = _by_key(machine_settings("web", {}, 10, exec_start, environment))
    assert shlex.split(by["ExecStart"].text) == exec_start
    assert shlex.split(by["Environment"].text) == ["PYMACHINE_ROOT=/tmp/a b"]


def test_boot_mode_stops_pid1_with_sigrtmin_3_and_restarts_on_its_reboot():
    """In service mode systemd signals PID 1 itself: the image's systemd halts on
    SIGRTMIN+3, and its reboot(2) ends PID 1 with SIGHUP, which must restart the unit."""
    import signal

    boot = _by_key(machine_settings("w", {}, 10, ["/bin/x"], {}, boot=True))
    app = _by_key(machine_settings("w", {}, 10, ["/bin/x"], {}))
    assert boot["KillSignal"].properties == (Property("KillSignal", "i", signal.SIGRTMIN + 3),)
    assert "KillSignal" not in app
    assert boot["RestartForceExitStatus"].text == "133 SIGHUP"
    assert boot["RestartForceExitStatus"].properties == (
        Property("RestartForceExitStatus", "(aiai)", ([133], [signal.SIGHUP])),
    )
