"""The execution host's view of a batch job, re-derived from what the batch system vouches for.

A routing decision carried in the job's environment is never trusted: a user sets that at
submission. ``execution_job`` routes again from the facts the batch system gives the prologue
(queue, user, account, requested limits) with the host's own config.
"""

from __future__ import annotations

import pwd
from typing import Optional, Union

from blahvm.model import Job, Outcome, Rejection, SiteConfig, Submission
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
    decision = route(config, submission)
    if isinstance(decision, Rejection):
        return decision
    return Job(job_id=job_id, user=submission.user, decision=decision, uid=account.pw_uid,
               gid=account.pw_gid, workdir=workdir, name=name)


REJECTED_AT_EXECUTION = Outcome.FAIL_JOB  # the rules say no on this host too: running it elsewhere won't help
