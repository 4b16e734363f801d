"""The Ansible collection (collection/) builds with ansible-galaxy and passes
the ``ansible-test sanity`` tests that run offline here: the others
(ansible-doc, import, pep8, pylint, validate-modules, yamllint,
runtime-metadata…) install their tools into venvs of their own with pip's
get-pip bootstrap from ansible's CI file host, which this network does not
reach."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness import skip_or_fail

COLLECTION = Path(__file__).parents[2] / "collection"
BIN = Path(sys.executable).parent
OFFLINE_TESTS = (
    "action-plugin-docs", "compile", "empty-init", "ignores", "line-endings", "no-assert",
    "no-get-exception", "no-illegal-filenames", "no-smart-quotes", "replace-urlopen",
    "shebang", "symlinks", "use-argspec-type-path", "use-compat-six",
)  # fmt: skip


def _layout(tmp_path: Path) -> Path:
    if not (BIN / "ansible-test").exists():
        skip_or_fail("ansible-core is not installed in the venv (./dev/setup)")
    dest = tmp_path / "ansible_collections/pymachine/machines"
    shutil.copytree(COLLECTION, dest)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return dest


def test_the_collection_builds(tmp_path):
    dest = _layout(tmp_path)
    cp = subprocess.run(
        [BIN / "ansible-galaxy", "collection", "build", "--output-path", tmp_path],
        cwd=dest, capture_output=True, text=True,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "pymachine-machines-0.1.0.tar.gz").is_file()


def test_ansible_test_sanity_offline_tests(tmp_path):
    dest = _layout(tmp_path)
    tests = [arg for name in OFFLINE_TESTS for arg in ("--test", name)]
    cp = subprocess.run(
        [BIN / "ansible-test", "sanity", "--python", "{}.{}".format(*sys.version_info[:2]), *tests],
        cwd=dest, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_every_plugin_documents_itself_to_ansible_doc(tmp_path):
    """What ansible-test's ansible-doc sanity test checks, run with our ansible-doc."""
    _layout(tmp_path)
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(tmp_path)}
    for kind, name in (
        ("module", "machine"), ("module", "image"), ("module", "machine_info"),
        ("connection", "pymachine"), ("inventory", "pymachine"),
    ):  # fmt: skip
        cp = subprocess.run(
            [BIN / "ansible-doc", "-t", kind, "--json", f"pymachine.machines.{name}"],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert cp.returncode == 0 and not cp.stderr.strip(), (kind, name, cp.stderr)
        doc = json.loads(cp.stdout)[f"pymachine.machines.{name}"]["doc"]
        assert doc["short_description"] and doc["options"], (kind, name)
