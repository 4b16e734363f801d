"""machined.backup on real files (as root): an exact round trip of a writable
layer, and refusals of truncated, corrupt and hostile archives that leave
nothing behind. systemd is not asked anything: the machine is stopped here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from machined import backup
from machined.errors import Conflict, ExitCode, NotFound
from machined.machines import Machines
from machined.paths import Paths
from machined.runtime import userns
from tests.unit.layers import BASE, fill_layer, tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices, trusted.* need root")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setattr(Machines, "is_running", lambda self, name: False)
    paths = Paths(tmp_path / "root")
    (paths.image("tiny") / "bin").mkdir(parents=True)
    (paths.image("tiny") / "bin" / "sh").write_text("#!busybox\n")
    paths.definitions.mkdir(parents=True)
    paths.definition_file("src").write_text(
        "[Machine]\nImage=tiny\n[Exec]\nCommand=/bin/sh -c 'sleep 1'\n"
    )
    state = paths.machine_state("src")
    (state / "upper").mkdir(parents=True)
    (state / "work").mkdir()
    (state / userns.SHIFT_FILE).write_text(f"{BASE}\n")
    userns.allocate(paths.state, "src", userns.UsernsSpec("fixed", BASE))
    fill_layer(state / "upper")
    return Machines(paths), paths


def everything(root: Path) -> list[tuple[str, int]]:
    """Every path under ROOT and its size: what "nothing written" compares."""
    out = []
    for path in sorted(root.rglob("*")):
        out.append((str(path), os.lstat(path).st_size))
    return out


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "tar.zst"])
def test_round_trip_keeps_the_layer_exactly_and_shifts_owners(env, tmp_path, suffix) -> None:
    machines, paths = env
    archive = tmp_path / f"src.{suffix}"
    backup.backup("src", str(archive), machines=machines)
    result = backup.restore(str(archive), "copy", machines=machines)
    assert result == {"machine": "copy", "image": "tiny", "image_restored": False, "warnings": []}
    base, count = userns.allocations(paths.state)["copy"]
    assert base != BASE and count == 65536
    before = tree(paths.machine_state("src") / "upper", BASE)
    after = tree(paths.machine_state("copy") / "upper", base)
    assert before["gone"]["owner"] == (-BASE, -BASE)
    assert after["gone"]["owner"] == (0, 0)  # the machine's root: the kernel ignores it
    before["gone"]["owner"] = (0, 0)
    assert after == before
    assert after["disk.img"]["sparse"] and after["bin/suid"]["mode"] == oct(0o104755)
    assert after["etc/app.link"]["group"] == "etc/app.conf"
    assert (paths.machine_state("copy") / userns.SHIFT_FILE).read_text() == f"{base}\n"
    text = paths.definition_file("copy").read_text()
    assert text == paths.definition_file("src").read_text()


def test_gnu_tar_reads_the_archive(env, tmp_path) -> None:
    machines, _ = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), machines=machines)
    import subprocess

    listing = subprocess.run(
        ["tar", "-tvf", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    assert (
        "layer/disk.img" in listing and "layer/etc/app.link link to layer/etc/app.conf" in listing
    )
    assert listing.splitlines()[-1].endswith(backup.MANIFEST)


def test_with_image_restores_the_image_on_a_host_without_it(env, tmp_path) -> None:
    machines, paths = env
    archive = tmp_path / "src.tar.zst"
    backup.backup("src", str(archive), with_image=True, machines=machines)
    other = Machines(Paths(tmp_path / "other"))
    result = backup.restore(str(archive), machines=other)
    assert result["image_restored"] and result["machine"] == "src"
    assert (other.paths.image("tiny") / "bin" / "sh").read_text() == "#!busybox\n"
    base = userns.allocations(other.paths.state)["src"][0]
    before = tree(paths.machine_state("src") / "upper", BASE)
    before["gone"]["owner"] = (0, 0)
    assert tree(other.paths.machine_state("src") / "upper", base) == before


def test_without_the_image_a_host_lacking_it_refuses_and_names_its_origin(env, tmp_path) -> None:
    machines, paths = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), machines=machines)
    other = Paths(tmp_path / "other")
    other.state.mkdir(parents=True)
    with pytest.raises(NotFound, match="image 'tiny'.*--with-image") as caught:
        backup.restore(str(archive), machines=Machines(other))
    assert caught.value.exit_code == ExitCode.NOT_FOUND
    assert not other.definitions.exists()
    assert [p for p in (other.state / "machines").iterdir()] == []
    assert userns.allocations(other.state) == {}


def test_an_existing_machine_is_a_conflict_and_nothing_changes(env, tmp_path) -> None:
    machines, paths = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), machines=machines)
    before = everything(paths.root)
    with pytest.raises(Conflict) as caught:
        backup.restore(str(archive), machines=machines)
    assert caught.value.exit_code == ExitCode.CONFLICT
    assert everything(paths.root) == before


def _refused(machines: Machines, data: bytes, tmp_path: Path, name: str = "victim") -> str:
    """Restore DATA; it must be refused (exit code 2) with nothing changed."""
    paths = machines.paths
    archive = tmp_path / "in.tar"
    archive.write_bytes(data)
    before = everything(paths.root)
    registry = userns.allocations(paths.state)
    with pytest.raises(backup.CorruptArchive) as caught:
        backup.restore(str(archive), name, machines=machines)
    assert caught.value.exit_code == ExitCode.INVALID
    assert everything(paths.root) == before
    assert userns.allocations(paths.state) == registry
    return str(caught.value)


def test_every_truncation_is_refused_with_nothing_written(env, tmp_path) -> None:
    machines, _ = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), machines=machines)
    data = archive.read_bytes()
    end = data.rstrip(b"\0")  # the end-of-archive zeros carry nothing
    cuts = sorted({*range(0, len(end), 512), *range(700, len(end), 4099), len(end) - 1})
    for cut in cuts:
        _refused(machines, data[:cut], tmp_path)


@pytest.mark.parametrize("suffix", ["tar.gz", "tar.zst"])
def test_truncated_compressed_archives_are_refused(env, tmp_path, suffix) -> None:
    machines, _ = env
    archive = tmp_path / f"src.{suffix}"
    backup.backup("src", str(archive), machines=machines)
    data = archive.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 40, len(data) - 1):
        _refused(machines, data[:cut], tmp_path)


def test_a_changed_byte_anywhere_is_refused(env, tmp_path) -> None:
    """Every byte that means something: headers and data, not the zero padding
    that rounds data and PAX records up to 512-byte blocks (it carries nothing)."""
    machines, _ = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), machines=machines)
    data = archive.read_bytes()
    padding = set()
    with tarfile.open(archive) as listing:
        for member in listing:
            stored = member.offset_data + (
                member.size if member.sparse is None else _stored(member, listing)
            )
            padding.update(range(stored, stored + (-stored % 512)))
            if member.sparse is not None:  # the GNU 1.0 map block before the data: its padding
                numbers = [len(member.sparse), *(n for pair in member.sparse for n in pair)]
                text = sum(len(f"{n}\n") for n in numbers)
                start = member.offset_data - (text + (-text % 512))
                padding.update(range(start + text, member.offset_data))
            if member.offset_data - member.offset > 512:  # a PAX header first: its padding
                records = member.offset + 512
                while data[records : records + 1].isdigit():
                    records += int(data[records : data.index(b" ", records)])
                padding.update(range(records, records + (-records % 512)))
    end = len(data.rstrip(b"\0"))
    offsets = [o for o in range(0, end, 97) if o not in padding]
    assert len(offsets) > 100
    for offset in offsets:
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        try:
            _refused(machines, bytes(flipped), tmp_path)
        except BaseException as exc:
            raise AssertionError(f"byte {offset}: {data[offset - 30 : offset + 10]!r}") from exc


def _stored(member: tarfile.TarInfo, listing: tarfile.TarFile) -> int:
    """A sparse entry's data in the archive, up to where its padding starts."""
    return sum(n for _, n in member.sparse)


# --- hostile archives: valid checksums, bad entries ---------------------------------------


def hostile(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], **header) -> bytes:
    """A backup made of ENTRIES with a correct manifest, as an attacker would write it."""
    buf = io.BytesIO()
    manifest = []
    head = {
        "format": backup.FORMAT,
        "version": backup.VERSION,
        "machine": "evil",
        "definition": "[Machine]\nImage=tiny\n",
        "uid_count": 65536,
        "layer_owners": "unshifted",
        "image": {"name": "tiny", "source": None, "included": False},
        **header,
    }

    def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
        info.size = len(data) if info.isreg() else 0
        digest = backup.entry_digest(info, info.size, info.pax_headers)
        digest.update(data)
        manifest.append((info.name, digest.hexdigest()))
        archive.addfile(info, io.BytesIO(data) if info.isreg() else None)

    head["sha256"] = backup.header_digest(head)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        add(tarfile.TarInfo(backup.HEADER), json.dumps(head).encode())
        root = tarfile.TarInfo("layer")
        root.type = tarfile.DIRTYPE
        add(root)
        for entry in entries:
            info, data = entry if isinstance(entry, tuple) else (entry, b"")
            add(info, data)
        total = hashlib.sha256("".join(f"{d}  {n}\n" for n, d in manifest).encode())
        trailer = json.dumps({"entries": manifest, "total": total.hexdigest()}).encode()
        info = tarfile.TarInfo(backup.MANIFEST)
        info.size = len(trailer)
        archive.addfile(info, io.BytesIO(trailer))
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    info.mtime = int(time.time())
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_a_well_formed_hostile_kit_is_accepted_first(env, tmp_path) -> None:
    """The helper makes archives restore accepts: the refusals below are the entries'."""
    machines, paths = env
    data = hostile([(entry("layer/f"), b"fine"), entry("layer/d", tarfile.DIRTYPE)])
    (tmp_path / "ok.tar").write_bytes(data)
    backup.restore(str(tmp_path / "ok.tar"), "fine", machines=machines)
    assert (paths.machine_state("fine") / "upper" / "f").read_bytes() == b"fine"


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([entry("layer/../../../escape")], "'..'"),
        ([entry("/layer/abs")], "absolute"),
        ([entry("elsewhere/x")], "unexpected entry"),
        # through a symlink the archive made: its parent is no directory entry
        ([entry("layer/s", tarfile.SYMTYPE, "{outside}"), entry("layer/s/planted")], "directory"),
        ([entry("layer/nodir/x")], "directory"),
        ([entry("layer/a"), entry("layer/a", tarfile.SYMTYPE, "/etc")], "twice"),
        ([entry("layer/h", tarfile.LNKTYPE, "{outside}/target")], "absolute"),
        ([entry("layer/h", tarfile.LNKTYPE, "layer/missing")], "no earlier file"),
        (
            [
                entry("layer/s", tarfile.SYMTYPE, "{outside}"),
                entry("layer/h", tarfile.LNKTYPE, "layer/s/target"),
            ],
            "no earlier file",
        ),
        (
            [entry("layer/d", tarfile.DIRTYPE), entry("layer/h", tarfile.LNKTYPE, "layer/d")],
            "no earlier",
        ),
        ([entry("layer/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)], "device node"),
        ([entry("layer/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)], "device node"),
        ([entry("layer/f", uid=70000)], "outside the machine"),
        ([entry("layer/f", gid=4_000_000_000)], "outside the machine"),
    ],
)
def test_hostile_entries_are_refused_with_nothing_written(env, tmp_path, entries, why) -> None:
    machines, _ = env
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("host file\n")
    for info in entries:
        info.name = info.name.replace("{outside}", str(outside))
        info.linkname = info.linkname.replace("{outside}", str(outside))
    message = _refused(machines, hostile(entries), tmp_path)
    assert why in message
    assert sorted(os.listdir(outside)) == ["target"]
    assert os.stat(outside / "target").st_nlink == 1


def test_an_entry_after_the_manifest_is_refused(env, tmp_path) -> None:
    machines, _ = env
    data = hostile([entry("layer/f")]).rstrip(b"\0")
    data += b"\0" * (-len(data) % 512)  # the manifest's padding, not the end of the archive
    extra = io.BytesIO()
    with tarfile.open(fileobj=extra, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(entry("layer/late"), io.BytesIO(b""))
    assert "after the manifest" in _refused(machines, data + extra.getvalue(), tmp_path)


def test_a_header_that_is_not_first_or_a_foreign_tar_is_refused(env, tmp_path) -> None:
    machines, _ = env
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        archive.addfile(entry("etc/passwd"), io.BytesIO(b""))
    assert "not a pymachine backup" in _refused(machines, buf.getvalue(), tmp_path)
    bad_version = hostile([], version=99)
    assert "version" in _refused(machines, bad_version, tmp_path)


def test_a_privileged_definition_is_restored_with_warnings_and_host_ids(env, tmp_path) -> None:
    """PrivateUsers=no: the owners are the archive's host IDs (no range to shift
    into), and the restore says what the definition gives the machine."""
    machines, paths = env
    data = hostile(
        [(entry("layer/f", uid=0, mode=0o4755), b"x")],
        definition="[Machine]\nImage=tiny\n[Exec]\nPrivateUsers=no\n[Files]\nBind=/srv:/srv\n",
    )
    (tmp_path / "priv.tar").write_bytes(data)
    result = backup.restore(str(tmp_path / "priv.tar"), "priv", machines=machines)
    assert result["warnings"] == [
        "has PrivateUsers=no: root inside is host root",
        "binds host paths: /srv:/srv",
    ]
    st = os.lstat(paths.machine_state("priv") / "upper" / "f")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o4755)
    assert "priv" not in userns.allocations(paths.state)


# --- fuzz: random entry sequences with valid checksums ------------------------------------

_ODD = ["..", "a/../b", "/a", "", "./a", "a//b", "image/x", "x/../../y"]
_TARGETS = ["a", "b", "/", "../../..", "{outside}", "{outside}/x", "../x", "layer/a", "layer/d0/f1"]


def _random_entries(rng) -> list[tarfile.TarInfo]:
    """Mostly well-formed trees (directories before what they hold), with odd
    names, link targets, types and owners mixed in."""
    dirs = [""]
    entries = []
    for i in range(rng.randrange(1, 12)):
        kind = rng.choice(
            [tarfile.REGTYPE] * 3
            + [tarfile.DIRTYPE] * 3
            + [tarfile.SYMTYPE] * 2
            + [tarfile.LNKTYPE] * 2
            + [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.BLKTYPE]
        )
        if rng.random() < 0.85:
            parent = rng.choice(dirs)
            rel = f"{parent}/{'d' if kind == tarfile.DIRTYPE else 'f'}{i}".lstrip("/")
        else:
            rel = rng.choice(_ODD + [f"{d}/s{i}/x" for d in dirs])
        if kind == tarfile.DIRTYPE:
            dirs.append(rel)
        target = rng.choice(_TARGETS + [e.name for e in entries] * 2)
        device = kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) and rng.random() < 0.3
        entries.append(
            entry(
                f"layer/{rel}",
                kind,
                target if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "",
                uid=rng.choice([0, 1, 1000, 65535] * 8 + [65536, 2**31]),
                mode=rng.choice([0o644, 0o4755, 0o7777, 0o000]),
                devmajor=8 if device else 0,
                devminor=3 if device else 0,
            )
        )
    return entries


@pytest.mark.parametrize("seed", range(300))
def test_random_archives_are_restored_inside_or_refused_with_nothing_written(
    env, tmp_path, seed
) -> None:
    import random

    machines, paths = env
    rng = random.Random(seed)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("host\n")
    entries = []
    for info in _random_entries(rng):
        info.name = info.name.replace("{outside}", str(outside))
        info.linkname = info.linkname.replace("{outside}", str(outside))
        entries.append((info, b"data") if info.isreg() else info)
    data = hostile(entries)
    (tmp_path / "in.tar").write_bytes(data)
    before = everything(paths.root)
    try:
        backup.restore(str(tmp_path / "in.tar"), "fuzz", machines=machines)
    except (backup.CorruptArchive, NotFound) as exc:  # NotFound: an image/ entry's image
        assert exc.exit_code in (ExitCode.INVALID, ExitCode.NOT_FOUND)
        assert everything(paths.root) == before
    else:
        upper = paths.machine_state("fuzz") / "upper"
        for path in upper.rglob("*"):  # rglob does not follow symlinks
            assert os.path.realpath(path.parent).startswith(os.path.realpath(upper))
    assert sorted(os.listdir(outside)) == ["x"]
    assert (outside / "x").read_text() == "host\n" and os.stat(outside / "x").st_nlink == 1


def test_an_image_this_host_has_is_checked_but_not_replaced(env, tmp_path) -> None:
    machines, paths = env
    archive = tmp_path / "src.tar"
    backup.backup("src", str(archive), with_image=True, machines=machines)
    (paths.image("tiny") / "bin" / "sh").write_text("this host's\n")
    result = backup.restore(str(archive), "again", machines=machines)
    assert not result["image_restored"]
    assert result["warnings"] == [
        "uses this host's image 'tiny': the archive's copy was checked, not used"
    ]
    assert (paths.image("tiny") / "bin" / "sh").read_text() == "this host's\n"
