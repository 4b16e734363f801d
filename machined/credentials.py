"""Machine credentials (systemd.exec(5) "Credentials"): the unit's
``LoadCredential=`` / ``LoadCredentialEncrypted=`` lines, and the store that
keeps ``SetCredential=`` values out of the definition file.

A definition names credentials, it never holds one:

* ``LoadCredential=ID:PATH`` / ``LoadCredentialEncrypted=ID:PATH``: a host file
  (a privileged feature for pymachined's callers: it reads host paths as root);
* ``SetCredential=ID`` / ``SetCredentialEncrypted=ID``: the value, given to
  ``create --set-credential ID:VALUE``, is kept in
  ``/etc/pymachine/credentials/NAME/ID`` (directories 0700, the file 0600,
  root's) and loaded from there the same way; the encrypted form holds what
  ``systemd-creds encrypt`` wrote, and systemd decrypts it at start.

systemd reads them all into the unit's own credentials directory at start;
the runtime passes that on (runtime/credentials.py). So a value reaches
neither the definition, the unit's properties, the environment, the journal
nor ``status``.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from pathlib import Path

from machined.errors import InvalidInput
from machined.paths import Paths

# systemd's credential_name_valid() is a file name of at most 255 bytes; we
# also keep out what the ID:PATH syntax or a shell would trip on.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,254}")
# a path systemd reads as one word in a unit file
_PATH = re.compile(r"/[^\s'\"\\%]*")


class Credential(namedtuple("Credential", "id path encrypted", defaults=(False,))):
    """A ``LoadCredential[Encrypted]=ID:PATH`` line."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, encrypted: bool = False) -> Credential:
        ident, sep, path = text.partition(":")
        if not sep:
            raise InvalidInput(f"invalid credential {text!r}: expected ID:/HOST/PATH")
        check_id(ident)
        if not _PATH.fullmatch(path) or ".." in Path(path).parts:
            raise InvalidInput(
                f"invalid credential path {path!r}: an absolute path without '..', "
                "white space, quotes, backslashes or '%'"
            )
        return cls(ident, path, encrypted)

    def __str__(self) -> str:
        return f"{self.id}:{self.path}"


def check_id(ident: str) -> str:
    if not _ID.fullmatch(ident) or ident in (".", ".."):
        raise InvalidInput(
            f"invalid credential ID {ident!r}: letters, digits and _ . @ + - (at most 255)"
        )
    return ident


def parse_stored(text: str) -> str:
    """A ``SetCredential[Encrypted]=`` line of the definition: the ID alone."""
    if ":" in text:
        raise InvalidInput(
            "SetCredential= in a definition names the credential only (ID): its value "
            "is kept apart, in /etc/pymachine/credentials/NAME/ (create --set-credential ID:VALUE)"
        )
    return check_id(text)


def store(paths: Paths, name: str) -> Path:
    return paths.definitions / "credentials" / name


def unit_credentials(definition, paths: Paths) -> list[Credential]:
    """Every credential the unit loads: the definition's host files, then the
    stored ones from the store."""
    directory = store(paths, definition.name)
    stored = [
        Credential(ident, str(directory / ident), encrypted)
        for ident, encrypted in definition.set_credentials
    ]
    return [*definition.load_credentials, *stored]


def save(paths: Paths, name: str, secrets: dict[str, bytes]) -> None:
    """Write SECRETS (ID → value) into NAME's store, root's only."""
    directory = store(paths, name)
    paths.definitions.mkdir(parents=True, exist_ok=True)
    for path in (directory.parent, directory):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    for ident, value in secrets.items():
        check_id(ident)
        tmp = directory / f".{ident}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, value)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / ident)


def remove(paths: Paths, name: str) -> None:
    import shutil

    shutil.rmtree(store(paths, name), ignore_errors=True)
