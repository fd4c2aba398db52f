"""Run blahvm's installed LSF hooks the way LSF runs them (as observed on a real volclava 2.2): each
in its own process, with LSF's argv,
environment, files, user, working directory and stdio.

- esub: as the submitting user (``nobody``), cwd = the submit directory, argv = its path only,
  stdin /dev/null, the user's environment plus ``LSB_SUB_ABORT_VALUE=97``, ``LSB_SUB_PARM_FILE``
  (``.lsbsubparm.<pid>``, mode 0666) and the not yet existing modify and env files.
- PRE_EXEC / POST_EXEC: ``/bin/sh -c STRING`` as root (``LSB_PRE_POST_EXEC_USER=root`` in
  lsf.sudoers), cwd /tmp, stdio /dev/null, ``PATH=/bin:/usr/bin:/sbin:/usr/sbin``, no HOME, plus
  the job's environment; POST_EXEC also ``LS_EXEC_T=END`` and ``LSB_JOBEXIT_STAT``.
- JOB_STARTER: pasted in front of the user's command line and run by ``/bin/sh -c`` as the user,
  in the job's cwd, stdin /dev/null, output to the job's output files.
- elim: as root, cwd /tmp, ``LSF_RESOURCES`` and ``ELIM_ABORT_VALUE`` set, read line by line.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Tuple

import attrs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, which nobody cannot reach
LSF_PATH = "/bin:/usr/bin:/sbin:/usr/sbin"
ABORT = 97


GUEST_SITE = """\
hypervisor: {{uri: "qemu:///system", pool: {pool}, pool_path: {d}/clones, domain_type: qemu}}
host: {{max_guests: 2, memory: 2GiB, vcpus: 2, state_dir: {d}/state, run_dir: {d}/run, log_file: {d}/blahvm.log}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{account: "^(?P<vo>cms|atlas)$"}}
environments:
{environments}
queues:
  grid: {{}}
  short: {{max_walltime: 10h}}
routes:
  - {{name: cms-short, when: {{queue: grid, vo: cms, walltime: "<= 10h"}}, queue: short, environment: slc4}}
  - {{name: nobody-else, reject: "no execution environment is offered to this VO"}}
"""


def write_site(directory: str, text: str) -> Tuple[str, str]:
    """The site config ``text`` as ``directory``/site.yaml and an empty LSF_SERVERDIR beside it, both
    readable by the job user: (config path, serverdir)."""
    config = os.path.join(directory, "site.yaml")
    with open(config, "w") as stream:
        stream.write(text)
    os.chmod(config, 0o644)
    serverdir = os.path.join(directory, "serverdir")
    os.mkdir(serverdir, 0o755)
    return config, serverdir


def write_guest_site(directory: str, pool: str, demo) -> Tuple[str, str]:
    """``write_site`` with GUEST_SITE: cms jobs of queue grid go to the demo image (environment slc4,
    queue short)."""
    environment = "".join(f"  {line}\n" for line in demo.environment_yaml("slc4").splitlines())
    return write_site(directory, GUEST_SITE.format(d=directory, pool=pool, environments=environment.rstrip("\n")))


STANDIN_BJOBS = """\
#!/bin/sh
# stand-in for volclava's `bjobs -json -o "jobid proj_name" ID` and `bjobs -l ID`: projects from {projects}
# ("ID PROJECT" lines); the combined resource requirement from {resreqs} ("ID REQUIREMENT" lines), else the
# one a job the esub routed has
if [ "$1" = -l ]; then
    project=$(awk -v j="$2" '$1 == j {{print $2}}' {projects} 2>/dev/null)
    [ -n "$project" ] || {{ echo "Job <$2> is not found" >&2; exit 255; }}
    combined=$(awk -v j="$2" '$1 == j {{sub(/^[^ ]* /, ""); print}}' {resreqs} 2>/dev/null | tail -n 1)
    [ -n "$combined" ] || combined='select[((blahvm_env_slc4>0) && (blahvm_slots>0)) && (type == local)] order[r15s:pg] rusage[blahvm_slots=1.00]'
    printf '\\nJob <%s>, User <x>, Project <%s>, Status <RUN>, Queue <short>, Command <x>\\n' "$2" "$project"
    printf '\\n RESOURCE REQUIREMENT DETAILS:\\n Combined: %s\\n Effective: -\\n' "$combined"
    exit 0
fi
[ "$1 $2 $3" = "-json -o jobid proj_name" ] || {{ echo "stand-in bjobs: unexpected arguments $*" >&2; exit 2; }}
project=$(awk -v j="$4" '$1 == j {{print $2}}' {projects} 2>/dev/null)
if [ -z "$project" ]; then
    printf '{{"COMMAND": "bjobs", "JOBS": 1, "RECORDS": [{{"JOBID": "%s", "ERROR": "Job <%s> is not found"}}]}}\\n' "$4" "$4"
    exit 255
fi
printf '{{"COMMAND": "bjobs", "JOBS": 1, "RECORDS": [{{"JOBID": "%s", "PROJ_NAME": "%s"}}]}}\\n' "$4" "$project"
"""


def standin_bjobs(serverdir: str) -> str:
    """A stand-in bjobs beside ``serverdir`` answering from its ``projects`` file (``set_project``)."""
    directory = os.path.dirname(os.path.abspath(serverdir))
    path = os.path.join(directory, "bjobs")
    if not os.path.exists(path):
        with open(path, "w") as stream:
            stream.write(STANDIN_BJOBS.format(projects=shlex.quote(os.path.join(directory, "projects")),
                                              resreqs=shlex.quote(os.path.join(directory, "resreqs"))))
        os.chmod(path, 0o755)
    return path


def set_project(serverdir: str, job_id: str, project: str) -> None:
    """What the stand-in bjobs says job ``job_id``'s project (``bsub -P``) is."""
    with open(os.path.join(os.path.dirname(os.path.abspath(serverdir)), "projects"), "a") as stream:
        stream.write(f"{job_id} {project}\n")


def set_resreq(serverdir: str, job_id: str, combined: str) -> None:
    """What the stand-in ``bjobs -l`` gives as job ``job_id``'s combined resource requirement."""
    with open(os.path.join(os.path.dirname(os.path.abspath(serverdir)), "resreqs"), "a") as stream:
        stream.write(f"{job_id} {combined}\n")


def install(serverdir: str, config: str, cache_dir: str, *options: str) -> subprocess.CompletedProcess:
    if "--bjobs" not in options:
        options = ("--bjobs", standin_bjobs(serverdir), *options)
    return subprocess.run(
        [sys.executable, "-m", "blahvm.cli.main", "install", "lsf", "--serverdir", serverdir, "--config", config,
         "--cache-dir", cache_dir, "--python", SYSTEM_PYTHON, *options],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


def user_env(user: str) -> Dict[str, str]:
    entry = pwd.getpwnam(user)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": entry.pw_dir, "USER": user, "LOGNAME": user,
            "SHELL": entry.pw_shell, "LANG": "C.UTF-8"}


def _as(user: str) -> dict:
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@attrs.frozen
class EsubRun:
    code: int
    stdout: bytes
    stderr: str
    modify: Optional[str]  # the modify file's text, None if the esub wrote none
    envfile: Optional[str]


def run_esub(serverdir: str, params: str, user: str = "nobody", env: Optional[Dict[str, str]] = None,
             esub: str = "esub.blahvm", timeout: float = 60) -> EsubRun:
    entry = pwd.getpwnam(user)
    directory = tempfile.mkdtemp(prefix="blahvm-lsf-sub-", dir="/var/tmp")
    try:
        os.chown(directory, entry.pw_uid, entry.pw_gid)  # the submit directory, the user's own
        pid = os.getpid()
        parm = os.path.join(directory, f".lsbsubparm.{pid}")
        with open(parm, "w", encoding="utf-8", errors="surrogateescape") as stream:
            stream.write(params)
        os.chmod(parm, 0o666)
        modify = os.path.join(directory, f".lsbsubdeltaparm.{pid}.{entry.pw_uid}")
        envfile = os.path.join(directory, f".lsbsubdeltaenv.{pid}.{entry.pw_uid}")
        environ = user_env(user)
        environ.update(env or {})
        environ.update(LSB_SUB_ABORT_VALUE=str(ABORT), LSB_SUB_PARM_FILE=parm, LSB_SUB_MODIFY_FILE=modify,
                       LSB_SUB_MODIFY_ENVFILE=envfile, LSB_UNIXGROUP=str(entry.pw_gid))
        path = os.path.join(serverdir, esub)
        result = subprocess.run([path], env=environ, cwd=directory, stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=timeout, **_as(user))

        def text(p):
            try:
                with open(p) as stream:
                    return stream.read()
            except FileNotFoundError:
                return None

        return EsubRun(result.returncode, result.stdout, result.stderr.decode("utf-8", "replace"),
                       text(modify), text(envfile))
    finally:
        subprocess.run(["rm", "-rf", directory])


def env_lines(text: Optional[str]) -> Dict[str, str]:
    """What LSF puts in the job's environment from the esub's env file."""
    out = {}
    for line in (text or "").splitlines():
        name, _, value = line.partition("=")
        out[name] = value
    return out


def job_env(job_id: str, queue: str, user: str, hints: Dict[str, str], **extra: str) -> Dict[str, str]:
    """The environment LSF gives a job's pre/post-exec and starter: the user's, the esub's hints,
    then what sbatchd sets itself."""
    environ = user_env(user)
    environ.update(hints)
    environ.update(LSB_JOBID=job_id, LSB_QUEUE=queue, LSFUSER=user, LSB_HOSTS="localhost",
                   LSB_MCPU_HOSTS="localhost 1", LSB_JOBNAME="lj1", LSB_EXIT_PRE_ABORT="99",
                   LSB_JOBINDEX="0")
    environ.update(extra)
    return environ


def _pre_post(serverdir: str, hook: str, environ: Dict[str, str], timeout: float) -> int:
    environ = dict(environ)
    environ.pop("HOME", None)
    environ["PATH"] = LSF_PATH
    command = shlex.quote(os.path.join(serverdir, hook))
    # in a process group of its own, as sbatchd's child for the job (setPGid) runs it
    return subprocess.run(["/bin/sh", "-c", command], env=environ, cwd="/tmp", stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                          process_group=0).returncode


def run_pre_exec(serverdir: str, environ: Dict[str, str], timeout: float = 300) -> int:
    return _pre_post(serverdir, "blahvm-pre-exec", environ, timeout)


def run_post_exec(serverdir: str, environ: Dict[str, str], exit_status: int, timeout: float = 300) -> int:
    return _pre_post(serverdir, "blahvm-post-exec",
                     dict(environ, LS_EXEC_T="END", LSB_JOBEXIT_STAT=str(exit_status << 8)), timeout)


def run_job_starter(serverdir: str, environ: Dict[str, str], command_line: str, user: str, cwd: str,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """JOB_STARTER pasted textually in front of the user's command line, run by /bin/sh -c as the user."""
    starter = os.path.join(serverdir, "blahvm-job-starter")
    return subprocess.run(["/bin/sh", "-c", f"{shlex.quote(starter)} {command_line}"],
                          env=dict(environ, LS_EXEC_T="START"), cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, **_as(user))


def start_job(serverdir: str, environ: Dict[str, str], command_line: str, user: str, cwd: str) -> subprocess.Popen:
    """sbatchd's child for a job (``execJob``): it leads a process group of its own (``setPGid``), runs
    the queue's PRE_EXEC in it (root, ``/tmp``, stdio on /dev/null, no HOME), and when that exits 0
    becomes the job: the starter pasted before the command line under ``/bin/sh -c`` as the user.
    Its stdout and stderr are pipes; a refused PRE_EXEC makes it exit with PRE_EXEC's status."""
    account = pwd.getpwnam(user)
    pre = dict(environ, PATH=LSF_PATH)
    pre.pop("HOME", None)
    starter = os.path.join(serverdir, "blahvm-job-starter")
    job_line = f"{shlex.quote(starter)} {command_line}"

    def env_i(values: Dict[str, str]) -> str:
        return "env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in values.items())

    script = (f"(cd /tmp && {env_i(pre)} /bin/sh -c {shlex.quote(shlex.quote(os.path.join(serverdir, 'blahvm-pre-exec')))}"
              " </dev/null >/dev/null 2>&1) || exit $?\n"
              f"cd {shlex.quote(cwd)} && exec setpriv --reuid={account.pw_uid} --regid={account.pw_gid} --clear-groups "
              f"{env_i(dict(environ, LS_EXEC_T='START'))} /bin/sh -c {shlex.quote(job_line)}\n")
    return subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, process_group=0, env={"PATH": LSF_PATH})


def start_elim(serverdir: str, name: str, resources: str, abort: int = 5) -> subprocess.Popen:
    return subprocess.Popen([os.path.join(serverdir, name)], cwd="/tmp", stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": LSF_PATH, "LSF_RESOURCES": resources, "ELIM_ABORT_VALUE": str(abort),
                                 "LSF_MASTER": "Y"})
