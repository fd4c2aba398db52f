"""PBS (Torque, OpenPBS / PBS Pro): the translation between what the mom and the server give a
hook and blahvm's common types, and back from ``Outcome`` to PBS's exit codes and hook verdicts.

The scripts in ``plugins/pbs/`` and the OpenPBS Python hook only call into this module:

- ``prologue``: both argument conventions (OpenPBS: job id, user, group; Torque: 7 or more), the
  routing facts the 3-argument form lacks taken from ``qstat -f -F json`` (the server vouches for
  them), ``prepare`` bounded by a budget that fits ``$prologalarm``; exit 0 run, 1 abort, 2 requeue.
- ``epilogue``: 10 or more arguments (exit status 10th); ``teardown``.
- ``job_starter``: Torque's ``$job_starter`` and the program OpenPBS's ``execjob_launch`` hook
  puts in place of the job's: runs the job in its guest as the job's user.
- ``openpbs_hook``: every event of the one OpenPBS Python hook.

VO and environment come from what PBS vouches for: the queue, the owner and their group, the
account (``qsub -A``) through the site's ``vo_mapping``, and the job's ``blahvm_env`` resource
(``qsub -l blahvm_env=NAME``), which routing honours or refuses. Nothing in the job's environment
variables is ever routed on.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import attrs

from blahvm.batch.hook import run_hook
from blahvm.batch.log import log_event
from blahvm.errors import BlahvmError
from blahvm.model import Outcome, Rejection, Submission
from blahvm.quantities import Duration, QuantityError, Size

EXIT_RUN = 0
EXIT_ABORT = 1  # JOB_EXEC_FAIL2: the job is aborted
EXIT_REQUEUE = 2  # any other non-zero: JOB_EXEC_RETRY, the job is requeued
PROLOGUE_EXIT = {Outcome.OK: EXIT_RUN, Outcome.FAIL_JOB: EXIT_ABORT, Outcome.RETRY_ELSEWHERE: EXIT_REQUEUE}

DEFAULT_BUDGET = 25.0  # seconds a prologue may take: OpenPBS kills it at $prologalarm (30 s)
QSTAT_TIMEOUT = 8.0
ENV_RESOURCE = "blahvm_env"  # qsub -l blahvm_env=NAME: the environment the user asks for
SLOTS_RESOURCE = "blahvm_slots"  # vnode resources set by exechost_periodic
ENVS_RESOURCE = "blahvm_envs"
SHELLS = ("sh", "bash", "dash", "ksh", "zsh", "csh", "tcsh", "ash")


class BadArguments(BlahvmError):
    """The mom called a script with arguments it never passes: one line saying which."""


class FactsUnavailable(BlahvmError):
    """The facts routing needs could not be had now (qstat failed or timed out)."""


# -- what PBS vouches for about a job ---------------------------------------------------------------


@attrs.frozen
class PbsJob:
    """A job as the mom or the server describes it. ``complete``: queue, account and resources known."""

    job_id: str
    user: str
    group: Optional[str] = None
    name: Optional[str] = None
    queue: Optional[str] = None
    account: Optional[str] = None
    resources: Tuple[Tuple[str, str], ...] = ()
    complete: bool = True

    def resource(self, name: str) -> Optional[str]:
        for key, value in self.resources:
            if key == name:
                return value
        return None


def _field(value: str) -> Optional[str]:
    """PBS passes an empty argument, or 'null'/'(null)', for an attribute the job does not have."""
    return None if value in ("", "null", "(null)") else value


def _need(value: str, what: str) -> str:
    """A job id or user as the mom passes it: one printable line (a control character such as CR or
    ESC would rewrite the log line or terminal it is shown on)."""
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadArguments(f"the {what} argument {value[:100]!r} is empty or has control characters")
    return value


MAX_DIGITS = 18  # a count PBS could hold; more is a job's bad request, never our failure


def _whole(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        raise QuantityError(f"{what} {text[:40]!r}{'...' if len(text) > 40 else ''}: expected a whole number "
                            f"of at most {MAX_DIGITS} digits")
    return int(text)


def parse_prologue_argv(argv: Sequence[str]) -> PbsJob:
    """OpenPBS: ``id user group`` (a NAS build adds resources); Torque: ``id user group name resources
    queue account [script [hosts]]``. Anything else raises BadArguments."""
    argv = list(argv)
    if len(argv) not in (3, 4) and len(argv) < 7:
        raise BadArguments(f"a prologue gets 3 arguments (OpenPBS) or 7 or more (Torque), not {len(argv)}")
    job_id, user = _need(argv[0], "job id"), _need(argv[1], "user")
    group = _field(argv[2])
    if len(argv) == 3:
        return PbsJob(job_id, user, group, complete=False)
    if len(argv) == 4:
        return PbsJob(job_id, user, group, resources=parse_resource_list(argv[3]), complete=False)
    return PbsJob(job_id, user, group, name=_field(argv[3]), resources=parse_resource_list(argv[4]),
                  queue=_field(argv[5]), account=_field(argv[6]))


def parse_epilogue_argv(argv: Sequence[str]) -> Tuple[PbsJob, Optional[int]]:
    """``id user group name session requested used queue account exit [script]``: the job and its exit status."""
    argv = list(argv)
    if len(argv) < 10:
        raise BadArguments(f"an epilogue gets 10 or more arguments, not {len(argv)}")
    job = PbsJob(_need(argv[0], "job id"), _need(argv[1], "user"), _field(argv[2]), name=_field(argv[3]),
                 resources=parse_resource_list(argv[5]), queue=_field(argv[7]), account=_field(argv[8]))
    status = argv[9].strip()
    return job, int(status) if re.fullmatch(r"-?[0-9]{1,10}", status) else None


def parse_resource_list(text: str) -> Tuple[Tuple[str, str], ...]:
    """``ncpus=1,place=free,walltime=00:05:00`` or ``neednodes=1:ppn=2,nodes=1:ppn=2``: (name, value)
    pairs in order; items without ``=`` are skipped (never an error: the mom wrote them)."""
    pairs = []
    for item in (text or "").split(","):
        name, equals, value = item.partition("=")
        name = name.strip()
        if equals and name:
            pairs.append((name, value.strip()))
    return tuple(pairs)


_SIZE = re.compile(r"([0-9]{1,18})\s*([kmgtp]?)([bw]?)", re.IGNORECASE)
_SCALE = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_pbs_size(text: str) -> Size:
    """A PBS size: an integer with an optional ``b``/``w`` unit and ``k m g t p`` (powers of 1024);
    no unit means bytes, a word is 8 bytes (PBS's own rule)."""
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise QuantityError(f"size {str(text)[:40]!r}: expected a PBS size such as 2gb, 512mb or 1048576")
    number, scale, unit = match.groups()
    return Size(int(number) * 1024 ** _SCALE[scale.lower()] * (8 if unit.lower() == "w" else 1))


def parse_pbs_duration(text: str) -> Duration:
    """A PBS duration: ``[[HH:]MM:]SS[.fraction]`` or plain seconds (fractions are dropped)."""
    text = str(text).strip()
    if not re.fullmatch(r"[0-9]{1,12}(:[0-9]{1,12}){0,2}(\.[0-9]{0,12})?", text):
        raise QuantityError(f"walltime {text[:40]!r}: expected [[HH:]MM:]SS or seconds")
    seconds = 0
    for part in text.split(".")[0].split(":"):
        seconds = seconds * 60 + int(part)
    return Duration(seconds)


def _chunk_total(spec: str, name: str) -> Optional[int]:
    """Sum ``name`` over ``N:name=M+N:...`` chunks (select, or Torque's nodes with ppn)."""
    total, found = 0, False
    for chunk in spec.split("+"):
        parts = chunk.split(":")
        count = _whole(parts[0], "chunk count") if parts[0].isdigit() else 1
        for part in parts:
            key, _, value = part.partition("=")
            if key == name and value.isdigit():
                total, found = total + count * _whole(value, name), True
    return total if found else None


def submission_of(job: PbsJob) -> Submission:
    """The routing facts of a job. Raises QuantityError for a resource value that is not one."""
    walltime = job.resource("walltime")
    mem = job.resource("mem")
    cores: Optional[int] = None
    ncpus = job.resource("ncpus") or job.resource("procs")
    if ncpus is not None:
        cores = _whole(ncpus, "ncpus")
    else:
        for spec, name in ((job.resource("select"), "ncpus"), (job.resource("nodes"), "ppn")):
            if spec and cores is None:
                cores = _chunk_total(spec, name)
    memory = None if mem is None else parse_pbs_size(mem)
    if memory is None and job.resource("select"):
        chunked = _chunk_total_sizes(job.resource("select") or "")
        memory = chunked
    return Submission(
        queue=job.queue, user=job.user, group=job.group, account=job.account,
        walltime=None if walltime is None else parse_pbs_duration(walltime),
        memory=memory, cores=cores or None, environment=_field(job.resource(ENV_RESOURCE) or ""),
        name=job.name,
    )


def _chunk_total_sizes(spec: str) -> Optional[Size]:
    total, found = 0, False
    for chunk in spec.split("+"):
        parts = chunk.split(":")
        count = _whole(parts[0], "chunk count") if parts[0].isdigit() else 1
        for part in parts:
            key, _, value = part.partition("=")
            if key == "mem":
                total, found = total + count * parse_pbs_size(value), True
    return Size(total) if found else None


# -- where the 3-argument OpenPBS prologue gets its facts -----------------------------------------


def default_qstat() -> str:
    """``$PBS_EXEC/bin/qstat`` from ``/etc/pbs.conf`` (read at install time), else ``/usr/bin/qstat``."""
    try:
        with open(os.environ.get("PBS_CONF_FILE", "/etc/pbs.conf")) as stream:
            for line in stream:
                key, _, value = line.strip().partition("=")
                if key == "PBS_EXEC" and value:
                    return os.path.join(value, "bin", "qstat")
    except OSError:
        pass
    return "/usr/bin/qstat"


_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt]|.)', re.DOTALL)


def qstat_json_text(text: str) -> str:
    """``qstat -F json`` output made JSON: OpenPBS 23.06 leaves a backslash in a job's attributes (a
    ``sed 's/\\(x\\)/'`` in its arguments) as it is (``strdup_escape`` in ``src/lib/Libcmds/pbs_json.c``
    passes ``\\`` and the character after it through), an invalid escape that fails the whole document.
    Each such backslash is escaped; valid escapes stay."""
    try:
        json.loads(text)
        return text
    except ValueError:
        return _ESCAPE.sub(lambda m: m.group(0) if len(m.group(1)) > 1 or m.group(1) in '"\\/bfnrt'
                           else "\\\\" + m.group(1), text)


def facts_from_qstat_json(text: str, job: PbsJob) -> PbsJob:
    """Queue, account, name and resources from ``qstat -f -F json ID``; user and group stay the mom's."""
    try:
        jobs = json.loads(qstat_json_text(text))["Jobs"]
        record = jobs.get(job.job_id)
        if record is None and len(jobs) == 1:  # qstat may spell the id with the server's full name
            record = next(iter(jobs.values()))
        if not isinstance(record, dict):
            raise KeyError(job.job_id)
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise FactsUnavailable(f"qstat -f -F json gave nothing usable for job {job.job_id}") from None
    resources = record.get("Resource_List") or {}
    if not isinstance(resources, dict):
        resources = {}

    def text_of(value) -> Optional[str]:
        return None if value is None or isinstance(value, (dict, list)) else str(value)

    return attrs.evolve(
        job, queue=text_of(record.get("queue")), account=text_of(record.get("Account_Name")),
        name=text_of(record.get("Job_Name")),
        resources=tuple((str(k), str(v)) for k, v in resources.items() if text_of(v) is not None),
        complete=True,
    )


def facts_from_qstat(qstat: str, job: PbsJob, timeout: float = QSTAT_TIMEOUT) -> PbsJob:
    """Ask the server (``qstat -f -F json``), bounded by ``timeout``; FactsUnavailable if it can't say."""
    try:
        done = subprocess.run([qstat, "-f", "-F", "json", job.job_id], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, env={"PATH": "/bin:/usr/bin"})
    except subprocess.TimeoutExpired:
        raise FactsUnavailable(f"{qstat} did not answer within {timeout:g}s") from None
    except OSError as error:
        raise FactsUnavailable(f"cannot run {qstat}: {error.strerror}") from None
    if done.returncode != 0:
        said = " ".join(done.stderr.decode("utf-8", "replace").split())[:200]
        raise FactsUnavailable(f"{qstat} -f {job.job_id} failed with exit {done.returncode}: {said}")
    return facts_from_qstat_json(done.stdout.decode("utf-8", "replace"), job)


# -- routing on the execution host ----------------------------------------------------------------


def job_workdir(environ: Mapping[str, str]) -> Optional[str]:
    """The job's directory as the mom gives it: ``PBS_JOBDIR`` (OpenPBS), else ``PBS_O_WORKDIR``."""
    for name in ("PBS_JOBDIR", "PBS_O_WORKDIR"):
        value = environ.get(name)
        if value and value.startswith("/"):
            return value
    return None


@attrs.frozen
class PrepareAnswer:
    outcome: Outcome
    message: str
    vo: Optional[str] = None
    guest: Optional[str] = None


class _OutOfTime(Exception):
    pass


def prepare_job(config, job: PbsJob, workdir: Optional[str], budget: float,
                qstat: Optional[str] = None) -> PrepareAnswer:
    """Route (after completing the facts with qstat if needed) and prepare, all within ``budget`` s."""
    from blahvm.lifecycle import prepare

    started = time.monotonic()
    if not job.complete:
        if qstat is None:
            return PrepareAnswer(Outcome.RETRY_ELSEWHERE, f"job {job.job_id}: no queue, account or resources "
                                 "and no qstat to ask")
        job = facts_from_qstat(qstat, job, timeout=min(QSTAT_TIMEOUT, budget / 3))
    try:
        submission = submission_of(job)
    except QuantityError as error:
        return PrepareAnswer(Outcome.FAIL_JOB, f"job {job.job_id}: {error}")
    from blahvm.batch.execution import execution_job

    routed = execution_job(config, job.job_id, submission, workdir=workdir, name=job.name)
    if isinstance(routed, Rejection):
        return PrepareAnswer(Outcome.FAIL_JOB, f"job {job.job_id}: rejected on this host: {routed.reason}")
    remaining = budget - (time.monotonic() - started)
    if remaining < 1:
        return PrepareAnswer(Outcome.RETRY_ELSEWHERE, f"job {job.job_id}: no time left to prepare")
    result = prepare(config, routed, ready_timeout=remaining)
    return PrepareAnswer(result.outcome, result.message, routed.decision.vo, result.guest)


def _bounded(seconds: float, function):
    """``function()``, or _OutOfTime raised in it after ``seconds`` (main thread only)."""
    def expire(signum, frame):
        raise _OutOfTime()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _say(line: str) -> None:
    """One line on stderr (the job's .e file for a prologue: the user learns why)."""
    try:
        os.write(2, f"blahvm: {' '.join(line.split())}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _load(config_path: str):
    from blahvm.config import load_config

    return load_config(config_path)


# -- the classic scripts ----------------------------------------------------------------------------


def prologue(config: str, argv: Optional[List[str]] = None, qstat: Optional[str] = None,
             budget: float = DEFAULT_BUDGET, log_file: Optional[str] = None) -> int:
    """``mom_priv/prologue``: 0 run, 1 abort (FAIL_JOB), 2 requeue (RETRY_ELSEWHERE or out of time)."""
    argv = sys.argv[1:] if argv is None else argv
    started = time.monotonic()

    def body() -> int:
        # The OpenPBS mom runs it with umask 077; the directories prepare makes for the job's user to
        # reach (the run dir root) must stay traversable.
        os.umask(0o022)
        try:
            job = parse_prologue_argv(argv)
        except BadArguments as error:
            _say(f"prologue: {error}")
            log_event("prologue", str(error), log_file=log_file)
            return EXIT_ABORT
        try:
            site = _load(config)
        except BlahvmError as error:
            log_event("prologue", f"config: {error}", job_id=job.job_id, user=job.user, log_file=log_file)
            _say("prologue: this host's blahvm config is broken; requeued")
            return EXIT_REQUEUE
        logs = log_file or site.host.log_file
        remaining = budget - (time.monotonic() - started)
        try:
            answer = _bounded(remaining, lambda: prepare_job(site, job, job_workdir(os.environ), remaining - 0.5,
                                                             qstat))
        except _OutOfTime:
            answer = PrepareAnswer(Outcome.RETRY_ELSEWHERE, f"job {job.job_id}: not ready within {budget:g}s")
        except FactsUnavailable as error:
            answer = PrepareAnswer(Outcome.RETRY_ELSEWHERE, str(error))
        log_event("prologue", f"{answer.outcome.value}: {answer.message}", job_id=job.job_id, user=job.user,
                  vo=answer.vo, guest=answer.guest, log_file=logs)
        if answer.outcome is not Outcome.OK:
            _say(f"prologue: {answer.message}")
        return PROLOGUE_EXIT[answer.outcome]

    return run_hook("prologue", body, on_error=EXIT_REQUEUE, log_file=log_file)


def epilogue(config: str, argv: Optional[List[str]] = None, log_file: Optional[str] = None) -> int:
    """``mom_priv/epilogue``: tear the guest down. 0 when nothing is left, 1 otherwise (only logged by
    PBS; never 2, which OpenPBS reads as 'requeue a checkpointed job')."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from blahvm.lifecycle import teardown

        try:
            job, status = parse_epilogue_argv(argv)
        except BadArguments as error:
            log_event("epilogue", str(error), log_file=log_file)
            _say(f"epilogue: {error}")
            return 1
        site = _load(config)
        result = teardown(site, job.job_id)
        log_event("epilogue", f"{result.outcome.value}: exit status {status}: {result.message}", job_id=job.job_id,
                  user=job.user, log_file=log_file or site.host.log_file)
        return 0 if result.outcome is Outcome.OK else 1

    return run_hook("epilogue", body, on_error=1, log_file=log_file)


# -- running the job in its guest -------------------------------------------------------------------


def payload_of(argv: Sequence[str]) -> Tuple[List[str], bool]:
    """What to run in the guest, and whether it reads the job script on stdin.

    A lone absolute path to a shell is the job's shell for a script job (Torque's ``starter SHELL``,
    OpenPBS's rewritten ``[WRAPPER, SHELL]``): it runs as a login shell (``-l``) reading the script on
    stdin, as the mom would have run it. Anything else (``qsub -- prog args``) runs as given.
    """
    argv = list(argv)
    if len(argv) == 1 and argv[0].startswith("/") and os.path.basename(argv[0]) in SHELLS:
        return [argv[0], "-l"], True
    return argv, False


_SCRIPT_PATH = re.compile(r"(/(?:[^\n]*/)?mom_priv/jobs/[^/\n]+\.SC)\n?\Z")
SCRIPT_NAME_MAX = 4096


def script_stdin(uid: int, fd: int = 0) -> int:
    """The fd the job's shell reads its script from in the guest.

    The OpenPBS mom writes the *path* of the script, ``PBS_HOME/mom_priv/jobs/ID.SC`` (brackets
    escaped), on the shell's stdin, not its text; that path is not in the guest. When stdin is exactly
    such a line naming a regular file of the job's user (the mom chowns it to them), the file is
    opened in its place. Anything else (Torque passes the script itself) is passed on unchanged,
    bytes already read included.
    """
    read = b""
    while len(read) <= SCRIPT_NAME_MAX:
        chunk = os.read(fd, SCRIPT_NAME_MAX + 1 - len(read))
        if not chunk:
            break
        read += chunk
    else:
        return _replay(read, fd)
    match = _SCRIPT_PATH.match(read.decode("utf-8", "replace"))
    if match:
        path = match.group(1).replace("\\[", "[").replace("\\]", "]")
        try:
            opened = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            opened = -1
        if opened >= 0:
            status = os.fstat(opened)
            import stat as stat_module

            if stat_module.S_ISREG(status.st_mode) and status.st_uid == uid:
                return opened
            os.close(opened)
    return _replay(read, None)


def _replay(read: bytes, rest: Optional[int]) -> int:
    """An fd that gives ``read`` and then whatever is left on ``rest``."""
    memory = os.memfd_create("blahvm-stdin")
    os.write(memory, read)
    if rest is not None:
        while True:
            chunk = os.read(rest, 1 << 16)
            if not chunk:
                break
            os.write(memory, chunk)
    os.lseek(memory, 0, os.SEEK_SET)
    return memory


def launch_job_of(job_id: str, workdir: Optional[str]):
    """A Job enough for ``launch`` (run as the job's user: its uid, gid and the prepared socket)."""
    from blahvm.model import Decision, Job

    account = pwd.getpwuid(os.getuid())
    placeholder = Decision(queue="", environment="", rule="", vo=None, memory=Size(0), vcpus=1)
    return Job(job_id=job_id, user=account.pw_name, decision=placeholder, uid=os.getuid(), gid=os.getgid(),
               workdir=workdir)


def _inside(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory + "/") or directory == "/"


def job_starter(config: str, argv: Optional[List[str]] = None, log_file: Optional[str] = None) -> int:
    """Torque ``$job_starter`` / the OpenPBS launch wrapper: the job's exit code (255: never ran)."""
    from blahvm.lifecycle import LAUNCH_FAILED

    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from blahvm.lifecycle import launch

        if not argv:
            _say("job starter: no program to run")
            return LAUNCH_FAILED
        if os.getuid() == 0:
            _say("job starter: runs as the job's user, not root (unset $job_starter_run_privileged)")
            return LAUNCH_FAILED
        job_id = os.environ.get("PBS_JOBID", "")
        if not job_id:
            _say("job starter: PBS_JOBID is not set: not started by a PBS mom")
            return LAUNCH_FAILED
        site = _load(config)
        payload, script_job = payload_of(argv)
        workdir = job_workdir(os.environ)
        try:
            here = os.getcwd()
        except OSError:
            here = None
        if not shared_dir(workdir, os.getuid()):
            workdir = None  # not shared: the payload runs in the guest's own directory
        cwd = here if here and workdir and _inside(here, workdir) else workdir
        stdin = script_stdin(os.getuid()) if script_job else 0
        try:
            return launch(site, launch_job_of(job_id, workdir), payload, env=dict(os.environ), cwd=cwd,
                          stdin=stdin, stdout=1, stderr=2)
        finally:
            if stdin != 0:
                os.close(stdin)

    return run_hook("job_starter", body, on_error=LAUNCH_FAILED, log_file=log_file)


# -- the OpenPBS Python hook ----------------------------------------------------------------------


def _text(value) -> Optional[str]:
    if value is None:
        return None
    text = str(value)
    return text or None


def job_from_hook(pbs, job, user: Optional[str] = None) -> PbsJob:
    """The facts of ``e.job`` (``Resource_List`` as the ``name=value,...`` text PBS prints)."""
    owner = user or _text(getattr(job, "euser", None))
    if owner is None:
        owner = (_text(getattr(job, "Job_Owner", None)) or "").split("@")[0]
    group = _text(getattr(job, "egroup", None))
    if group is None and owner:
        try:
            group = grp.getgrgid(pwd.getpwnam(owner).pw_gid).gr_name
        except KeyError:
            group = None
    queue = getattr(job, "queue", None)
    queue_name = _text(getattr(queue, "name", queue)) if queue is not None else None
    resources = []
    listing = getattr(job, "Resource_List", None)
    if listing is not None:
        resources = list(parse_resource_list(str(listing)))
    return PbsJob(job_id=_text(getattr(job, "id", None)) or "", user=owner or "", group=group,
                  name=_text(getattr(job, "Job_Name", None)), queue=queue_name,
                  account=_text(getattr(job, "Account_Name", None)), resources=tuple(resources))


def _route_submission(site, submission: Submission):
    from blahvm.routing.engine import route

    return route(site, submission)


_configs: Dict[str, Tuple[float, object]] = {}


def _cached_config(path: str):
    """queuejob runs inside pbs_server, where module state persists: reload only when the file changes."""
    mtime = os.stat(path).st_mtime
    cached = _configs.get(path)
    if cached is None or cached[0] != mtime:
        cached = (mtime, _load(path))
        _configs[path] = cached
    return cached[1]


def openpbs_hook(pbs, settings: Mapping) -> None:
    """Handle the current event of the blahvm hook; ends with ``e.accept()`` or ``e.reject(msg)``.

    ``settings`` is the hook's config file: ``config`` (site.yaml), ``job_starter`` (the wrapper),
    ``budget`` (seconds prepare may take), ``log_file``.
    """
    event = pbs.event()
    kind = event.type
    config_path = settings["config"]
    log_file = settings.get("log_file")
    try:
        if kind == pbs.QUEUEJOB:
            _queuejob(pbs, event, _cached_config(config_path), log_file)
        elif kind in (pbs.EXECJOB_BEGIN, pbs.EXECJOB_PROLOGUE):
            _begin(pbs, event, _load(config_path), settings, log_file)
        elif kind == pbs.EXECJOB_LAUNCH:
            _launch(event, _load(config_path), settings["job_starter"])
        elif kind in (pbs.EXECJOB_EPILOGUE, pbs.EXECJOB_END):
            _end(pbs, event, kind, _load(config_path), log_file)
        elif kind in (_event_code(pbs, "EXECJOB_POSTSUSPEND"), _event_code(pbs, "EXECJOB_PRERESUME")):
            _suspension(pbs, event, kind, _load(config_path), log_file)
        elif kind == pbs.EXECHOST_PERIODIC:
            _periodic(pbs, event, _load(config_path), log_file)
    except BlahvmError as error:
        _refuse(pbs, event, kind, f"blahvm: {error}", log_file)
    except (OSError, QuantityError) as error:
        _refuse(pbs, event, kind, f"blahvm: {error}", log_file)
    event.accept()


def requeue_by_rerun(pbs, kind) -> bool:
    """Whether a requeue at this event needs ``job.rerun()``: only at execjob_launch (a bare reject there
    deletes the job). At execjob_begin and execjob_prologue a bare reject requeues by itself, and
    ``job.rerun()`` must not be called: it has the server set the job's ``Exit_status`` to
    JOB_EXEC_HOOK_RERUN (-18), which OpenPBS 23.06 never clears again (``svr_startjob`` in
    ``src/server/req_runjob.c`` clears it only inside an ``if`` that never runs: braces missing), and
    ``job_obit`` (``req_jobobit.c``) puts that -18 in place of the exit status of every later run: the job
    runs, ends, is requeued and runs again, forever."""
    return kind == pbs.EXECJOB_LAUNCH


def back_off(pbs, event) -> None:
    """Before a requeueing reject at execjob_begin: publish no ``blahvm_slots`` on this host until the next
    exechost_periodic counts them again. OpenPBS requeues the job and its scheduler sends it again at once,
    to the same host, until ``run_count`` passes 20 and the job is held (``post_sendmom``,
    ``check_failed_attempts`` in ``src/server/req_runjob.c``): 21 refusals in about 6 s. The mom pushes a
    hook's vnode changes to the server whether the hook accepts or rejects (``run_hook`` in
    ``src/resmom/mom_hook_func.c``), so the job waits, queued, for ``freq`` seconds and the next scheduling
    cycle instead; a periodic that cannot count (hypervisor down) leaves it at 0."""
    try:
        event.vnode_list[pbs.get_local_nodename()].resources_available[SLOTS_RESOURCE] = 0
    except Exception as error:  # the refusal itself must still happen; pbs raises its own error types
        log_event("execjob_begin", f"cannot withdraw this host's slots: {error}")


def _refuse(pbs, event, kind, message: str, log_file) -> None:
    """A failure of ours: a queuejob says why; an execution event requeues (the host may be at fault)."""
    log_event("pbs-hook", message, log_file=log_file)
    if kind == pbs.EXECJOB_BEGIN:
        back_off(pbs, event)
    if requeue_by_rerun(pbs, kind):
        event.job.rerun()
    if kind in (pbs.QUEUEJOB, pbs.EXECJOB_BEGIN, pbs.EXECJOB_PROLOGUE, pbs.EXECJOB_LAUNCH):
        event.reject(" ".join(message.split()))
    event.accept()


def _queuejob(pbs, event, site, log_file) -> None:
    job = event.job
    facts = job_from_hook(pbs, job, user=_text(getattr(event, "requestor", None)))
    if facts.queue is None:
        try:
            facts = attrs.evolve(facts, queue=_text(pbs.server().default_queue))
        except Exception:  # no default queue: route on what there is
            pass
    try:
        submission = submission_of(facts)
    except QuantityError as error:
        event.reject(f"blahvm: {error}")
        return
    unsupported = one_host_refusal(_text(getattr(job, "sandbox", None)), _text(job.Resource_List["place"]),
                                   _text(job.Resource_List["select"]))
    if unsupported:
        log_event("queuejob", f"rejected: {unsupported}", user=facts.user, log_file=log_file)
        event.reject(unsupported)
        return
    decision = _route_submission(site, submission)
    if isinstance(decision, Rejection):
        log_event("queuejob", f"rejected: {decision.reason}", user=facts.user, log_file=log_file)
        event.reject(" ".join(decision.reason.split()))
        return
    job.queue = pbs.server().queue(decision.queue)
    if decision.walltime is not None:
        job.Resource_List["walltime"] = pbs.duration(decision.walltime.clock())
    job.Resource_List[ENV_RESOURCE] = decision.environment
    for name, value in parse_resource_list(decision.resources or ""):
        job.Resource_List[name] = value
    chosen = job.Resource_List["select"]
    if chosen is not None and str(chosen):
        job.Resource_List["select"] = pbs.select(select_with_slot(str(chosen)))
        job.Resource_List["place"] = pbs.place(packed_place(_text(job.Resource_List["place"])))
    else:  # an old-style request: PBS makes the select from the job-wide host-level resources
        job.Resource_List[SLOTS_RESOURCE] = 1
    log_event("queuejob", f"route {decision.rule}: queue {decision.queue}, environment {decision.environment}",
              user=facts.user, vo=decision.vo, log_file=log_file)


SCATTERING = ("scatter", "vscatter")
SANDBOX_REFUSED = ("blahvm: -W sandbox=PRIVATE is not supported: OpenPBS makes the private job directory "
                   "after execjob_begin has made the job's guest, which could not see it (submit without it)")


def _chunks(select: Optional[str]) -> int:
    """How many chunks a ``select`` asks for (``2:ncpus=1+1:mem=1gb`` is 3); 1 without one."""
    if not select:
        return 1
    total = 0
    for chunk in select.split("+"):
        head = chunk.split(":")[0]
        total += int(head) if head.isascii() and head.isdigit() and len(head) <= MAX_DIGITS else 1
    return max(total, 1)


def one_host_refusal(sandbox: Optional[str], place: Optional[str], select: Optional[str]) -> Optional[str]:
    """Why a job cannot run in one guest, or None. A job runs in one guest on one host: chunks spread
    over hosts (``place=scatter`` or ``vscatter`` with more than one chunk) would put the others on
    hosts with no guest of theirs; ``sandbox=PRIVATE`` names a directory made after the guest (pure)."""
    if sandbox and sandbox.upper() == "PRIVATE":
        return SANDBOX_REFUSED
    arrangement = [part for part in (place or "").split(":") if part in SCATTERING]
    if arrangement and _chunks(select) > 1:
        return (f"blahvm: place={place} spreads the job's {_chunks(select)} chunks over hosts; a job runs in one "
                "guest on one host (leave place out, or use place=pack)")
    return None


def packed_place(place: Optional[str]) -> str:
    """``place`` with every chunk on one host, the job's guest's: the arrangement becomes ``pack``
    (``free``, PBS's default, may spread chunks over hosts); sharing and ``group=`` stay (pure)."""
    kept = [part for part in (place or "").split(":") if part and part not in ("free", "pack") + SCATTERING]
    return ":".join(["pack"] + kept)


def exec_hosts(exec_host: Optional[str]) -> Tuple[str, ...]:
    """The distinct hosts of ``exec_host`` (``vm/0*2+vm/1``), in order (pure)."""
    hosts: List[str] = []
    for part in (exec_host or "").split("+"):
        host = part.split("/")[0].strip()
        if host and host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def start_refusal(job) -> Optional[str]:
    """Why a job that reached execjob_begin cannot run in one guest (a ``qalter`` after queuejob
    routed it), or None: a permanent refusal, never retried."""
    hosts = exec_hosts(_text(getattr(job, "exec_host", None)))
    if len(hosts) > 1:
        return f"blahvm: the job's chunks are on {len(hosts)} hosts; a job runs in one guest on one host"
    sandbox = _text(getattr(job, "sandbox", None))
    if sandbox and sandbox.upper() == "PRIVATE":
        return SANDBOX_REFUSED
    return None


def select_with_slot(select: str) -> str:
    """The job's ``select`` reserving exactly one ``blahvm_slots`` (one guest per job), on its first chunk
    (the mother superior's, where execjob_begin prepares the guest); whatever the user asked of it is
    replaced. ``2:ncpus=1`` becomes ``1:ncpus=1:blahvm_slots=1+1:ncpus=1``."""
    chunks = []
    for chunk in select.split("+"):
        parts = [part for part in chunk.split(":") if part.partition("=")[0] != SLOTS_RESOURCE]
        if parts and parts[0].isdigit():
            chunks.append((int(parts[0]), parts[1:]))
        else:
            chunks.append((1, parts))
    count, first = chunks[0]
    spelled = [":".join(["1"] + first + [f"{SLOTS_RESOURCE}=1"])]
    if count > 1:
        spelled.append(":".join([str(count - 1)] + first))
    spelled += [":".join([str(n)] + parts) for n, parts in chunks[1:]]
    return "+".join(spelled)


def begin_workdir(job, user: str) -> Optional[str]:
    """The directory the job will run in, known at ``execjob_begin``: ``e.job.jobdir`` once OpenPBS has
    set it; before that (23.06 sets it only after execjob_begin and execjob_prologue, in
    ``start_exec.c``) the one OpenPBS will use, ``PBS_JOBDIR``: the user's home directory, as it is
    without ``sandbox=PRIVATE`` (whose private directory does not exist yet: none is shared then)."""
    jobdir = _text(getattr(job, "jobdir", None))
    if jobdir and jobdir.startswith("/"):
        return jobdir
    sandbox = _text(getattr(job, "sandbox", None))
    if sandbox and sandbox.upper() == "PRIVATE":
        return None
    try:
        account = pwd.getpwnam(user)
    except (KeyError, TypeError, ValueError):
        return None
    return account.pw_dir if shared_dir(account.pw_dir, account.pw_uid) else None


def shared_dir(path: Optional[str], uid: int) -> bool:
    """Whether the job's directory is shared with its guest: an absolute directory its (non-root) user
    owns, the rule ``prepare`` enforces. Checked alike at execjob_begin and by the starter."""
    if not path or not path.startswith("/") or uid == 0:
        return False
    try:
        status = os.lstat(path)
    except (OSError, ValueError):
        return False
    import stat as stat_module

    return stat_module.S_ISDIR(status.st_mode) and status.st_uid == uid


def _begin(pbs, event, site, settings, log_file) -> None:
    job = event.job
    facts = job_from_hook(pbs, job)
    refused = start_refusal(job)
    if refused:
        log_event("execjob_begin", f"{Outcome.FAIL_JOB.value}: {refused}", job_id=facts.job_id, user=facts.user,
                  log_file=log_file or site.host.log_file)
        job.delete()
        event.reject(refused)
    workdir = begin_workdir(job, facts.user)
    budget = float(settings.get("budget", DEFAULT_BUDGET))
    try:
        answer = _bounded(budget, lambda: prepare_job(site, facts, workdir if workdir and workdir.startswith("/")
                                                      else None, budget - 0.5))
    except _OutOfTime:
        answer = PrepareAnswer(Outcome.RETRY_ELSEWHERE, f"job {facts.job_id}: not ready within {budget:g}s")
    log_event("execjob_begin", f"{answer.outcome.value}: {answer.message}", job_id=facts.job_id, user=facts.user,
              vo=answer.vo, guest=answer.guest, log_file=log_file or site.host.log_file)
    if answer.outcome is Outcome.RETRY_ELSEWHERE:  # a bare reject requeues: never job.rerun() here
        back_off(pbs, event)
        event.reject(" ".join(answer.message.split()))
    elif answer.outcome is Outcome.FAIL_JOB:
        # Accepted, so that the job ends with the reason on its stderr (execjob_launch runs the refusal in
        # its place): a rejected begin hook can reach neither the job's comment nor its output.
        note_refusal(site.host.state_dir, facts.job_id, answer.message)


# -- a permanent refusal at execjob_begin, told to the job's user -----------------------------------

REFUSED_EXIT = 255  # as the job starter's: the job never ran
REFUSALS = "pbs-refusals"  # under host.state_dir (root's): execjob_begin's reason for execjob_launch


def _refusal_path(state_dir: str, job_id: str) -> str:
    return os.path.join(state_dir, REFUSALS, job_id.encode("utf-8", "surrogatepass").hex())


def note_refusal(state_dir: str, job_id: str, reason: str) -> None:
    """Keep ``reason`` (one line) for the job's execjob_launch, root-only."""
    directory = os.path.join(state_dir, REFUSALS)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(_refusal_path(state_dir, job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as stream:
        stream.write(" ".join(reason.split()))


def take_refusal(state_dir: str, job_id: str) -> Optional[str]:
    """The reason execjob_begin kept for the job, removed; None when it refused nothing."""
    path = _refusal_path(state_dir, job_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as stream:
        reason = stream.read(4096)
    try:
        os.unlink(path)
    except OSError:
        pass
    return reason


def refused_launch(reason: str) -> Tuple[str, List[str]]:
    """What execjob_launch runs in the place of a refused job: the reason on its stderr, exit 255, on the
    host as the job's user, nothing else (the reason is an argument, never shell text). The mom's argv
    rebuild for script jobs (``-sh`` then the hook's argv[1:]) keeps it the same command."""
    from blahvm.errors import printable

    return "/bin/sh", ["/bin/sh", "-c", f'printf "%s\\n" "$1" >&2; exit {REFUSED_EXIT}', "blahvm",
                       f"blahvm: {printable(reason)}"]


def launch_rewrite(progname: str, argv: Sequence[str], wrapper: str) -> Tuple[str, List[str]]:
    """``execjob_launch``: run the wrapper in the job's place, for script jobs (argv ``[]``) and
    ``qsub --`` jobs alike: ``[WRAPPER, progname] + argv[1:]``."""
    return wrapper, [wrapper, progname] + list(argv)[1:]


def _launch(event, site, wrapper: str) -> None:
    reason = take_refusal(site.host.state_dir, str(event.job.id))
    if reason is not None:
        event.progname, event.argv = refused_launch(reason)
        return
    progname, argv = launch_rewrite(str(event.progname), [str(a) for a in (event.argv or [])], wrapper)
    event.progname = progname
    event.argv = argv


def _event_code(pbs, name: str) -> object:
    """The pbs module's code of an event, or a value no event has where this PBS lacks the event."""
    return getattr(pbs, name, object())


def _end(pbs, event, kind, site, log_file) -> None:
    """Tear the guest down. At execjob_epilogue (before the mom sends the job's obit) the guest's usage,
    read at teardown, is charged to the job's ``resources_used`` (``blahvm.batch.pbs_usage``)."""
    from blahvm.lifecycle import teardown

    job_id = str(event.job.id)
    result = teardown(site, job_id)
    take_refusal(site.host.state_dir, job_id)  # a refused job that never reached execjob_launch
    name = "execjob_epilogue" if kind == pbs.EXECJOB_EPILOGUE else "execjob_end"
    logs = log_file or site.host.log_file
    log_event(name, f"{result.outcome.value}: {result.message}", job_id=job_id, log_file=logs)
    from blahvm.batch.pbs_usage import charge_job, forget_suspended

    if kind == pbs.EXECJOB_EPILOGUE:
        log_event(name, charge_job(pbs, event.job, site), job_id=job_id, log_file=logs)
    forget_suspended(site.host.state_dir, job_id)


def _suspension(pbs, event, kind, site, log_file) -> None:
    """``qsig -s suspend``: the mom stops the job's processes (the starter), then execjob_postsuspend pauses
    the guest; ``qsig -s resume``: execjob_preresume resumes the guest before the mom continues the starter
    (``post_suspend`` and ``local_supres`` in ``src/resmom/requests.c``). A guest that cannot be resumed now
    (the hypervisor did not answer) refuses the resume: the job stays suspended, whole, and the admin's qsig
    says so; a job without a running guest is the mom's alone."""
    from blahvm.lifecycle import resume, suspend

    from blahvm.batch.pbs_usage import read_suspended, write_suspended

    job_id = str(event.job.id)
    resuming = kind == _event_code(pbs, "EXECJOB_PRERESUME")
    result = (resume if resuming else suspend)(site, job_id)
    if result.outcome is Outcome.OK:  # the time suspended is taken off the guest's walltime at the end
        was = read_suspended(site.host.state_dir, job_id)
        now = time.time()
        write_suspended(site.host.state_dir, job_id, was.resumed(now) if resuming else was.paused(now))
    name = "execjob_preresume" if resuming else "execjob_postsuspend"
    log_event(name, f"{result.outcome.value}: {result.message}", job_id=job_id,
              log_file=log_file or site.host.log_file)
    if resuming and result.outcome is Outcome.RETRY_ELSEWHERE:
        event.reject(" ".join(result.message.split()))


def host_slots(site, pbs_jobs: Optional[Sequence[str]] = None):
    """``resources_available.blahvm_slots``: the guests PBS may run here, free slots plus those its jobs'
    guests hold now (at most ``max_guests``). PBS subtracts each running job's ``blahvm_slots=1`` itself:
    publishing only the free slots counted every running guest twice (observed: two jobs on two slots
    ran, the others stayed queued until the next cycle). ``pbs_jobs``: the ids of the jobs PBS has on this
    host (``e.job_list``); only their guests are added back, so guests PBS does not know of (``blahvm run``,
    a job of another batch system on the same installation) lower the figure and PBS sends no job that
    execjob_begin would have to refuse. Returns (slots or None when it cannot be known, the capacity it
    was taken from)."""
    from blahvm.ledger import Ledger
    from blahvm.ledger.errors import LedgerError
    from blahvm.lifecycle import capacity

    free = capacity(site)
    if free.outcome is not Outcome.OK:
        return None, free
    try:
        with Ledger(site.host) as ledger:
            live = [entry.job_id for entry in ledger.live()]
    except LedgerError as error:
        return None, attrs.evolve(free, outcome=Outcome.RETRY_ELSEWHERE, message=str(error))
    held = len(live) if pbs_jobs is None else sum(1 for job_id in live if job_id in set(pbs_jobs))
    return min(max(int(free.guests), 0) + held, site.host.max_guests), free


def _periodic(pbs, event, site, log_file) -> None:
    listed = getattr(event, "job_list", None)
    slots, free = host_slots(site, None if listed is None else [str(job_id) for job_id in listed])
    if slots is None:
        log_event("exechost_periodic", free.message, log_file=log_file or site.host.log_file)
        return
    vnode = event.vnode_list[pbs.get_local_nodename()]
    vnode.resources_available[SLOTS_RESOURCE] = slots
    vnode.resources_available[ENVS_RESOURCE] = ",".join(free.environments) or "none"

