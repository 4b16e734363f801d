"""Image references (podman's grammar and short names), skopeo argv and error mapping."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import string

import pytest

from bootstrap.pull import checked_manifest, resolve_manifest
from bootstrap.reference import Reference, candidates, parse, search_registries
from bootstrap.skopeo import Access, AuthFailed, classify, copy_argv, inspect_argv
from machined.errors import ExitCode, InvalidInput, NotFound, PymachineError


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


# --- manifests a registry sends: well formed, or one clear error ---------------------------


D = "sha256:" + "a" * 64


class FakeSkopeo:
    """Serves manifests by digest (pure logic: no registry involved)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def raw_manifest(self, transport: str, authfile):
        digest = transport.rsplit("@", 1)[1]
        data = self.blobs.get(digest, b"{}")
        return data, "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(layers: int = 1) -> dict:
    return {
        "schemaVersion": 2,
        "config": {"digest": D, "size": 2},
        "layers": [{"digest": D, "size": 3} for _ in range(layers)],
    }


def test_an_index_resolves_to_the_platforms_manifest():
    arm = json.dumps(manifest(2)).encode()
    arm_digest = "sha256:" + hashlib.sha256(arm).hexdigest()
    index = {
        "manifests": [
            {"digest": D, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": arm_digest, "platform": {"os": "linux", "architecture": "arm64"}},
        ]
    }
    (ref,) = candidates("localhost:5000/x:1")
    digest, found = resolve_manifest(
        FakeSkopeo({arm_digest: arm}), ref, json.dumps(index).encode(), D, None, "linux/arm64"
    )
    assert digest == arm_digest and len(found["layers"]) == 2
    with pytest.raises(NotFound, match="s390x"):
        resolve_manifest(FakeSkopeo({}), ref, json.dumps(index).encode(), D, None, "linux/s390x")
    # an index entry whose manifest is not what its digest says
    liar = {
        "manifests": [{"digest": arm_digest, "platform": {"os": "linux", "architecture": "arm64"}}]
    }
    with pytest.raises(PymachineError, match="does not match its digest"):
        resolve_manifest(
            FakeSkopeo({arm_digest: b"{}"}), ref, json.dumps(liar).encode(), D, None, "linux/arm64"
        )


@pytest.mark.parametrize(
    "document",
    [
        [],
        "text",
        {"layers": "no"},
        {"schemaVersion": 1, "fsLayers": []},
        {"config": {"digest": D}, "layers": [{"digest": "sha256:../../etc"}]},
        {"config": {"digest": D}, "layers": [{"size": 1}]},
        {"config": None, "layers": []},
        {"config": {"digest": D}, "layers": [{"digest": D, "size": "big"}]},
    ],
)
def test_malformed_manifests_are_one_clear_error(document):
    with pytest.raises(PymachineError) as info:
        checked_manifest(document, "r/x:1")
    assert str(info.value).startswith("r/x:1: ")


def test_fuzzed_manifests_and_indexes_never_crash():
    """Random JSON shaped like manifests and indexes: a manifest, or a PymachineError."""
    rng = random.Random(3)
    atoms = [None, 0, -1, 1.5, "", "x", D, "sha256:zz", [], {}, True]

    def value(depth: int):
        kind = rng.randrange(4 if depth < 3 else 1)
        if kind == 0:
            atom = rng.choice(atoms)
            return type(atom)() if isinstance(atom, list | dict) else atom
        if kind == 1:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        keys = ["digest", "size", "platform", "os", "architecture", "layers", "config",
                "manifests", "mediaType", "variant"]  # fmt: skip
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randrange(4))}

    (ref,) = candidates("localhost:5000/x:1")
    for _ in range(3000):
        document = value(0)
        if rng.random() < 0.5 and isinstance(document, dict):
            document["manifests"] = value(1)
        raw = json.dumps(document).encode()
        with contextlib.suppress(PymachineError):
            resolve_manifest(FakeSkopeo({}), ref, raw, D, None, rng.choice([None, "linux/amd64"]))
