"""What every plugin shares: event lines, hooks that never show a traceback, the execution-host Job,
and hook scripts fixed at install time."""

from __future__ import annotations

import os
import subprocess

from blahvm.batch.execution import execution_job
from blahvm.batch.hook import run_hook
from blahvm.batch.install import hook_script, install_file
from blahvm.batch.log import format_event, log_event
from blahvm.config import parse_config
from blahvm.model import Job, Rejection, Submission

SITE = """
environments: {e: {image: /e.qcow2, flavour: kvm, memory: 1GiB, vcpus: 1}}
queues: {q: {}}
routes:
  - {name: ok, when: {vo: cms}, queue: q, environment: e}
  - {name: elsewhere, reject: "not here"}
"""


def test_event_lines_keep_user_text_on_one_line_and_in_its_field():
    line = format_event("prologue", "prepared\nin 5s", job_id="12.server", user="x vo=atlas", vo="cms")
    assert line == "prologue: job=12.server user='x vo=atlas' vo=cms prepared in 5s"


def test_log_file_gets_one_line_per_event(tmp_path):
    log = tmp_path / "blahvm.log"
    log_event("epilogue", "torn down", job_id="7", log_file=str(log))
    log_event("epilogue", "again", job_id="7", log_file=str(log))
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("epilogue: job=7 torn down")


def test_a_failing_hook_gives_its_defined_code_and_one_line(tmp_path, capfd):
    def broken():
        raise KeyError("boom")

    assert run_hook("prologue", broken, on_error=2, log_file=str(tmp_path / "log")) == 2
    assert capfd.readouterr().err == "blahvm prologue: internal error: KeyError: 'boom'\n"
    assert run_hook("prologue", lambda: 0, on_error=2) == 0


def test_the_execution_host_routes_again_and_knows_the_account():
    config = parse_config(SITE)
    job = execution_job(config, "1", Submission(vo="cms", user="nobody"), workdir="/tmp")
    assert isinstance(job, Job) and job.uid == 65534 and job.decision.rule == "ok" and job.workdir == "/tmp"
    assert execution_job(config, "2", Submission(vo="atlas", user="nobody")) == Rejection("not here", "elsewhere")
    unknown = execution_job(config, "3", Submission(vo="cms", user="no-such-user-here"))
    assert unknown.reason == "job 3: user 'no-such-user-here' does not exist on this host"


def test_an_installed_hook_ignores_the_callers_python_environment(tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "blahvm").mkdir()
    (trap / "blahvm" / "__init__.py").write_text("raise SystemExit('imported the wrong blahvm')\n")
    hook = tmp_path / "hook"
    install_file(str(hook), hook_script("test", "blahvm.locations", "cache_dir", "/etc/site.yaml")
                 .replace("cache_dir(config='/etc/site.yaml')", "print(cache_dir({}))").replace(
                     "sys.exit(print", "(print"), 0o755)
    assert oct(os.stat(hook).st_mode & 0o777) == "0o755"
    env = dict(os.environ, PYTHONPATH=str(trap))
    result = subprocess.run([str(hook)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/var/cache/blahvm"


def test_a_job_moved_by_routing_is_accepted_in_the_queue_it_was_moved_to():
    config = parse_config("""
environments: {e: {image: /e.qcow2, flavour: kvm, memory: 1GiB, vcpus: 1}}
queues: {grid: {}, short: {max_walltime: 10h}, long: {}}
routes:
  - {name: cms-short, when: {queue: grid, vo: cms, walltime: "< 10h"}, queue: short, environment: e}
  - {name: cms-long, when: {queue: grid, vo: cms}, queue: long, environment: e}
  - {name: elsewhere, reject: "not here"}
""")
    moved = execution_job(config, "1", Submission(queue="short", vo="cms", user="nobody", walltime=3600))
    assert isinstance(moved, Job) and moved.decision.queue == "short" and moved.decision.rule == "cms-short"
    # a 20h job sitting in the short queue is not one the rules would put there
    wrong = execution_job(config, "2", Submission(queue="short", vo="cms", user="nobody", walltime=72000))
    assert wrong == Rejection("no route puts this job in queue short: not here")
    sent_elsewhere = execution_job(config, "3", Submission(queue="grid", vo="cms", user="nobody", walltime=3600))
    assert sent_elsewhere.reason == "no route puts this job in queue grid: not here"
    # a hint of the queue the user submitted to is tried first, and can only give what the rules give
    hinted = execution_job(config, "4", Submission(queue="long", vo="cms", user="nobody", walltime=3600),
                           submitted_to="grid")
    assert hinted.reason == "no route puts this job in queue long: not here"
