"""Image references (podman's grammar and short names), skopeo argv and error mapping."""

from __future__ import annotations

import random
import string

import pytest

from bootstrap.reference import Reference, candidates, parse, search_registries
from bootstrap.skopeo import Access, AuthFailed, classify, copy_argv, inspect_argv
from machined.errors import ExitCode, InvalidInput, NotFound


@pytest.fixture
def no_conf(tmp_path):
    return tmp_path / "missing.conf"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("docker.io/library/alpine:3.20", "docker.io/library/alpine:3.20"),
        ("localhost/web", "localhost/web:latest"),
        ("localhost:5000/team/web:v2", "localhost:5000/team/web:v2"),
        ("quay.io/a/b/c", "quay.io/a/b/c:latest"),
        ("docker://127.0.0.1:5000/x:y", "127.0.0.1:5000/x:y"),
        (
            f"localhost:5000/team/web@sha256:{'a' * 64}",
            f"localhost:5000/team/web@sha256:{'a' * 64}",
        ),
        (f"r.io/w:t@sha256:{'b' * 64}", f"r.io/w:t@sha256:{'b' * 64}"),
        ("user/repo", "docker.io/user/repo:latest"),
    ],
)
def test_references_are_qualified_as_podman_does(text, expected, no_conf):
    (ref,) = candidates(text, no_conf)
    assert str(ref) == expected


def test_short_names_go_through_the_search_registries_in_order(tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text('unqualified-search-registries = ["registry.example:5000", "docker.io"]\n')
    assert search_registries(conf) == ["registry.example:5000", "docker.io"]
    refs = candidates("alpine:3", conf)
    assert [str(r) for r in refs] == [
        "registry.example:5000/alpine:3",
        "docker.io/library/alpine:3",
    ]
    # a qualified reference is not searched
    assert [str(r) for r in candidates("quay.io/x/y", conf)] == ["quay.io/x/y:latest"]


def test_a_broken_registries_conf_means_docker_io(tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = [ this is not toml")
    assert [str(r) for r in candidates("alpine", conf)] == ["docker.io/library/alpine:latest"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        " alpine",
        "-alpine",
        "Alpine",
        "a//b",
        "a/b:",
        "a:b:c",
        "a@sha256:short",
        "oci:/tmp/x",
        "a/../b",
        "a b",
        "host:port/x",
        "x" * 300,
    ],
)
def test_bad_references_are_bad_input(text, no_conf):
    with pytest.raises(InvalidInput):
        candidates(text, no_conf)


def test_fuzzed_references_parse_or_fail_cleanly(no_conf):
    """Whatever the text, parsing either qualifies it or is bad input, and a
    qualified one parses back to itself."""
    rng = random.Random(17)
    alphabet = string.ascii_letters + string.digits + "/:@._-" + " \x00é"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        try:
            refs = candidates(text, no_conf)
        except InvalidInput:
            continue
        for ref in refs:
            assert isinstance(ref, Reference)
            assert candidates(str(ref), no_conf) == [ref]
            assert "/" in str(ref) and " " not in str(ref) and ".." not in ref.path


def test_push_destinations_must_name_their_registry():
    assert str(parse("localhost:5000/team/web:v2")) == "localhost:5000/team/web:v2"
    with pytest.raises(InvalidInput, match="name the registry"):
        parse("team/web")


def test_default_name_and_pinning(no_conf):
    (ref,) = candidates("localhost:5000/team/web:v2", no_conf)
    assert ref.default_name == "web"
    pinned = ref.pinned("sha256:" + "c" * 64)
    assert str(pinned) == "localhost:5000/team/web@sha256:" + "c" * 64


def test_skopeo_argv_carries_tls_and_auth_file_never_the_password():
    access = Access(tls_verify=False, creds="u:secret")
    argv = inspect_argv("docker://r/x:1", access, "/tmp/auth.json")
    assert "--tls-verify=false" in argv and "--authfile=/tmp/auth.json" in argv
    assert not any("secret" in a for a in argv)
    copy = copy_argv("docker://r/x@sha256:1", "oci:/c:t", src=access, src_authfile="/a")
    assert "--src-tls-verify=false" in copy and "--src-authfile=/a" in copy
    assert copy[-2:] == ["docker://r/x@sha256:1", "oci:/c:t"]
    assert "--tls-verify=false" not in copy_argv("a", "b", src=Access())


@pytest.mark.parametrize(
    ("stderr", "kind", "code"),
    [
        (
            "reading manifest 1 in r/x: manifest unknown: manifest unknown",
            NotFound,
            ExitCode.NOT_FOUND,
        ),
        ("initializing source: name unknown: repository name not known to registry", NotFound, 4),
        ("reading manifest: unauthorized: authentication required", AuthFailed, 1),
        ("invalid status code from registry 401 (Unauthorized)", AuthFailed, 1),
        ("http: server gave HTTP response to HTTPS client", None, 1),
        ("happened during read: Digest did not match, expected sha256:1", None, 1),
    ],
)
def test_skopeo_failures_map_to_exit_codes(stderr, kind, code):
    error = classify(f'time="x" level=fatal msg="{stderr}"', "r/x:1")
    if kind is not None:
        assert isinstance(error, kind)
    assert error.exit_code == code
    assert str(error).startswith("r/x:1: ") and "\n" not in str(error)
