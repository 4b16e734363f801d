"""A hostile image's config, or a hand-edited definition, never adds a key
to a machine's definition (the review's host-root finding: an OCI ``Env`` of
``A=1\\x1cPrivateUsers=no`` turned the machine into host root).

Tier 1: real images imported with ``import-oci``, real machines started by the
real systemd; what a user observes is create's answer and, inside the machine,
its UID map and environment.
"""

from __future__ import annotations

import os
import tarfile
import uuid

import pytest

from tests.unit.test_bootstrap_oci import LayoutBuilder

pytestmark = pytest.mark.tier1

IDENTITY_MAP = "0 0 4294967295"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _import_oci(systemd_host, tiny_image: str, config: dict) -> str:
    """An OCI image whose one layer is the busybox image and whose config is CONFIG."""
    layer = f"/tmp/{_unique('layer')}.tar"
    systemd_host.pymachine("export-tar", tiny_image, layer)
    layout = systemd_host.host_path("/tmp/" + _unique("oci"))
    builder = LayoutBuilder(layout)
    builder.index([builder.image([systemd_host.host_path(layer).read_bytes()], config)])
    archive = f"{layout}.tar"
    with tarfile.open(archive, "w") as t:
        t.add(layout, arcname=".")
    inner = "/" + os.path.relpath(archive, systemd_host.host_path("/"))
    name = _unique("img")
    systemd_host.pymachine("import-oci", inner, name)
    return name


def _definitions(systemd_host) -> list[str]:
    out = systemd_host.run(["ls", "-A", "/etc/pymachine"], check=False).stdout
    return sorted(out.split())


@pytest.mark.parametrize("separator", ["\x1c", "\x85", "\u2028", "\x0b"])
def test_image_env_cannot_add_a_key(systemd_host, tiny_image, machine_name, separator):
    image = _import_oci(
        systemd_host,
        tiny_image,
        {
            "Cmd": ["/bin/sh", "-c", "cat /proc/self/uid_map; sleep 1000"],
            "Env": ["PATH=/bin", f"A=1{separator}PrivateUsers=no{separator}Capability=all"],
        },
    )
    try:
        before = _definitions(systemd_host)
        result = systemd_host.pymachine("create", machine_name, "--image", image, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "not allowed" in result.stderr
        assert _definitions(systemd_host) == before
    finally:
        systemd_host.pymachine("image", "remove", image, check=False)


def test_image_values_reach_the_payload_exactly(systemd_host, tiny_image, machine_name):
    """Unusual but harmless characters are kept, byte for byte, and the
    machine keeps its user namespace."""
    value = "tab\there é 日 'q' \"d\" $HOME %n ;#"
    image = _import_oci(
        systemd_host,
        tiny_image,
        {
            "Cmd": ["/bin/sh", "-c", 'cat /proc/self/uid_map; printf "%s" "$ODD" > /odd'],
            "Env": ["PATH=/bin", f"ODD={value}"],
        },
    )
    try:
        systemd_host.pymachine("create", machine_name, "--image", image, "--network", "none")
        result = systemd_host.pymachine("run", machine_name)
        assert IDENTITY_MAP not in result.stdout
        upper = systemd_host.host_path(f"/var/lib/pymachine/machines/{machine_name}/upper/odd")
        assert upper.read_text() == value
    finally:
        systemd_host.pymachine("remove", machine_name, check=False)
        systemd_host.pymachine("image", "remove", image, check=False)


def test_hand_edited_separator_is_refused_at_start(systemd_host, tiny_image, machine_name):
    """A definition file edited by hand with a stray U+001C: start names the
    file and line, exits 2, and no unit runs."""
    systemd_host.pymachine(
        "create", machine_name, "--image", tiny_image, "--network", "none", "--", "sleep", "1000"
    )
    path = systemd_host.host_path(f"/etc/pymachine/{machine_name}.machine")
    text = path.read_text()
    path.write_text(text.replace("[Exec]\n", "[Exec]\nEnvironment=A=1\x1cPrivateUsers=no\n"))
    try:
        result = systemd_host.pymachine("start", machine_name, check=False)
        assert result.returncode == 2, result.stderr
        assert f"{machine_name}.machine:" in result.stderr
        state = systemd_host.run(
            ["systemctl", "is-active", f"pymachine-{machine_name}.service"], check=False
        ).stdout.strip()
        assert state in ("inactive", "unknown")
    finally:
        systemd_host.pymachine("remove", machine_name, check=False)


def test_replace_stores_a_set_credential_as_create_does(systemd_host, tiny_image, machine_name):
    """``create --replace --set-credential ID:VALUE`` keeps the secret where
    ``create`` does (root's store, 0600), the definition naming its ID only;
    before, the value was dropped and the machine could not start."""
    systemd_host.pymachine("create", machine_name, "--image", tiny_image, "--", "/bin/true")
    try:
        systemd_host.pymachine(
            "create", machine_name, "--image", tiny_image, "--replace",
            "--set-credential", "token:s3cret", "--", "/bin/true",
        )  # fmt: skip
        stored = systemd_host.host_path(f"/etc/pymachine/credentials/{machine_name}/token")
        assert stored.read_bytes() == b"s3cret" and stored.stat().st_mode & 0o077 == 0
        definition = systemd_host.host_path(f"/etc/pymachine/{machine_name}.machine")
        assert "s3cret" not in definition.read_text()
    finally:
        systemd_host.pymachine("remove", machine_name, check=False)


def test_exec_words_reach_the_process_as_written_dollar_signs_included(systemd_host):
    """systemd expands $VAR and ${VAR} in Exec*= lines, quoted or not: a word
    with a dollar sign (a path of the runtime's, an argument) must come out of
    the unit file as written, not as the manager's environment says."""
    from machined.properties import Property
    from machined.units import _exec_start

    unit = _unique("dollar") + ".service"
    words = ["/bin/echo", "$HOME", "${PATH}x", "50%", "a b", "$$"]
    line = _exec_start(Property("ExecStart", "a(sasb)", [(words[0], words, False)]))
    path = systemd_host.host_path(f"/run/systemd/system/{unit}")
    path.write_text(f"[Service]\nType=oneshot\nExecStart={line}\n")
    try:
        systemd_host.run(["systemctl", "daemon-reload"])
        systemd_host.run(["systemctl", "start", unit])
        out = systemd_host.run(["journalctl", "-o", "cat", "-u", unit, "--no-pager"]).stdout
        assert "$HOME ${PATH}x 50% a b $$" in out.splitlines(), out
    finally:
        path.unlink()
        systemd_host.run(["systemctl", "daemon-reload"])
