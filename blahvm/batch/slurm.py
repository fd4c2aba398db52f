"""Slurm: routing at submission (called by job_submit.lua), Prolog, Epilog and the task wrapper.

- ``route_main``   job_submit.lua runs it in slurmctld with the submission's facts as options; it
                   prints one line: ``route<TAB>PARTITION<TAB>FEATURES<TAB>RULE<TAB>MINUTES`` or
                   ``reject<TAB>REASON``.
- ``prolog_main``  Prolog (root, ``SLURM_*`` variables only): re-routes, prepares the guest.
                   OK -> 0; RETRY_ELSEWHERE -> ``scontrol requeue`` and 0; FAIL_JOB -> ``scancel``
                   and 0. Never non-zero for a job's own fault: that would drain the node.
- ``epilog_main``  Epilog (root): teardown. Non-zero only when the host itself is broken.
- ``task_main``    the batch script's interpreter (job_submit.lua puts ``#!TASK`` in front of the
                   script) and every srun task (the SPANK plugin execs ``TASK -- CMD``): runs the job
                   inside its guest as the job user.
- ``follow_main``  started as root by the SPANK plugin for each task (``FOLLOW JOBID PID``), detached
                   from the step: pauses the job's guest while Slurm has the task stopped
                   (``scontrol suspend``, preemption by suspension) and resumes it with the task.
- ``charge_main``  started as root by the SPANK plugin when the extern step starts (``CHARGE JOBID
                   STEPD``), detached: moves the job's guest into the extern step's cgroups, so
                   Slurm's cgroup plugins account, limit and freeze it (``blahvm.lifecycle.charge``).
- ``health_main``  HealthCheckProgram (root, periodic): drains the node while its hypervisor, ledger
                   or config is unusable and resumes it after; keeps the node's ``blahvm`` GRES at
                   the guest slots Slurm may still fill (``max_guests`` less those held outside Slurm).
"""

from __future__ import annotations

import os
import subprocess
import sys

from blahvm.batch.hook import run_hook
from blahvm.batch.log import log_event
from blahvm.errors import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

    from blahvm.model import Job, Rejection, SiteConfig

NO_VAL = 0xFFFFFFFE  # Slurm's "not set" for 32-bit fields; 64-bit ones come through Lua as big doubles
INFINITE = 0xFFFFFFFF  # Slurm's "unlimited" (--time=UNLIMITED): the longest walltime there is
UNLIMITED_SECONDS = INFINITE * 60  # what routing sees for it: above every limit a route or queue sets
BATCH_SHIM = 'f=$(mktemp) && printf %s "$1" >"$f" && chmod 0700 "$f" && shift && exec "$f" "$@"'
TASK_FAILED = 255  # the job never ran in its guest


def _say(line: str) -> None:
    try:
        os.write(2, f"{printable(' '.join(line.split()))}\n".encode("utf-8", "replace"))
    except OSError:
        pass


# -- facts --------------------------------------------------------------------------------------


def _number(text: "Optional[str]", limit: int = NO_VAL) -> "Optional[int]":
    """A Slurm number, or None when it is missing, not set (NO_VAL, INFINITE) or not a number."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if value != value or value < 0 or value >= limit:
        return None
    return int(value)


def _group_name(gid: "Optional[str]") -> "Optional[str]":
    import grp

    number = _number(gid)
    if number is None:
        return None
    try:
        return grp.getgrgid(number).gr_name
    except KeyError:
        return None


def _cores(cpus_per_node: "Optional[str]") -> "Optional[int]":
    """``SLURM_JOB_CPUS_PER_NODE`` is ``2`` or ``2(x3)`` or ``2,1``: the first node's count."""
    if not cpus_per_node:
        return None
    return _number(cpus_per_node.split(",")[0].split("(")[0])


def _environment_wanted(config: "SiteConfig", constraints: "Optional[str]") -> "Optional[str]":
    """The environment a feature expression names, when it is exactly one environment's name."""
    if constraints and constraints in config.environments:
        return constraints
    return None


def node_name(environ: "Mapping[str, str]") -> str:
    """The Slurm node this hook runs for (slurmd sets SLURMD_NODENAME for the Prolog, Epilog and tasks)."""
    import socket

    return environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def job_key(job_id: str, environ: "Mapping[str, str]") -> str:
    """The job's name in this host's ledger: ``JOBID@NODE``, one guest per node of an allocation.

    With the node in it, the guests of one ``-N 2`` job never share a name, even where two nodes share
    one hypervisor (several slurmd on one machine): guest names come from this key alone.
    """
    return f"{job_id}@{node_name(environ)}"


def execution_job(config: "SiteConfig", environ: "Mapping[str, str]") -> "Union[Job, Rejection]":
    """The Job a Prolog prepares, from the ``SLURM_*`` variables slurmd sets (nothing else).

    The partition is where routing sent the job; the shared ``execution_job`` accepts the decision
    only when the rules, routing these facts from some queue, land it in this very partition.
    """
    from blahvm.batch.execution import execution_job as common_execution_job
    from blahvm.model import Submission

    submission = Submission(
        queue=environ.get("SLURM_JOB_PARTITION") or None,
        user=environ.get("SLURM_JOB_USER") or None,
        group=_group_name(environ.get("SLURM_JOB_GID")),
        account=environ.get("SLURM_JOB_ACCOUNT") or None,
        cores=_cores(environ.get("SLURM_JOB_CPUS_PER_NODE")),
        environment=_environment_wanted(config, environ.get("SLURM_JOB_CONSTRAINTS")),
    )
    return common_execution_job(config, job_key(environ.get("SLURM_JOB_ID", ""), environ), submission,
                                workdir=environ.get("SLURM_JOB_WORK_DIR") or None)


# -- submission: job_submit.lua calls this -------------------------------------------------------


def route_line(config_path: str, argv: "Sequence[str]", cache_dir: "Optional[str]" = None) -> str:
    """The answer to job_submit.lua for one submission's facts (given as ``--name value`` pairs):
    ``route<TAB>PARTITION<TAB>ENVIRONMENT<TAB>RULE<TAB>MINUTES`` (MINUTES, the decision's walltime as
    the job's time limit, empty when the decision has none) or ``reject<TAB>REASON``.

    ``--time`` is Slurm's time limit in minutes: NO_VAL (not given) lets the site's defaults apply,
    INFINITE (``--time=UNLIMITED``) is the longest walltime there is, so every limit refuses it.
    """
    import pwd

    from blahvm.quantities import Duration, Size
    from blahvm.routing.fast import load_table
    from blahvm.routing.table import FIELDS

    options = {}
    words = list(argv)
    if len(words) % 2:
        raise ValueError("options come in --name value pairs")
    for name, value in zip(words[::2], words[1::2]):
        if not name.startswith("--"):
            raise ValueError(f"unexpected argument {name!r}")
        options[name[2:]] = value
    table = load_table(config_path, cache_dir) if cache_dir else load_table(config_path)
    user = options.get("user") or None
    uid = _number(options.get("uid"))
    if user is None and uid is not None:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
    unlimited = _is_infinite(options.get("time"))
    minutes = INFINITE if unlimited else _number(options.get("time"), limit=NO_VAL)
    memory_mb = _number(options.get("mem"), limit=2 ** 63)
    cpus = _number(options.get("cpus"))
    nodes = _number(options.get("nodes"))
    if cpus and nodes and nodes > 1:  # Slurm's count is the job's; each node's guest gets its share
        cpus = -(-cpus // nodes)
    constraint = options.get("constraint") or None
    facts = dict.fromkeys(FIELDS)
    facts.update(
        queue=options.get("partition") or None,
        user=user,
        group=_group_name(options.get("gid")),
        account=options.get("account") or None,
        walltime=Duration(minutes * 60) if minutes else None,
        memory=Size(memory_mb * 1024 * 1024) if memory_mb else None,
        cores=cpus or None,
        environment=constraint,
    )
    result = table.decide(tuple(facts[name] for name in FIELDS))
    if result[0] == "route":
        _, rule, queue, environment = result[:4]
        return f"route\t{queue}\t{environment}\t{rule}\t{_time_limit(result[7])}"
    reason = " ".join(str(result[2]).split())
    if unlimited:  # say what the user asked for, not Slurm's number for it
        reason = reason.replace(f"walltime {Duration(UNLIMITED_SECONDS)}", "walltime UNLIMITED")
        reason = reason.replace(f"walltime={Duration(UNLIMITED_SECONDS)}", "walltime=UNLIMITED")
    return f"reject\t{reason}"


def _is_infinite(text: "Optional[str]") -> bool:
    try:
        return float(text or "") == INFINITE
    except ValueError:
        return False


def _time_limit(walltime: "Optional[int]") -> str:
    """The decision's walltime as Slurm's time limit (whole minutes, rounded up); empty: leave it as asked."""
    if walltime is None or walltime >= UNLIMITED_SECONDS:
        return ""
    return str(max(1, -(-int(walltime) // 60)))


def route_main(config: str, argv: "Optional[List[str]]" = None, cache_dir: "Optional[str]" = None) -> int:
    """Exit 0 with the answer on stdout; 2 with one line on stderr for bad input or a bad config."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from blahvm.errors import ConfigError

        try:
            line = route_line(config, argv, cache_dir)
        except ValueError as error:
            _say(f"blahvm slurm-route: {error}")
            return 2
        except ConfigError as error:
            _say(f"blahvm slurm-route: {error}")
            return 2
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return 0

    return run_hook("slurm-route", body, on_error=2)


# -- execution host -------------------------------------------------------------------------------


SLURM_CONF = "/etc/slurm/slurm.conf"  # Slurm's own default, when the install named none


def slurm_conf_problem(slurm_conf: "Optional[str]") -> "Optional[str]":
    """Make this hook's Slurm commands read the cluster's slurm.conf; why they cannot, or None.

    slurmd gives HealthCheckProgram (and a Prolog) no ``SLURM_CONF``: without it scontrol reads Slurm's
    default path, so a slurm.conf elsewhere must be named at install (``--slurm-conf``).
    """
    if os.environ.get("SLURM_CONF"):
        return None
    path = slurm_conf or SLURM_CONF
    if not os.path.isfile(path):
        return (f"slurm.conf not found: {path} is missing and slurmd gave no SLURM_CONF (install with "
                "--slurm-conf PATH)")
    os.environ["SLURM_CONF"] = path
    return None


def _slurm_output(slurm_bin: str, *args: str) -> str:
    """A Slurm command's stdout (hooks have no PATH); OSError with its complaint when it fails."""
    done = subprocess.run([os.path.join(slurm_bin, args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise OSError(" ".join((done.stderr or done.stdout or f"exit {done.returncode}").split()))
    return done.stdout


def _scontrol(slurm_bin: str, *args: str) -> "Optional[str]":
    """Run a Slurm command; None on success, else its complaint."""
    try:
        _slurm_output(slurm_bin, *args)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None


def prolog_main(config: str, slurm_bin: str = "/usr/bin", environ: "Optional[Mapping[str, str]]" = None,
                slurm_conf: "Optional[str]" = None) -> int:
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID", "")
    log_file = None

    def body() -> int:
        nonlocal log_file
        from blahvm.config import ConfigError, load_config
        from blahvm.lifecycle import prepare
        from blahvm.model import Outcome, Rejection

        problem = slurm_conf_problem(slurm_conf)
        if problem:
            log_event("slurm-prolog", problem, job_id=job_id)
        if not job_id.isdigit():
            log_event("slurm-prolog", f"no usable SLURM_JOB_ID ({job_id!r}): nothing prepared")
            return 0  # not a job: never drain the node for it
        try:
            site = load_config(config)
        except ConfigError as error:
            log_event("slurm-prolog", f"bad config: {error}", job_id=job_id)
            return _retry(job_id, slurm_bin, f"blahvm config unusable: {error}", None)
        log_file = site.host.log_file
        job = execution_job(site, environ)
        user = environ.get("SLURM_JOB_USER")
        if isinstance(job, Rejection):
            return _cancel(job_id, slurm_bin, job.reason, user, log_file)
        result = prepare(site, job)
        log_event("slurm-prolog", result.message, job_id=job_id, user=job.user, vo=job.decision.vo,
                  guest=result.guest, log_file=log_file)
        if result.outcome is Outcome.OK:
            return 0
        if result.outcome is Outcome.RETRY_ELSEWHERE:
            return _retry(job_id, slurm_bin, result.message, log_file)
        return _cancel(job_id, slurm_bin, result.message, job.user, log_file)

    return run_hook("slurm-prolog", body, on_error=0, log_file=log_file, stderr=False)


def _retry(job_id: str, slurm_bin: str, reason: str, log_file) -> int:
    problem = _scontrol(slurm_bin, "scontrol", "requeue", job_id)
    if problem is None:
        log_event("slurm-prolog", f"requeued: {reason}", job_id=job_id, log_file=log_file)
        return 0
    # a job that cannot be requeued (e.g. --no-requeue): cancel it rather than drain the node
    log_event("slurm-prolog", f"cannot requeue ({problem}); cancelling: {reason}", job_id=job_id,
              log_file=log_file)
    return _cancel(job_id, slurm_bin, reason, None, log_file)


def _cancel(job_id: str, slurm_bin: str, reason: str, user, log_file) -> int:
    # the reason for the user and the admin: AdminComment is shown by scontrol show job and sacct
    _scontrol(slurm_bin, "scontrol", "update", f"JobId={job_id}", f"AdminComment=blahvm: {' '.join(reason.split())}"[:1000])
    problem = _scontrol(slurm_bin, "scancel", job_id)
    log_event("slurm-prolog", f"cancelled: {reason}" if problem is None else f"cannot cancel ({problem}): {reason}",
              job_id=job_id, user=user, log_file=log_file)
    return 0


def epilog_main(config: str, environ: "Optional[Mapping[str, str]]" = None) -> int:
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID", "")

    def body() -> int:
        from blahvm.config import ConfigError, load_config
        from blahvm.lifecycle import teardown
        from blahvm.model import Outcome

        if not job_id.isdigit():
            log_event("slurm-epilog", f"no usable SLURM_JOB_ID ({job_id!r}): nothing to tear down")
            return 0
        try:
            site = load_config(config)
        except ConfigError as error:
            log_event("slurm-epilog", f"bad config: {error}", job_id=job_id)
            return 1  # the host cannot clean up: draining it is right
        result = teardown(site, job_key(job_id, environ))
        log_event("slurm-epilog", result.message, job_id=job_id, user=environ.get("SLURM_JOB_USER"),
                  log_file=site.host.log_file)
        # RETRY_ELSEWHERE: the hypervisor or ledger is broken; drain so no more jobs land here
        return 1 if result.outcome is Outcome.RETRY_ELSEWHERE else 0

    return run_hook("slurm-epilog", body, on_error=1, stderr=False)


def task_argv(argv: "Sequence[str]") -> "List[str]":
    """What runs in the guest: ``-- CMD ARGS`` as given, or a batch script (``SCRIPT ARGS``), whose
    first line is the ``#!TASK`` job_submit.lua put in front of it."""
    if not argv:
        raise ValueError("usage: TASK -- COMMAND [ARG ...] (or as a batch script's interpreter)")
    if argv[0] == "--":
        if len(argv) < 2:
            raise ValueError("no command after --")
        return list(argv[1:])
    with open(argv[0], "rb") as stream:
        text = stream.read()
    first, _, rest = text.partition(b"\n")
    if not first.startswith(b"#!"):
        rest = text
    if not rest.startswith(b"#!"):
        rest = b"#!/bin/sh\n" + rest
    return ["/bin/sh", "-c", BATCH_SHIM, "slurm_script", os.fsdecode(rest), *argv[1:]]


def _here() -> "Optional[str]":
    try:
        return os.getcwd()
    except OSError:  # removed under us
        return None


def task_main(config: str, argv: "Optional[List[str]]" = None, environ: "Optional[Mapping[str, str]]" = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ if environ is None else environ)

    def body() -> int:
        import pwd

        from blahvm.config import ConfigError, load_config
        from blahvm.lifecycle import launch
        from blahvm.model import Decision, Job
        from blahvm.quantities import Size

        try:
            command = task_argv(argv)
        except (ValueError, OSError) as error:
            _say(f"blahvm slurm-task: {error}")
            return TASK_FAILED
        job_id = environ.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            _say("blahvm slurm-task: not inside a Slurm job (no SLURM_JOB_ID)")
            return TASK_FAILED
        try:
            site = load_config(config)
        except ConfigError as error:
            _say(f"blahvm slurm-task: {error}")
            return TASK_FAILED
        # launch needs only the job's id (its guest's socket) and who to run as: ourselves. The
        # socket is ours alone (mode 0600), so nothing here is taken on trust from the environment.
        me = pwd.getpwuid(os.getuid())
        placeholder = Decision(queue=environ.get("SLURM_JOB_PARTITION", "-"), environment="-", rule="-",
                               vo=None, memory=Size(0), vcpus=1)
        job = Job(job_id=job_key(job_id, environ), user=me.pw_name, decision=placeholder, uid=os.getuid(), gid=os.getgid(),
                  workdir=environ.get("SLURM_JOB_WORK_DIR") or None)
        # The step's own directory (srun -D), which slurmstepd made ours: the guest has it at the same
        # path when it is in the job's shared work dir, and says so in one line when it is not.
        return launch(site, job, command, env=environ, cwd=_here() or job.workdir)

    return run_hook("slurm-task", body, on_error=TASK_FAILED)


def _followed_key(site: "SiteConfig", job_id: str) -> str:
    """The job's ledger key, for the root hooks the SPANK plugin starts: this job's one live entry on
    this host (one node of a job per host), else the key this host's name gives. Never from
    SLURMD_NODENAME: in the step's early callbacks it would be the job's own environment, which its
    user shapes, and a key of the user's choosing would leave the guest out of its job's suspension
    and cgroups."""
    from blahvm.ledger import Ledger

    with Ledger(site.host) as ledger:
        keys = [entry.job_id for entry in ledger.live() if entry.job_id.startswith(f"{job_id}@")]
    return keys[0] if len(keys) == 1 else job_key(job_id, {})


def _leave_job(hook: str, job_id: str) -> None:
    """Out of the job's cgroups (Slurm's cgroup plugins name them ``job_JOBID``) into init's: a hook started
    from inside the job that outlives a step keeps Slurm from removing the job's cgroups (seen: the
    follow hook, a moment after its task ended, left ``step_batch`` behind in the memory and cpuset
    hierarchies). Nothing moves where Slurm keeps no cgroups (proctrack/linuxproc)."""
    from blahvm import jobcgroup

    try:
        jobcgroup.leave_job(f"job_{job_id}")
    except (jobcgroup.CgroupError, OSError) as error:
        log_event(hook, f"could not leave job {job_id}'s cgroups: {error}", job_id=job_id)


def _spank_started(hook: str, usage: str, config: str, argv: "Sequence[str]") -> "Union[int, Tuple[str, int, SiteConfig]]":
    """``JOBID PID`` as the SPANK plugin passes them to a root hook it starts, and the site config; or
    the hook's exit code, its reason logged (nobody reads the stderr of a detached hook). The hook is
    then out of the job's cgroups."""
    from blahvm.config import ConfigError, load_config

    if len(argv) != 2 or not all(a.isdigit() and len(a) < 11 for a in argv) or int(argv[1]) == 0:
        log_event(hook, f"usage: {usage} (got {printable(' '.join(argv))[:200]})")
        return 2
    _leave_job(hook, argv[0])
    try:
        return argv[0], int(argv[1]), load_config(config)
    except ConfigError as error:
        log_event(hook, f"bad config: {error}", job_id=argv[0])
        return 1


def follow_main(config: str, argv: "Optional[List[str]]" = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from blahvm.lifecycle import follow
        from blahvm.model import Outcome

        started = _spank_started("slurm-follow", "FOLLOW JOBID PID", config, argv)
        if isinstance(started, int):
            return started
        job_id, pid, site = started
        result = follow(site, _followed_key(site, job_id), [pid])
        log_event("slurm-follow", result.message, job_id=job_id, log_file=site.host.log_file)
        return 0 if result.outcome is Outcome.OK else 1

    return run_hook("slurm-follow", body, on_error=1, stderr=False)


EXTERN_PLACEHOLDER = b"sleep"  # what slurmstepd execs as the extern step's one task (mgr.c, _spawn_job_container)


def placeholder_in(stats: "Iterable[bytes]", stepd: int) -> "Optional[int]":
    """The extern step's placeholder among ``/proc/PID/stat`` lines: the live child of slurmstepd
    ``stepd`` that runs ``sleep`` (pure); None unless there is exactly one."""
    found = []
    for stat in stats:
        try:
            pid = int(stat[: stat.index(b" ")])
            comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
            state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        except ValueError:
            continue
        if int(ppid) == stepd and comm == EXTERN_PLACEHOLDER and state not in (b"Z", b"X"):
            found.append(pid)
    return found[0] if len(found) == 1 else None


def _placeholder(stepd: int, wait: float = 10.0) -> "Optional[int]":
    """The extern step's placeholder process, once slurmstepd has started it (the SPANK plugin calls
    the charge hook right after its fork)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        lines = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as stream:
                        lines.append(stream.read())
                except OSError:
                    continue
        found = placeholder_in(lines, stepd)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def charge_main(config: str, argv: "Optional[List[str]]" = None) -> int:
    """``CHARGE JOBID STEPD``: started as root by the SPANK plugin when the job's extern step starts
    (``PrologFlags=Contain``), detached. Moves the job's guest into the cgroups Slurm gave the extern
    step's placeholder, so Slurm's cgroup plugins count, limit and freeze it, and records the guest's
    usage until Slurm ends it with the job."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        from blahvm.lifecycle.charge import charge
        from blahvm.model import Outcome

        started = _spank_started("slurm-charge", "CHARGE JOBID STEPD_PID", config, argv)
        if isinstance(started, int):
            return started
        job_id, stepd, site = started
        key = _followed_key(site, job_id)
        reference = _placeholder(stepd)
        if reference is None:
            log_event("slurm-charge", f"charge {key}: no extern step placeholder under slurmstepd {stepd}; "
                                      "the guest stays outside the job's cgroups", job_id=key, log_file=site.host.log_file)
            return 1
        result = charge(site, key, reference,
                        report=lambda line: log_event("slurm-charge", line, job_id=key, log_file=site.host.log_file))
        log_event("slurm-charge", result.message, job_id=key, log_file=site.host.log_file)
        return 0 if result.outcome is Outcome.OK else 1

    return run_hook("slurm-charge", body, on_error=1, stderr=False)


# -- HealthCheckProgram: the node's health and guest slots ------------------------------------------

DRAIN_PREFIX = "blahvm:"  # the node drain reasons this hook owns (and so may lift)
SLOT_GRES = "blahvm"


def node_updates(node: str, fields: "Mapping[str, str]", problem: "Optional[str]", max_guests: int,
                 live_jobs: "Sequence[str]", slurm_jobs: "Sequence[str]") -> "List[List[str]]":
    """The ``scontrol`` arguments that make the node say what blahvm can do now (pure).

    ``fields`` are the node's State, Reason and Gres; ``live_jobs`` the ledger's live job ids,
    read before ``slurm_jobs``, the ids Slurm has on the node (so a job in the first but not the
    second holds its slot outside Slurm: a guest awaiting reap, a prepare by hand).
    """
    state, reason = fields.get("State", ""), fields.get("Reason", "")
    drained = "DRAIN" in state.upper()
    if problem is not None:
        if drained:
            return []  # ours already, or someone else's: either way nothing more to say
        return [["update", f"NodeName={node}", "State=DRAIN", f"Reason={DRAIN_PREFIX} {' '.join(problem.split())}"[:200]]]
    updates = []
    if drained and reason.startswith(DRAIN_PREFIX):
        updates.append(["update", f"NodeName={node}", "State=RESUME"])
    gres = [item for item in fields.get("Gres", "").split(",") if item and item != "(null)"]
    if [item.split(":")[0] for item in gres] == [SLOT_GRES]:  # other GRES cannot be rewritten safely
        outside = len(set(live_jobs) - set(slurm_jobs))
        wanted = f"{SLOT_GRES}:{max(0, max_guests - outside)}"
        if gres[0] != wanted:
            updates.append(["update", f"NodeName={node}", f"Gres={wanted}"])
    return updates


def parse_node(text: str) -> "Dict[str, str]":
    """State, Reason and Gres from ``scontrol show node -o`` (Reason, free text, comes last)."""
    head, _, reason = text.strip().partition(" Reason=")
    fields = dict(word.partition("=")[::2] for word in head.split() if "=" in word)
    if reason:
        fields["Reason"] = reason.rsplit(" [", 1)[0] if reason.endswith("]") else reason
    return {key: fields[key] for key in ("State", "Reason", "Gres") if key in fields}


def _host_problem(site) -> "Optional[str]":
    """Why this host cannot run guests now (its hypervisor does not answer), or None."""
    from blahvm.hypervisor.connection import open_connection
    from blahvm.hypervisor.errors import HypervisorError

    try:
        open_connection(site.hypervisor.uri, timeout=site.hypervisor.timeout).close()
    except HypervisorError as error:
        return str(error)
    return None


def health_main(config: str, slurm_bin: str = "/usr/bin", environ: "Optional[Mapping[str, str]]" = None,
                slurm_conf: "Optional[str]" = None) -> int:
    """Always 0: Slurm ignores a health check's status; what it does is its scontrol updates."""
    environ = os.environ if environ is None else environ
    node = node_name(environ)

    def body() -> int:
        from blahvm.config import ConfigError, load_config
        from blahvm.ledger import Ledger, LedgerError

        log_file, problem, live, max_guests = None, None, [], 0
        conf_problem = slurm_conf_problem(slurm_conf)
        try:
            site = load_config(config)
            log_file, max_guests = site.host.log_file, site.host.max_guests
            with Ledger(site.host) as ledger:
                live = [entry.job_id for entry in ledger.live()]
            problem = _host_problem(site)
        except ConfigError as error:
            problem = f"config unusable: {' '.join(str(error).split())}"
        except LedgerError as error:
            problem = f"ledger unusable: {error}"
        try:
            fields = parse_node(_slurm_output(slurm_bin, "scontrol", "show", "node", "-o", node))
            running = [] if problem else _slurm_output(slurm_bin, "squeue", "-h", "-w", node, "-o", "%A").split()
        except (OSError, subprocess.TimeoutExpired) as error:
            said = f"cannot read node {node} from Slurm: {conf_problem or error}"
            log_event("slurm-health", said, log_file=log_file)
            _say(f"blahvm slurm-health: {said}")  # loudly: without Slurm this check does nothing
            return 0
        running = [job_key(job_id, {"SLURMD_NODENAME": node}) for job_id in running]  # as the ledger names them
        for update in node_updates(node, fields, problem, max_guests, live, running):
            complaint = _scontrol(slurm_bin, "scontrol", *update)
            log_event("slurm-health", " ".join(update[2:]) + (f" failed: {complaint}" if complaint else ""),
                      log_file=log_file)
        return 0

    return run_hook("slurm-health", body, on_error=0, stderr=False)
