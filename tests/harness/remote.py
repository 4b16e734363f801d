"""Two throwaway systemd hosts that reach each other over SSH: the tier-1
fixture for ``pymachine -H`` and for Ansible.

Each host is a :func:`~tests.harness.systemd_host.private_network_host` (a
network namespace of its own); a veth pair joins the two namespaces, with
addresses from TEST-NET-1 (``192.0.2.0/24``, documentation only) that exist in
those namespaces alone: no packet of these tests leaves them. Each host runs
the real ``sshd`` of Debian's openssh-server as a transient unit of its own
systemd, on its veth address, with a host key and a client key made for the
run (in the run's work directory): the machine's own ``~/.ssh``, ``/etc/ssh``
and sshd are never read or touched (everything a host writes lands on its
overlay's tmpfs).

Inside each host, ``ssh other`` (or ``ssh a`` / ``ssh b``) reaches the other
host as root with that key and a pinned host key (``/etc/ssh/ssh_config.d``),
``pymachine`` on sshd's ``PATH`` is the test run's checkout, and pymachined is
installed (``pymachine install-units``) with a busybox image ``tiny``.

Standard library only, like the rest of the harness.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .systemd_host import SystemdHost, private_network_host

__all__ = ["ADDRESSES", "SSH_CONFIG_DIR", "RemotePair", "remote_pair", "ssh_missing"]

#: The two hosts' names and veth addresses (TEST-NET-1: never routed anywhere).
ADDRESSES = {"a": "192.0.2.1", "b": "192.0.2.2"}
_PREFIX = 24
_LINK = "pmt0"  # the veth end in each namespace
#: Where each host keeps its sshd's files (its own tmpfs /run).
SSH_CONFIG_DIR = "/run/pymtest-ssh"
_SSHD = "/usr/sbin/sshd"

_SSHD_CONFIG = """\
# sshd of a pymachine tier-1 test host (tests/harness/remote.py)
ListenAddress {address}
Port 22
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
AcceptEnv LANG TERM
Subsystem sftp internal-sftp
"""

_SSH_CLIENT_CONFIG = """\
# ssh from a pymachine tier-1 test host to its peer (tests/harness/remote.py)
Host {names}
    HostName {address}
    User root
    IdentityFile {dir}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {dir}/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
"""


def ssh_missing() -> str | None:
    """Why the SSH pair cannot be made here, or None."""
    missing = [p for p in (_SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen") if not Path(p).exists()]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install openssh-server openssh-client)"
    return None


class RemotePair:
    """Hosts ``a`` and ``b``: ``pair.a.run(["ssh", "other", "hostname"])`` → ``b``."""

    def __init__(self, a: SystemdHost, b: SystemdHost, keys: Path) -> None:
        self.a = a
        self.b = b
        self.keys = keys

    @property
    def hosts(self) -> dict[str, SystemdHost]:
        return {"a": self.a, "b": self.b}

    def address(self, name: str) -> str:
        return ADDRESSES[name]

    def ssh(self, source: str, target: str, command: str, **kw) -> subprocess.CompletedProcess[str]:
        """Run COMMAND (a remote shell line) on TARGET through ssh from SOURCE."""
        return self.hosts[source].run(["ssh", "-T", target, command], **kw)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pymtest-{path.name}", "-f", path],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _write(host: SystemdHost, path: str, text: str, mode: str = "600") -> None:
    host.run(
        f"umask 077; mkdir -p {shlex.quote(str(Path(path).parent))}; "
        f"cat > {shlex.quote(path)}; chmod {mode} {shlex.quote(path)}",
        input=text,
    )


def _link(a: SystemdHost, b: SystemdHost) -> None:
    """A veth pair made in A's namespace with its peer straight in B's: the
    machine's own namespace never holds either end."""
    subprocess.run(
        ["nsenter", "-t", str(a.pid), "-n", "ip", "link", "add", _LINK, "type", "veth",
         "peer", "name", _LINK, "netns", f"/proc/{b.pid}/ns/net"],
        check=True,
    )  # fmt: skip
    for host, name in ((a, "a"), (b, "b")):
        host.run(f"ip addr add {ADDRESSES[name]}/{_PREFIX} dev {_LINK} && ip link set {_LINK} up")


def _serve(host: SystemdHost, name: str, peer: str, keys: Path) -> None:
    d = SSH_CONFIG_DIR
    host.run(["mkdir", "-p", "-m", "0755", d, "/run/sshd"])
    _write(host, f"{d}/host_ed25519", (keys / f"host_{name}").read_text())
    _write(host, f"{d}/id_ed25519", (keys / "client").read_text())
    _write(host, f"{d}/authorized_keys", (keys / "client.pub").read_text(), "644")
    known = "".join(
        f"{n},{ADDRESSES[n]} {' '.join((keys / f'host_{n}.pub').read_text().split()[:2])}\n"
        for n in ADDRESSES
    )
    _write(host, f"{d}/known_hosts", known, "644")
    _write(host, f"{d}/sshd_config", _SSHD_CONFIG.format(address=ADDRESSES[name], dir=d), "644")
    _write(
        host,
        "/etc/ssh/ssh_config.d/pymtest.conf",
        _SSH_CLIENT_CONFIG.format(names=f"other {peer}", address=ADDRESSES[peer], dir=d)
        + _SSH_CLIENT_CONFIG.format(names=f"self {name}", address=ADDRESSES[name], dir=d),
        "644",
    )
    # pymachine on sshd's PATH (/usr/local/bin): the test run's checkout, as an
    # installed pymachine would be; sshd's sessions do not run the harness's env
    _write(
        host,
        "/usr/local/bin/pymachine",
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m machined "$@"\n',
        "755",
    )
    # the test run's interpreter may live under /root: let other users in (overlay only)
    host.run(["chmod", "711", "/root"])
    host.run(
        ["systemd-run", "--unit=pymtest-sshd", "--property=Type=notify",
         "--", _SSHD, "-D", "-e", "-f", f"{d}/sshd_config"]
    )  # fmt: skip


def _wait_ssh(pair: RemotePair) -> None:
    """Each host reaches the other (sshd's listener is up once its unit is)."""
    for source, target in (("a", "other"), ("b", "other")):
        for attempt in range(50):
            cp = pair.ssh(source, target, "true", check=False, timeout=20)
            if cp.returncode == 0:
                break
            if attempt == 49:
                raise AssertionError(f"ssh {source} -> {target} failed: {cp.stderr}")
            time.sleep(0.1)


@contextlib.contextmanager
def remote_pair(base: Path | str, *, pymachined: bool = True) -> Iterator[RemotePair]:
    """Boot hosts a and b under BASE, linked and serving ssh; stopped on exit.

    With PYMACHINED, each host also gets pymachined installed and a busybox
    image ``tiny``."""
    base = Path(base)
    keys = base / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    try:
        for key in ("host_a", "host_b", "client"):
            _keygen(keys / key)
        with (
            private_network_host(base / "a", "a") as a,
            private_network_host(base / "b", "b") as b,
        ):
            pair = RemotePair(a, b, keys)
            _link(a, b)
            _serve(a, "a", "b", keys)
            _serve(b, "b", "a", keys)
            _wait_ssh(pair)
            if pymachined:
                for host in (a, b):
                    host.pymachine("install-units")
                    host.pymachine("bootstrap", "--distro", "busybox", "tiny")
            yield pair
    finally:
        shutil.rmtree(keys, ignore_errors=True)  # the run's private keys
