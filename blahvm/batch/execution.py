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


def execution_job(config: SiteConfig, job_id: str, submission: Submission, workdir: Optional[str] = None,
                  name: Optional[str] = None, submitted_to: Optional[str] = None) -> Union[Job, Rejection]:
    """The Job to prepare, or the Rejection that routing gives it on this host.

    ``submission.user`` must be set: it is the account the payload runs as inside the guest.
    """
    if not submission.user:
        return Rejection(reason=f"job {job_id}: the batch system gave no user")
    try:
        account = pwd.getpwnam(submission.user)
    except KeyError:
        return Rejection(reason=f"job {job_id}: user {submission.user!r} does not exist on this host")
    decision = route_in_queue(config, submission, submitted_to)
    if isinstance(decision, Rejection):
        return decision
    return Job(job_id=job_id, user=submission.user, decision=decision, uid=account.pw_uid,
               gid=account.pw_gid, workdir=workdir, name=name)


def route_in_queue(config: SiteConfig, submission: Submission, submitted_to: Optional[str] = None) -> RouteResult:
    """The decision the rules give ``submission`` that runs it in ``submission.queue``, else a Rejection.

    Users submit to a routing queue (say ``grid``) and the decision moves the job to ``short``;
    the execution host sees ``short``. So the job is routed as if submitted to ``submitted_to``
    (the queue the user named, when the batch system or a hint says), to its own queue, then to
    each queue of the site's in order; the first decision that lands it where it is wins. Whatever
    a hint says, the result is a decision the rules give some submission with the vouched facts
    that lands in this queue: the user could have sent it there, so it gets nothing more.
    """
    queue = submission.queue
    if queue is None:
        return route(config, submission)
    if queue not in config.queues:
        return Rejection(reason=f"queue {queue!r} is not one of this site's queues")
    order = [q for q in (submitted_to, queue) if q in config.queues]
    order += [q for q in config.queues if q not in order]
    first_refusal = None
    for origin in order:
        decision = route(config, attrs.evolve(submission, queue=origin))
        if isinstance(decision, Decision) and decision.queue == queue:
            return decision
        if isinstance(decision, Rejection) and first_refusal is None:
            first_refusal = decision
    reason = first_refusal.reason if first_refusal else "the rules send it elsewhere"
    return Rejection(reason=f"no route puts this job in queue {queue}: {reason}")


REJECTED_AT_EXECUTION = Outcome.FAIL_JOB  # the rules say no on this host too: running it elsewhere won't help
