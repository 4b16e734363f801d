"""Pure-logic tests of machined.names: machine and image name validation."""

from __future__ import annotations

import pytest

from machined.errors import ExitCode, InvalidInput
from machined.names import MAX_NAME_LENGTH, validate_image_name, validate_machine_name

VALIDATORS = [(validate_machine_name, "machine"), (validate_image_name, "image")]

GOOD = ["web", "a", "A", "0", "_x", "web-1", "web_1", "web.1", "debian-12.5", "a-", "x" * 64]


@pytest.mark.parametrize(("validate", "kind"), VALIDATORS)
@pytest.mark.parametrize("name", GOOD)
def test_valid_names_are_returned(validate, kind: str, name: str) -> None:
    assert validate(name) == name


def test_max_length_is_64() -> None:
    assert MAX_NAME_LENGTH == 64
    assert validate_machine_name("a" * 64) == "a" * 64


@pytest.mark.parametrize(("validate", "kind"), VALIDATORS)
@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        ".",
        "a/b",
        "/abs",
        "-rf",
        ".hidden",
        "wéb",
        "a..b",
        "web..",
        "a b",
        "a:b",
        "a\nb",
        "web\n",
        "a*",
        "ｗｅｂ",  # full-width letters
        "web\x00",
    ],
)
def test_invalid_names(validate, kind: str, name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate(name)
    message = str(info.value)
    assert message.startswith(f"invalid {kind} name {name!r}:")
    assert "letters, digits" in message
    assert "not starting with '-' or '.'" in message
    assert info.value.exit_code == ExitCode.INVALID


@pytest.mark.parametrize(("validate", "kind"), VALIDATORS)
def test_empty_name(validate, kind: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate("")
    assert str(info.value) == f"invalid {kind} name '': must not be empty"


@pytest.mark.parametrize(("validate", "kind"), VALIDATORS)
def test_65_characters(validate, kind: str) -> None:
    name = "b" * 65
    with pytest.raises(InvalidInput) as info:
        validate(name)
    message = str(info.value)
    assert message == f"invalid {kind} name '{'b' * 20}…': 65 characters, at most 64"


def test_long_name_check_comes_before_character_check() -> None:
    with pytest.raises(InvalidInput, match="1000 characters, at most 64"):
        validate_machine_name("/" * 1000)
