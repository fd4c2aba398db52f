"""Submission options shared by the commands that route a job: parse them once, the same way."""

from __future__ import annotations

import argparse
import pwd

from blahvm.errors import BlahvmError

FIELDS = (("queue", "grid"), ("vo", "cms"), ("group", "cms"), ("account", "cms-prod"),
          ("walltime", "10h, 90m, 2d, 10:00:00"), ("memory", "2GiB, 512MiB, 2G"), ("cores", "4"),
          ("environment", "slc4"))


class BadSubmission(BlahvmError):
    """An option value that cannot be a submission's (a bad unit, an unknown user)."""


def add_submission_options(parser: argparse.ArgumentParser) -> None:
    for field, example in FIELDS:
        parser.add_argument(f"--{field}", metavar=field.upper(), help=f"e.g. {example}")


def submission_from_args(args: argparse.Namespace, user: str):
    """A ``Submission`` from the options; raises BadSubmission with a one-line reason."""
    from blahvm.model import Submission
    from blahvm.quantities import Duration, QuantityError, Size, parse_count

    try:
        cores = None if args.cores is None else parse_count(args.cores, "cores")
        return Submission(
            queue=args.queue, vo=args.vo, user=user, group=args.group, account=args.account,
            walltime=None if args.walltime is None else Duration.parse(args.walltime),
            memory=None if args.memory is None else Size.parse(args.memory),
            cores=cores, environment=args.environment,
        )
    except QuantityError as error:
        raise BadSubmission(str(error)) from None


def account_of(user: str) -> pwd.struct_passwd:
    """The user's passwd entry: the job runs as this uid and gid inside its guest."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise BadSubmission(f"no such user {user!r} on this host") from None
