"""PRE_EXEC, JOB_STARTER and POST_EXEC on the execution host.

Where the facts come from (docs/lsf.md, "Trust"): the queue is ``$LSB_QUEUE`` and the job id
``$LSB_JOBID``/``$LSB_JOBINDEX``, which sbatchd sets itself over anything the user submitted; the
user is the process's own when the hook runs as the job user, else ``$LSFUSER`` (then ``$USER``),
which sbatchd sets for the job; the group is that user's primary group from the password
database; the project is LSF's own record of the job (``bjobs -json -o "jobid proj_name" ID``,
bounded in time; LSF's ``default`` project counts as none), never ``$LSB_PROJECT_NAME``, which
volclava does not set and which is whatever the submitter had in their environment; the cores are
this host's share of ``$LSB_MCPU_HOSTS`` (else ``$LSB_HOSTS``). The esub's
``BLAHVM_ENVIRONMENT``, ``BLAHVM_WALLTIME``, ``BLAHVM_MEMORY`` and ``BLAHVM_SUBMIT_QUEUE`` are only
the user's request, exactly as if typed at ``bsub``: the routing rules grant or refuse it again
here, and the decision must land in the queue LSF actually runs the job in.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
from typing import Mapping, Optional, Sequence, Tuple

from blahvm.batch.lsf import PRE_EXEC_FAIL_JOB, PRE_EXEC_OK, PRE_EXEC_RETRY, STARTER_FAILED

_JOB_ID = re.compile(r"[0-9]{1,20}\Z")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_INTERPRETER = re.compile(r"/[A-Za-z0-9/._+-]+\Z")
LSF_DEFAULT_PROJECT = "default"
BJOBS_TIMEOUT = 20.0  # seconds bjobs may take before PRE_EXEC re-pends the job
# the guest agent takes one frame of at most 1 MiB for the command, its environment and the rest
MAX_EXEC_BYTES = (1 << 20) - 4096


class NotRunnable(Exception):
    """This job can never run here (FAIL_JOB), with a one-line reason."""


class LsfUnavailable(Exception):
    """LSF could not say now what it knows about the job (RETRY_ELSEWHERE), with a one-line reason."""


def _say(message: str) -> None:
    try:
        os.write(2, f"blahvm: {' '.join(str(message).split())}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def job_id_of(environ: Mapping[str, str]) -> str:
    """``123`` or, for an array element, ``123[4]``."""
    job = environ.get("LSB_JOBID", "")
    if not _JOB_ID.match(job):
        raise NotRunnable(f"LSB_JOBID={job!r} is not an LSF job id")
    index = environ.get("LSB_JOBINDEX", "0") or "0"
    if not _JOB_ID.match(index):
        raise NotRunnable(f"LSB_JOBINDEX={index!r} is not an array index")
    return job if int(index) == 0 else f"{job}[{int(index)}]"


def job_user(environ: Mapping[str, str]) -> pwd.struct_passwd:
    uid = os.getuid()
    if uid != 0:
        try:
            return pwd.getpwuid(uid)
        except KeyError:
            raise NotRunnable(f"uid {uid} has no name on this host") from None
    name = environ.get("LSFUSER") or environ.get("USER") or ""
    try:
        return pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise NotRunnable(f"the job's user {name!r} (LSFUSER) does not exist on this host") from None


def cores_here(environ: Mapping[str, str]) -> Optional[int]:
    words = environ.get("LSB_MCPU_HOSTS", "").split()
    if len(words) >= 2 and words[1].isdigit():
        return int(words[1])
    hosts = environ.get("LSB_HOSTS", "").split()
    return hosts.count(hosts[0]) if hosts else None


def _hint_int(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip().strip('"')
    if not value:
        return None
    if not value.isdigit() or len(value) > 20:
        raise NotRunnable(f"{name}={value!r} is not a whole number")
    return int(value)


def _hint_name(environ: Mapping[str, str], name: str) -> Optional[str]:
    value = environ.get(name, "").strip().strip('"')
    if not value:
        return None
    if not _NAME.match(value):
        raise NotRunnable(f"{name}={value!r} is not a name")
    return value


def workdir_of(environ: Mapping[str, str], uid: int) -> Optional[str]:
    """The submission directory, shared with the guest only if it is the user's own directory."""
    path = environ.get("LS_SUBCWD", "")
    if not path.startswith("/"):
        return None
    try:
        status = os.lstat(path)
    except (OSError, ValueError):
        return None
    import stat

    return path if stat.S_ISDIR(status.st_mode) and status.st_uid == uid and uid != 0 else None


def project_from_bjobs(text: str, job_id: str) -> Optional[str]:
    """The project of ``bjobs -json -o "jobid proj_name" ID``'s one record (None for LSF's ``default``)."""
    try:
        records = json.loads(text)["RECORDS"]
        record = records[0]
        if "ERROR" in record:
            raise NotRunnable(f"job {job_id}: LSF says: {' '.join(str(record['ERROR']).split())}")
        project = record["PROJ_NAME"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LsfUnavailable(f"job {job_id}: bjobs -json gave no project") from None
    if not isinstance(project, str):
        raise LsfUnavailable(f"job {job_id}: bjobs -json gave no project")
    project = project.strip()
    return None if not project or project == LSF_DEFAULT_PROJECT else project


def project_from_lsf(job_id: str, bjobs: str, lsf_envdir: Optional[str], timeout: float = BJOBS_TIMEOUT) -> Optional[str]:
    """Ask LSF for the job's project (``-P``), bounded by ``timeout``; never the job's environment."""
    return project_from_bjobs(_bjobs(job_id, ["-json", "-o", "jobid proj_name"], bjobs, lsf_envdir, timeout), job_id)


# The mark of a job that went through the esub: LSF's own merged resource requirement reserves a
# blahvm slot. LSF keeps it (the esub cannot be skipped into it unnoticed: a job submitted with
# LSB_ESUB_METHOD=none, or when the esub could not run, has none), and a user who writes it by hand
# gets what the esub gives: the slot is reserved and PRE_EXEC routes the job again.
SLOT_RESOURCE = "blahvm_slots"
# the section bjobs -l prints last: anything a user wrote (a command line with newlines) comes before it
_COMBINED = re.compile(r"^ ?RESOURCE REQUIREMENT DETAILS:\n ?Combined: ([^\n]*)$", re.M)
_RUSAGE = re.compile(r"rusage\[([^\]]*)\]")


def routed_by_blahvm(bjobs_long: str, job_id: str) -> bool:
    """Whether ``bjobs -l ID``'s "Combined:" resource requirement (mbatchd's own, job and queue merged)
    reserves at least one blahvm slot; ``LsfUnavailable`` when there is no such line."""
    matches = _COMBINED.findall(bjobs_long)
    if not matches:
        if re.search(r"Job <[^>]*> is not found", bjobs_long):
            raise NotRunnable(f"job {job_id}: LSF says: Job <{job_id}> is not found")
        raise LsfUnavailable(f"job {job_id}: bjobs -l gave no combined resource requirement")
    for rusage in _RUSAGE.findall(matches[-1]):
        for term in rusage.split(":"):
            name, _, value = term.partition("=")
            if name.strip() == SLOT_RESOURCE:
                try:
                    if float(value.split(",")[0].strip()) >= 1:
                        return True
                except ValueError:
                    pass
    return False


def _bjobs(job_id: str, argv: Sequence[str], bjobs: str, lsf_envdir: Optional[str], timeout: float) -> str:
    env = {"PATH": "/bin:/usr/bin"}
    if lsf_envdir:
        env["LSF_ENVDIR"] = lsf_envdir
    try:
        done = subprocess.run([bjobs, *argv, job_id], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, env=env, cwd="/")
    except subprocess.TimeoutExpired:
        raise LsfUnavailable(f"job {job_id}: {bjobs} did not answer within {timeout:g}s") from None
    except OSError as error:
        raise LsfUnavailable(f"job {job_id}: cannot run {bjobs}: {error.strerror}") from None
    text = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        said = " ".join(done.stderr.decode("utf-8", "replace").split())[:200]
        if '"ERROR"' in text:  # bjobs -json: the record says why
            return text
        if "is not found" in said:  # bjobs -l: "Job <ID> is not found" on stderr
            return said
        raise LsfUnavailable(f"job {job_id}: {bjobs} failed with exit {done.returncode}: {said}")
    return text


def check_routed(job_id: str, bjobs: str, lsf_envdir: Optional[str], timeout: float = BJOBS_TIMEOUT) -> None:
    """NotRunnable unless LSF's record of the job carries the esub's mark (``routed_by_blahvm``)."""
    if not routed_by_blahvm(_bjobs(job_id, ["-l"], bjobs, lsf_envdir, timeout), job_id):
        raise NotRunnable(
            f"job {job_id} was not routed by blahvm: LSF's resource requirement for it reserves no "
            f"{SLOT_RESOURCE} (it was submitted around the esub, e.g. with LSB_ESUB_METHOD=none); a job runs "
            "only as blahvm routes it: submit it again with the esub")


def lsf_job(config, environ: Mapping[str, str], project: Optional[str] = None):
    """The ``Job`` this host runs for the LSF job in ``environ`` whose project LSF says is ``project``
    (raises NotRunnable)."""
    from blahvm.batch.execution import route_in_queue
    from blahvm.model import Job, Rejection, Submission
    from blahvm.quantities import Duration, Size

    job_id = job_id_of(environ)
    queue = environ.get("LSB_QUEUE", "")
    if not queue:
        raise NotRunnable(f"job {job_id}: LSB_QUEUE is not set")
    account = job_user(environ)
    import grp

    try:
        group = grp.getgrgid(account.pw_gid).gr_name
    except KeyError:
        group = None
    walltime = _hint_int(environ, "BLAHVM_WALLTIME")
    memory = _hint_int(environ, "BLAHVM_MEMORY")
    submission = Submission(
        queue=queue, user=account.pw_name, group=group,
        account=None if project in (None, "", LSF_DEFAULT_PROJECT) else project,
        walltime=None if walltime is None else Duration(walltime),
        memory=None if memory is None else Size(memory),
        cores=cores_here(environ),
        environment=_hint_name(environ, "BLAHVM_ENVIRONMENT"),
        name=environ.get("LSB_JOBNAME") or None,
    )
    decision = route_in_queue(config, submission, _hint_name(environ, "BLAHVM_SUBMIT_QUEUE"))
    if isinstance(decision, Rejection):
        raise NotRunnable(f"job {job_id}: {decision.reason}")
    return Job(job_id=job_id, user=account.pw_name, decision=decision, uid=account.pw_uid,
               gid=account.pw_gid, workdir=workdir_of(environ, account.pw_uid), name=submission.name)


def _load(config_path: str):
    from blahvm.config import load_config

    return load_config(config_path)


def _config_problem(error: Exception) -> str:
    problems = getattr(error, "problems", None) or [str(error)]
    return f"the blahvm config {' '.join(str(problems[0]).split())}{' ...' if len(problems) > 1 else ''}"


# -- PRE_EXEC ------------------------------------------------------------------------------------

def pre_exec(config: str, bjobs: str = "bjobs", lsf_envdir: Optional[str] = None,
             environ: Optional[Mapping[str, str]] = None) -> int:
    """Prepare the job's guest: 0 to run, 1 to re-pend (elsewhere, later), 99 to end the job.
    ``bjobs`` (and ``lsf_envdir``, fixed at install) is how the job's project is asked of LSF."""
    from blahvm.batch.hook import run_hook

    environ = os.environ if environ is None else environ
    return run_hook("pre-exec", lambda: _pre_exec(config, environ, bjobs, lsf_envdir), on_error=PRE_EXEC_RETRY)


def _pre_exec(config_path: str, environ: Mapping[str, str], bjobs: str = "bjobs",
              lsf_envdir: Optional[str] = None) -> int:
    from blahvm.batch.log import log_event
    from blahvm.errors import ConfigError
    from blahvm.lifecycle import prepare
    from blahvm.model import Outcome

    try:
        config = _load(config_path)
    except ConfigError as error:
        log_event("pre-exec", f"{_config_problem(error)}: re-pending", job_id=environ.get("LSB_JOBID"))
        return PRE_EXEC_RETRY
    log_file = config.host.log_file
    try:
        job_id = job_id_of(environ)
        project = project_from_lsf(job_id, bjobs, lsf_envdir)
        check_routed(job_id, bjobs, lsf_envdir)
        job = lsf_job(config, environ, project)
    except LsfUnavailable as error:
        log_event("pre-exec", f"{error}: re-pending", job_id=environ.get("LSB_JOBID"), log_file=log_file)
        _say(str(error))
        return PRE_EXEC_RETRY
    except NotRunnable as error:
        log_event("pre-exec", f"{error}: ending the job", job_id=environ.get("LSB_JOBID"), log_file=log_file)
        _say(str(error))
        _tell_user(environ, str(error), log_file)
        return PRE_EXEC_FAIL_JOB
    result = prepare(config, job)
    code = {Outcome.OK: PRE_EXEC_OK, Outcome.RETRY_ELSEWHERE: PRE_EXEC_RETRY}.get(result.outcome, PRE_EXEC_FAIL_JOB)
    log_event("pre-exec", f"{result.outcome.value}: {result.message} (exit {code})", job_id=job.job_id,
              user=job.user, vo=job.decision.vo, guest=result.guest, log_file=log_file)
    if code:
        _say(result.message)
    if code == PRE_EXEC_FAIL_JOB:
        _tell_user(environ, result.message, log_file)
    elif code == PRE_EXEC_OK:
        _start_follower(config_path, job.job_id, log_file)
    return code


def _tell_user(environ: Mapping[str, str], reason: str, log_file: Optional[str]) -> None:
    """The reason the job ends, into the job's -e/-o file as its user (blahvm.batch.lsf.notice)."""
    from blahvm.batch.log import log_event
    from blahvm.batch.lsf.notice import tell_user

    try:
        job_id, account = job_id_of(environ), job_user(environ)
    except NotRunnable as error:
        log_event("pre-exec", f"the reason reaches no user: {error}", job_id=environ.get("LSB_JOBID"), log_file=log_file)
        return
    problem = tell_user(environ, job_id, account.pw_uid, account.pw_gid, reason)
    if problem:
        log_event("pre-exec", f"the reason reaches no user: {problem}", job_id=job_id, log_file=log_file)


def _start_follower(config_path: str, job_id: str, log_file: Optional[str]) -> None:
    """bstop/bresume pause and resume the guest: a root follower of the job's process group leader."""
    from blahvm.batch.log import log_event
    from blahvm.batch.lsf.follower import job_leader, start_follower

    leader = job_leader()
    if leader is None:
        problem = "PRE_EXEC leads its own process group: no job to follow"
    else:
        problem = start_follower(config_path, job_id, leader)
    if problem:
        log_event("pre-exec", f"{problem}: bstop will not pause the guest", job_id=job_id, log_file=log_file)


# -- JOB_STARTER ---------------------------------------------------------------------------------

def starter_job(environ: Mapping[str, str]):
    """The ``Job`` the starter launches into: PRE_EXEC routed and prepared it (as root, with LSF's
    facts); the starter, run as the job's user, needs only its id, its user and its directory."""
    from blahvm.model import Decision, Job
    from blahvm.quantities import Size

    job_id = job_id_of(environ)
    account = job_user(environ)
    placeholder = Decision(queue=environ.get("LSB_QUEUE", ""), environment="", rule="", vo=None, memory=Size(0),
                           vcpus=1)
    return Job(job_id=job_id, user=account.pw_name, decision=placeholder, uid=account.pw_uid, gid=account.pw_gid,
               workdir=workdir_of(environ, account.pw_uid), name=environ.get("LSB_JOBNAME") or None)


def exec_size(command: Sequence[str], env: Mapping[str, str]) -> int:
    """What the command and environment take in the agent's exec message (its JSON, ASCII-escaped)."""
    return len(json.dumps({"argv": list(command), "env": dict(env)}, ensure_ascii=True, separators=(",", ":")))


def payload(argv: Sequence[str]) -> Tuple[list, Optional[str]]:
    """(argv to run in the guest, a script file to feed it on stdin or None).

    LSF hands the starter either the user's command, already split, or for a script job a single
    path ``$LSB_JOBFILENAME.shell``: that file's lines are not on the guest, so its text is fed to
    the interpreter its ``#!`` line names (``/bin/sh`` without one) on stdin.
    """
    if len(argv) == 1 and argv[0].endswith(".shell") and os.path.isfile(argv[0]):
        interpreter = ["/bin/sh"]
        try:
            with open(argv[0], "rb") as stream:
                first = stream.readline(256).decode("utf-8", "replace")
        except OSError as error:
            raise NotRunnable(f"cannot read the job file {argv[0]!r}: {error.strerror}") from None
        if first.startswith("#!"):
            words = first[2:].split()
            if words and _INTERPRETER.match(words[0]) and len(words) <= 2:
                interpreter = words
        return interpreter, argv[0]
    return list(argv), None


def job_starter(config: str, argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """Run what LSF hands over inside the job's guest; the payload's exit status (255: it never ran)."""
    from blahvm.batch.hook import run_hook

    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_hook("job-starter", lambda: _job_starter(config, argv, environ), on_error=STARTER_FAILED)


def _job_starter(config_path: str, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    from blahvm.batch.log import log_event
    from blahvm.errors import ConfigError
    from blahvm.lifecycle import launch

    if not argv:
        _say("the job starter got no command (JOB_STARTER = blahvm-job-starter, LSF appends the job's command)")
        return STARTER_FAILED
    try:
        config = _load(config_path)
    except ConfigError as error:
        _say(f"{_config_problem(error)}: the job did not run")
        return STARTER_FAILED
    try:
        job = starter_job(environ)
        command, script = payload(argv)
    except NotRunnable as error:
        _say(f"{error}: the job did not run")
        log_event("job-starter", f"{error}: the job did not run", job_id=environ.get("LSB_JOBID"),
                  log_file=starter_log(config))
        return STARTER_FAILED
    env = {}
    for key, value in environ.items():
        try:
            key.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:
            continue
        env[key] = value
    size = exec_size(command, env)
    if size > MAX_EXEC_BYTES:
        _say(f"job {job.job_id}: the command and its environment take {size} bytes, more than the "
             f"{MAX_EXEC_BYTES} a guest accepts: the job did not run (unset large variables before bsub)")
        return STARTER_FAILED
    stdin_fd = None
    try:
        if script is not None:
            stdin_fd = os.open(script, os.O_RDONLY)
        code = launch(config, job, command, env=env, stdin=0 if stdin_fd is None else stdin_fd)
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
    log_event("job-starter", f"payload exited {code}", job_id=job.job_id, user=job.user, log_file=starter_log(config))
    return code


def starter_log(config) -> Optional[str]:
    """Where the starter logs: ``host.log_file`` only when this process may append to it; the starter
    runs as the job's user and that file is root's, so in practice syslog (None)."""
    path = config.host.log_file
    return path if path and os.access(path, os.W_OK) else None


# -- POST_EXEC -----------------------------------------------------------------------------------

def post_exec(config: str, environ: Optional[Mapping[str, str]] = None) -> int:
    """Tear the job's guest down. 0 when nothing is left, 1 otherwise; LSF is never asked to act on it."""
    from blahvm.batch.hook import run_hook

    environ = os.environ if environ is None else environ
    return run_hook("post-exec", lambda: _post_exec(config, environ), on_error=1)


def _post_exec(config_path: str, environ: Mapping[str, str]) -> int:
    from blahvm.batch.log import log_event
    from blahvm.errors import ConfigError
    from blahvm.lifecycle import teardown
    from blahvm.model import Outcome

    try:
        config = _load(config_path)
    except ConfigError as error:
        log_event("post-exec", f"{_config_problem(error)}: nothing torn down (blahvm reap will)",
                  job_id=environ.get("LSB_JOBID"))
        return 1
    try:
        job_id = job_id_of(environ)
    except NotRunnable as error:
        log_event("post-exec", str(error), log_file=config.host.log_file)
        return 1
    result = teardown(config, job_id)
    log_event("post-exec", f"{result.outcome.value}: {result.message}", job_id=job_id,
              user=environ.get("LSFUSER"), log_file=config.host.log_file)
    return 0 if result.outcome is Outcome.OK else 1
