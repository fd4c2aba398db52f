"""The execution host's view of a batch job, re-derived from what the batch system vouches for.

A routing decision carried in the job's environment is never trusted: a user sets that at
submission. ``execution_job`` routes again from the facts the batch system gives the prologue
(queue, user, account, requested limits) with the host's own config.
"""

from __future__ import annotations

import pwd
from typing import Optional, Union

import attrs

from blahvm.model import Decision, Job, Outcome, Rejection, RouteResult, SiteConfig, Submission
from blahvm.routing.engine import route


def execution_job(config: SiteConfig, job_id: str, submission: Submission,
                  workdir: Optional[str] = None, name: Optional[str] = None) -> Union[Job, Rejection]:
    """The Job to prepare, or the Rejection that routing gives it on this host.

    ``submission.user`` must be set: it is the account the payload runs as inside the guest.
    """
    if not submission.user:
        return Rejection(reason=f"job {job_id}: the batch system gave no user")
    try:
        account = pwd.getpwnam(submission.user)
    except KeyError:
        return Rejection(reason=f"job {job_id}: user {submission.user!r} does not exist on this host")
    decision = route_in_queue(config, submission)
    if isinstance(decision, Rejection):
        return decision
    return Job(job_id=job_id, user=submission.user, decision=decision, uid=account.pw_uid,
               gid=account.pw_gid, workdir=workdir, name=name)


def route_in_queue(config: SiteConfig, submission: Submission) -> RouteResult:
    """Routing for a job that submission-time routing already moved to ``submission.queue``.

    Users submit to a routing queue (say ``grid``) and the decision moves the job to ``short``;
    the execution host only sees ``short``. The decision stands when routing the same facts from
    the job's own queue, or else from some queue of the site's, lands it in the queue it is in:
    the user could have sent it there, so it gets nothing the rules would not give it.
    """
    first = route(config, submission)
    if submission.queue is None or (isinstance(first, Decision) and first.queue == submission.queue):
        return first
    for origin in config.queues:
        if origin != submission.queue:
            moved = route(config, attrs.evolve(submission, queue=origin))
            if isinstance(moved, Decision) and moved.queue == submission.queue:
                return moved
    if isinstance(first, Rejection):
        return first
    return Rejection(reason=f"the site's routes send this job to queue {first.queue}, not {submission.queue} "
                            "where it is", rule=first.rule)


REJECTED_AT_EXECUTION = Outcome.FAIL_JOB  # the rules say no on this host too: running it elsewhere won't help
