"""Image verbs: bootstrap, images, image remove|rename|clone|show|prune, import-tar, export-tar,
import-oci, pull, pull-tar, push, commit."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bootstrap",
        help="build an image with a distribution's own tools",
        description="Build image IMAGE in /var/lib/machines with the distribution's own "
        "bootstrap tool (mmdebstrap/debootstrap, pacstrap, dnf) or from the host's busybox.",
    )
    p.add_argument(
        "--distro",
        "--distribution",
        dest="distro",
        default="debian",
        choices=["debian", "ubuntu", "arch", "fedora", "busybox"],
        help="distribution (default: debian)",
    )
    p.add_argument("--release", help="release/suite (default: the backend's, e.g. bookworm)")
    p.add_argument(
        "--variant", default="minbase", choices=["minbase", "standard"], help="package set"
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PKG,…",
        help="extra packages (comma-separated, may be repeated)",
    )
    p.add_argument("--mirror", help="package mirror URL")
    p.add_argument("--arch", dest="architecture", help="architecture (default: the host's)")
    p.add_argument("--hostname", help="hostname written into the image (default: IMAGE)")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="download everything again; do not read or fill the package cache",
    )
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_bootstrap)

    p = subparsers.add_parser("images", help="list images")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_images)

    p = subparsers.add_parser("image", help="remove, rename or clone images")
    sub = p.add_subparsers(dest="image_verb", metavar="ACTION")
    sub.required = True
    q = sub.add_parser("remove", help="remove images (refused while a machine uses one)")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.set_defaults(func=cmd_image_remove)
    q = sub.add_parser("rename", help="rename an image")
    q.add_argument("old", metavar="IMAGE")
    q.add_argument("new", metavar="NEW")
    q.set_defaults(func=cmd_image_rename)
    q = sub.add_parser("clone", help="copy an image to a new, independent image")
    q.add_argument("source", metavar="IMAGE")
    q.add_argument("new", metavar="NEW")
    q.set_defaults(func=cmd_image_clone)
    q = sub.add_parser("show", help="show an image's details and default command")
    q.add_argument("image", metavar="IMAGE")
    q.add_argument("--json", action="store_true", help="JSON output")
    q.set_defaults(func=cmd_image_show)
    q = sub.add_parser("prune", help="drop cached blobs no image uses")
    q.set_defaults(func=cmd_image_prune)

    p = subparsers.add_parser(
        "import-tar",
        help="make an image from a tar archive",
        description="Unpack a tar archive (plain, gzip, bzip2 or xz; '-' for stdin) into a new "
        "image. Entries that would land outside the image (absolute paths, '..', links "
        "pointing out) are refused, and device nodes unless --allow-devices; so is an "
        "archive that would not fit in the free space (sparse files stay sparse).",
    )
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--allow-devices", action="store_true", help="create device nodes")
    p.set_defaults(func=cmd_import_tar)

    p = subparsers.add_parser(
        "export-tar",
        help="write an image as a tar archive",
        description="Write IMAGE as a tar archive (compressed by the file's suffix: .gz, .bz2, "
        ".xz; '-' for stdout, uncompressed).",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("file", metavar="FILE|-")
    p.set_defaults(func=cmd_export_tar)

    p = subparsers.add_parser(
        "import-oci",
        help="make an image from an OCI image layout (directory or tar)",
        description="Apply the layers of an OCI image layout (or a 'docker save' archive) in "
        "order, honouring whiteouts; the config's Entrypoint/Cmd/Env/WorkingDir become the "
        "image's default command.",
    )
    p.add_argument("source", metavar="DIR|FILE")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--allow-devices", action="store_true", help="create device nodes")
    p.add_argument("--platform", default=None, help="os/arch to pick from an index (default: host)")
    p.set_defaults(func=cmd_import_oci)
    _register_registry(subparsers)


def _registry_options(p: Any) -> None:
    p.add_argument(
        "--tls-verify",
        default="true",
        choices=["true", "false"],
        help="check the registry's TLS certificate; false also allows plain HTTP (as podman)",
    )
    p.add_argument("--authfile", help="auth file (default: skopeo's: $REGISTRY_AUTH_FILE, …)")
    p.add_argument("--creds", metavar="USER:PASSWORD", help="log in with these credentials")


def _register_registry(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pull",
        help="make an image from a registry (through skopeo)",
        description="Pull REFERENCE (as podman writes it; short names go through "
        "/etc/containers/registries.conf, else docker.io) into image NAME (default: the "
        "repository's last component). Layers are kept in a blob cache shared by all images; "
        "an image that is up to date downloads nothing.",
    )
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--name", help="image name (default: the repository's last component)")
    p.add_argument("--platform", help="os/arch[/variant] to pick from an index (default: host)")
    p.add_argument("--force", action="store_true", help="replace an existing image of that name")
    _registry_options(p)
    p.set_defaults(func=cmd_pull)

    p = subparsers.add_parser(
        "pull-tar",
        help="make an image from a tar archive at a URL",
        description="Download URL (resuming a partial download) and unpack it into image NAME, "
        "as importctl does; with --verify=checksum the SHA256SUMS beside the URL must list it, "
        "with --verify=signature SHA256SUMS.gpg must also be a good signature by a key of the "
        "keyring. Nothing lands in the store unless verification passed.",
    )
    p.add_argument("url", metavar="URL")
    p.add_argument("image", metavar="NAME")
    p.add_argument(
        "--verify", default="signature", choices=["no", "checksum", "signature"],
        help="what must check out before unpacking (default: signature)",
    )  # fmt: skip
    p.add_argument("--keyring", help="keyring for --verify=signature")
    p.add_argument("--force", action="store_true", help="replace an existing image of that name")
    p.add_argument("--allow-devices", action="store_true", help="create device nodes")
    p.set_defaults(func=cmd_pull_tar)

    p = subparsers.add_parser(
        "push",
        help="push an image to a registry as an OCI image",
        description="Push IMAGE to DESTINATION (registry/repository[:tag]): one layer for the "
        "image, or its pulled base layers plus one for the change when it was committed.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("destination", metavar="DESTINATION")
    _registry_options(p)
    p.set_defaults(func=cmd_push)

    p = subparsers.add_parser(
        "commit",
        help="make an image from a machine's changes and its image",
        description="A new image NEW: machine MACHINE's image with its writable layer applied "
        "(whiteouts honoured, owners unshifted from the machine's UID range). A running machine "
        "is frozen for the copy (or, with --stop, stopped and started again).",
    )
    p.add_argument("machine", metavar="MACHINE")
    p.add_argument("image", metavar="NEW")
    p.add_argument(
        "--stop", action="store_true", help="stop a running machine for the copy, not freeze it"
    )
    p.set_defaults(func=cmd_commit)


# --- handlers ----------------------------------------------------------------


def _job(method: str, signature: str, job_args: list) -> int | None:
    """Through pymachined as a job (machined.cli.daemon.run_job); None: in-process."""
    from machined.cli import daemon

    if daemon.in_process():
        return None
    try:
        return daemon.run_job(method, signature, job_args)
    except daemon.NotInstalled:
        return None


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from bootstrap.build import bootstrap_image

    if not (args.mirror or args.architecture or args.hostname):  # not in the API (root's)
        code = _job(
            "BootstrapImage",
            "ssssasb",
            [
                args.image,
                args.distro,
                args.release or "",
                args.variant,
                [p.strip() for item in args.include for p in item.split(",") if p.strip()],
                args.no_cache,
            ],
        )
        if code is not None:
            return code
    from bootstrap.distributions import BootstrapConfig, Distribution

    include = tuple(p.strip() for item in args.include for p in item.split(",") if p.strip())
    config = BootstrapConfig(
        distribution=Distribution(args.distro),
        release=args.release,
        variant=args.variant,
        include=include,
        mirror=args.mirror,
        architecture=args.architecture,
        use_cache=not args.no_cache,
        hostname=args.hostname,
    )
    bootstrap_image(args.image, config)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from machined.cli.output import human_bytes, print_json, print_table
    from machined.images import ImageStore

    images = ImageStore().list()
    if args.json:
        print_json([i.to_json() for i in images])
        return 0
    rows = [
        (
            i.name,
            human_bytes(i.size),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)),
            ",".join(i.used_by),
        )
        for i in images
    ]
    print_table(("NAME", "SIZE", "CREATED", "USED-BY"), rows, legend=f"{len(rows)} images listed.")
    return 0


def cmd_image_remove(args: argparse.Namespace) -> int:
    from machined.cli.machines import _daemon_call
    from machined.images import ImageStore

    if _daemon_call(lambda d: [d.call("RemoveImage", "s", [name]) for name in args.images]):
        return 0
    store = ImageStore()
    for name in args.images:
        store.remove(name)
    return 0


def cmd_image_rename(args: argparse.Namespace) -> int:
    from machined.images import ImageStore

    ImageStore().rename(args.old, args.new)
    return 0


def cmd_image_clone(args: argparse.Namespace) -> int:
    from machined.images import ImageStore

    ImageStore().clone(args.source, args.new)
    return 0


def cmd_image_show(args: argparse.Namespace) -> int:
    from machined.cli.output import human_bytes, print_json
    from machined.images import ImageStore

    store = ImageStore()
    info = store.info(args.image)
    config = store.config(args.image)
    if args.json:
        print_json({**info.to_json(), "config": config.to_json()})
        return 0
    lines = [
        ("Name", info.name),
        ("Path", str(info.path)),
        ("Source", info.source or "-"),
        *_origin_lines(info.origin or {}),
        ("Size", human_bytes(info.size)),
        ("Created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
        ("Used by", ", ".join(info.used_by) or "-"),
    ]
    if not config.is_empty():
        import shlex

        lines += [
            ("Command", shlex.join(config.command) or "-"),
            ("Environment", " ".join(config.environment) or "-"),
            ("WorkingDir", config.working_directory or "-"),
            ("User", config.user or "-"),
            ("Ports", " ".join(config.exposed_ports) or "-"),
            ("StopSignal", config.stop_signal or "-"),
        ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.rjust(width)}: {value}")
    return 0


def _origin_lines(origin: dict[str, Any]) -> list[tuple[str, str]]:
    """Where a pulled, downloaded or committed image came from, for ``image show``."""
    lines = []
    if origin.get("reference"):
        lines.append(("Reference", str(origin["reference"])))
        lines.append(("Digest", f"{origin.get('digest', '-')} ({origin.get('platform', '-')})"))
    if origin.get("url"):
        lines.append(("URL", str(origin["url"])))
        lines.append(("SHA256", f"{origin.get('sha256', '-')} (verify={origin.get('verify')})"))
    if origin.get("committed_from"):
        lines.append(
            ("Committed", f"from machine {origin['committed_from']} on {origin.get('base')}")
        )
    when = origin.get("pulled_at") or origin.get("committed_at")
    if when:
        lines.append(("At", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(when)))))
    return lines


def cmd_import_tar(args: argparse.Namespace) -> int:
    from bootstrap.tarimport import import_tar

    code = _import_tar_job(args)
    if code is not None:
        return code

    import_tar(args.file, args.image, allow_devices=args.allow_devices)
    return 0


def _import_tar_job(args: argparse.Namespace) -> int | None:
    """import-tar through pymachined: the archive is our open file (or stdin),
    so a user's own file is read with the user's rights, never the daemon's."""
    import os

    try:
        fd = 0 if args.file == "-" else os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # import_tar's own error for it
    try:
        return _job("ImportTar", "hsb", [fd, args.image, args.allow_devices])
    finally:
        if fd:
            os.close(fd)


def cmd_export_tar(args: argparse.Namespace) -> int:
    from bootstrap.tarimport import export_tar

    if args.file == "-" and sys.stdout.isatty():
        from machined.errors import InvalidInput

        raise InvalidInput("refusing to write a tar archive to a terminal")
    export_tar(args.image, args.file)
    return 0


def cmd_import_oci(args: argparse.Namespace) -> int:
    from bootstrap.oci import import_oci

    import_oci(args.source, args.image, allow_devices=args.allow_devices, platform=args.platform)
    return 0


@contextlib.contextmanager
def _disk_full_is_an_error():
    """A full disk during a pull or commit is a failure with one line, not a traceback
    (the staging directory is gone by then: nothing is left behind)."""
    import errno

    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from machined.errors import PymachineError

        raise PymachineError(f"no space left on device: {exc.filename or ''}".rstrip(": ")) from exc


def _access(args: argparse.Namespace):
    from bootstrap.skopeo import Access

    return Access(tls_verify=args.tls_verify == "true", authfile=args.authfile, creds=args.creds)


def cmd_pull(args: argparse.Namespace) -> int:
    from bootstrap.pull import pull

    if not (args.creds or args.authfile):  # credentials of the caller's own: in-process (root)
        code = _job(
            "PullImage",
            "sssbb",
            [args.reference, args.name or "", args.platform or "", args.force,
             args.tls_verify == "true"],
        )  # fmt: skip
        if code is not None:
            return code
    with _disk_full_is_an_error():
        pull(
            args.reference,
            args.name,
            platform=args.platform,
            access=_access(args),
            force=args.force,
        )
    return 0


def cmd_pull_tar(args: argparse.Namespace) -> int:
    from bootstrap.urlpull import pull_tar

    with _disk_full_is_an_error():
        pull_tar(
            args.url,
            args.image,
            verify=args.verify,
            keyring=args.keyring,
            force=args.force,
            allow_devices=args.allow_devices,
        )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from bootstrap.push import push

    with _disk_full_is_an_error():
        push(args.image, args.destination, access=_access(args))
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from machined.commit import commit

    with _disk_full_is_an_error():
        commit(args.machine, args.image, stop=args.stop)
    return 0


def cmd_image_prune(args: argparse.Namespace) -> int:
    from bootstrap.pull import prune
    from machined.cli.output import human_bytes

    blobs, freed = prune()
    print(f"{blobs} unused blobs removed, {human_bytes(freed)} freed")
    return 0
