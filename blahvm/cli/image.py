"""``blahvm image``: golden images. ``build-demo`` builds (or reuses) the demo image, or with
``--cloud-init`` the stock-like cloud image (cloud-init, no agent): progress goes to stderr; stdout
ends with the YAML entry for the site config's ``environments:``. ``warm`` makes
the saved-state templates of the site's environments ahead of their first jobs: one line each.
"""

from __future__ import annotations

import argparse
import sys
import time

from blahvm.cli.common import add_config_option, resolved_config_path
from blahvm.cli.outcomes import EXIT_BAD_INPUT, EXIT_CODES_HELP, exit_code, step


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
        "and print its `environments:` entry for the site config. With --cloud-init, build instead a "
        "Debian 12 image like a stock cloud image: a disk that boots by itself, with systemd, "
        "cloud-init and python3, no blahvm agent, no password and no key; its entry says "
        "`context: cloud-init`, so each job's seed brings the agent, the job's user and hostname.",
    )
    build.add_argument(
        "--cloud-init", action="store_true",
        help="the stock-like cloud image (cloud-init, no agent) instead of the demo image",
    )
    build.add_argument(
        "--dest", metavar="DIR",
        help="image cache directory (default /var/lib/blahvm/images/demo, "
             "or /var/lib/blahvm/images/cloud with --cloud-init)",
    )
    build.add_argument(
        "--name", help="environment name in the printed entry (default demo, or cloud with --cloud-init)"
    )
    build.set_defaults(run=run_build_demo)
    warm = commands.add_parser(
        "warm",
        help="make the saved-state templates jobs start from, ahead of their first jobs",
        description="Make the template (a saved post-boot state) of each environment, or of the one "
                    "given, in the environment's own shape, unless it is there already; print one line "
                    "each: environment, template, state and disk size, made or present (or why none).",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(warm)
    warm.add_argument("--environment", metavar="E", help="only this environment")
    warm.set_defaults(run=run_warm)


def run_build_demo(args: argparse.Namespace) -> int:
    # Imported here: every blahvm command builds this parser, and only this one needs the builder.
    from blahvm.image import ImageBuildError, build_demo_image, print_progress
    from blahvm.image.cloud import build_cloud_image

    try:
        if args.cloud_init:
            image = build_cloud_image(args.dest, progress=print_progress)
        else:
            image = build_demo_image(args.dest, progress=print_progress)
    except ImageBuildError as error:
        print(f"blahvm image build-demo: {error}", file=sys.stderr)
        return 1
    print(f"# add under `environments:` in the site config (image {image.key})")
    sys.stdout.write(image.environment_yaml(args.name or ("cloud" if args.cloud_init else "demo")))
    return 0


def run_warm(args: argparse.Namespace) -> int:
    from blahvm.config import load_config
    from blahvm.errors import printable
    from blahvm.hypervisor.errors import HypervisorError
    from blahvm.lifecycle.templates import TemplateUnusable
    from blahvm.lifecycle.warm import warm
    from blahvm.model import Outcome

    config = load_config(resolved_config_path(args))
    started = time.monotonic()
    try:
        warmed = warm(config, [args.environment] if args.environment else None)
    except KeyError:
        step(f"image warm: environment {args.environment!r} is not in this host's config")
        return EXIT_BAD_INPUT
    except HypervisorError as error:
        step(f"image warm: {error}")
        return exit_code(error.outcome)
    except (TemplateUnusable, OSError) as error:
        step(f"image warm: {error}")
        return exit_code(Outcome.RETRY_ELSEWHERE)
    for done in warmed:
        if done.key is None:
            print(f"{printable(done.environment)}: no template: {printable(done.skipped)}")
        else:
            how = f"made in {done.seconds:.1f}s" if done.made else "present"
            print(f"{printable(done.environment)}: t-{done.key} state {_mib(done.state_size)} "
                  f"disk {_mib(done.disk_size)} ({how})")
    step(f"image warm: {sum(d.made for d in warmed)} made, {sum(d.key is not None and not d.made for d in warmed)} "
         f"present, {sum(d.key is None for d in warmed)} without", time.monotonic() - started)
    return 0


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f}MiB"
