"""Image verbs: bootstrap, images, image remove|rename|clone, import-tar, export-tar, import-oci."""

from __future__ import annotations

import argparse
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

    p = subparsers.add_parser(
        "import-tar",
        help="make an image from a tar archive",
        description="Unpack a tar archive (plain, gzip, bzip2 or xz; '-' for stdin) into a new "
        "image. Entries that would land outside the image (absolute paths, '..', links "
        "pointing out) are refused, and device nodes unless --allow-devices.",
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
        ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.rjust(width)}: {value}")
    return 0


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
