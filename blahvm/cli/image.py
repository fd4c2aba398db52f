"""``blahvm image``: golden images. ``build-demo`` builds (or reuses) the demo image.

Progress goes to stderr; stdout ends with the YAML entry for the site config's ``environments:``.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: "argparse._SubParsersAction") -> None:
    image = subparsers.add_parser(
        "image", help="build and manage golden images", description="Build and manage golden images."
    )
    commands = image.add_subparsers(dest="image_command", metavar="COMMAND")
    commands.required = True
    build = commands.add_parser(
        "build-demo",
        help="build the demo golden image from Debian packages (cached)",
        description="Build the demo golden image from Debian packages, or reuse the cached one, "
        "and print its `environments:` entry for the site config.",
    )
    build.add_argument(
        "--dest", metavar="DIR", help="image cache directory (default /var/lib/blahvm/images/demo)"
    )
    build.add_argument("--name", default="demo", help="environment name in the printed entry (default demo)")
    build.set_defaults(run=run_build_demo)


def run_build_demo(args: argparse.Namespace) -> int:
    # Imported here: every blahvm command builds this parser, and only this one needs the builder.
    from blahvm.image import ImageBuildError, build_demo_image, print_progress

    try:
        image = build_demo_image(args.dest, progress=print_progress)
    except ImageBuildError as error:
        print(f"blahvm image build-demo: {error}", file=sys.stderr)
        return 1
    print(f"# add under `environments:` in the site config (image {image.key})")
    sys.stdout.write(image.environment_yaml(args.name))
    return 0
