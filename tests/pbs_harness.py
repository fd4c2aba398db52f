"""Run blahvm's PBS scripts and hook the way a PBS mom and server do (as observed on a real OpenPBS).

- ``run_script``: a prologue or epilogue as the mom runs it: root, cwd ``mom_priv`` (the epilogue: the
  user's home), umask 077, stdin ``/dev/null``, an almost empty environment, stdout and stderr into
  the job's .o and .e files, killed with its process group at ``$prologalarm`` (30 s; the mom's
  ``-4``, which requeues).
- ``run_starter``: a job's program as the mom execs it, as the job's user, with the job's environment.
- ``run_hook``: the OpenPBS hook under the system Python with the stand-in ``pbs`` module, no
  ``__file__``, ``__name__ == 'builtins'``, ``sys.argv == ['']``; one event in, what it did out.
- ``mom_exec_argv``: what the mom execs after ``execjob_launch`` (script jobs get argv rebuilt).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import tempfile

import attrs

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pbs_standin")
SYSTEM_PYTHON = "/usr/bin/python3"
PROLOGALARM = 30.0
MOM_TIMEOUT = -4  # what the mom records for a script it had to kill: requeue


@attrs.frozen
class Ran:
    code: int
    stdout: bytes  # what lands in the job's .o file
    stderr: bytes  # the job's .e file


def mom_environment(extra=None):
    env = {"PATH": "/bin:/usr/bin", "LC_CTYPE": "C.UTF-8"}
    env.update(extra or {})
    return env


def run_script(path, argv, cwd, env=None, alarm=PROLOGALARM, stdin_file=None, user=None) -> Ran:
    """``path argv...`` as the mom runs a prologue/epilogue (or, with ``user``, a job's program)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = open(stdin_file, "rb") if stdin_file else open(os.devnull, "rb")
        with stdin:
            options = {}
            if user is not None:
                options.update(user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=[])
            process = subprocess.Popen([path, *argv], stdin=stdin, stdout=out, stderr=err, cwd=cwd,
                                       env=mom_environment(env), start_new_session=True,
                                       umask=0o077 if user is None else 0o022, **options)
            try:
                code = process.wait(timeout=alarm)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = MOM_TIMEOUT
        out.seek(0)
        err.seek(0)
        return Ran(code, out.read(), err.read())


def mom_exec_argv(progname, argv, script_job):
    """After execjob_launch: a script job's argv is rebuilt as ``['-' + basename(progname)] + argv[1:]``;
    a ``qsub --`` job's argv is exec'd as is."""
    if script_job:
        return progname, ["-" + os.path.basename(progname)] + list(argv or [])[1:]
    return progname, list(argv)


def run_job_program(progname, argv, env, cwd, user, stdin_file=None, timeout=300) -> Ran:
    """Exec ``progname`` with exactly ``argv`` (argv[0] included) as the job's user, stdout/stderr captured."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = open(stdin_file, "rb") if stdin_file else open(os.devnull, "rb")
        with stdin:
            process = subprocess.Popen(list(argv), executable=progname, stdin=stdin, stdout=out, stderr=err,
                                       cwd=cwd, env=dict(env), user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=[],
                                       start_new_session=True)
            code = process.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        return Ran(code, out.read(), err.read())


RUNNER = r"""
import builtins, sys
standin, given, taken, hook = sys.argv[1:5]
sys.path.insert(0, standin)
import pbs
pbs._load(given)
sys.argv = ['']
with open(hook) as stream:
    source = stream.read()
try:
    exec(compile(source, 'blahvm', 'exec'), {'__name__': 'builtins', '__builtins__': builtins})
except SystemExit:
    pass
except BaseException as error:
    pbs._unhandled(error)
pbs._dump(taken)
"""


def run_hook(hook_file, event, timeout=60.0):
    """One event through the hook; the stand-in's record of what it did, plus ``stdout``/``stderr``."""
    with tempfile.TemporaryDirectory() as where:
        given, taken = os.path.join(where, "in.json"), os.path.join(where, "out.json")
        with open(given, "w") as stream:
            json.dump(event, stream)
        done = subprocess.run([SYSTEM_PYTHON, "-I", "-c", RUNNER, STANDIN, given, taken, hook_file],
                              capture_output=True, timeout=timeout, env={"PATH": "/bin:/usr/bin"}, cwd="/")
        if not os.path.exists(taken):
            raise AssertionError(f"the hook runner died: {done.stderr.decode()}")
        with open(taken) as stream:
            result = json.load(stream)
        result["stdout"], result["stderr"] = done.stdout.decode(), done.stderr.decode()
        return result
