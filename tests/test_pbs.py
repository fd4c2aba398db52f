"""The PBS plugin through the harnesses: scripts as the mom runs them, the hook under the stand-in pbs
module, the installer; argument and attribute parsing with Hypothesis. No guest boots here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from blahvm.batch.execution import execution_job
from hypothesis import given
from hypothesis import strategies as st

from blahvm.batch import pbs
from blahvm.model import Job, Rejection, Submission
from blahvm.quantities import Duration, Size
from tests import pbs_harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = """\
hypervisor: {{uri: "test:///default", pool: blahvm-pbs-test, pool_path: /var/lib/blahvm/pbs-test-clones, timeout: 10}}
host: {{max_guests: 2, state_dir: {state}, run_dir: {run}}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{account: "^(?P<vo>[a-z]+)-prod$"}}
  - {{user: "^(?P<vo>nobody)$"}}
environments:
  demo: {{image: {image}, sha256: {sha}, flavour: kvm, memory: 256MiB, vcpus: 2}}
queues:
  grid: {{}}
  short: {{max_walltime: 10h}}
routes:
  - {{name: nobody-short, when: {{queue: grid, vo: nobody, walltime: "<= 10h"}}, queue: short, environment: demo}}
  - {{name: others, reject: "no execution environment is offered to this VO"}}
"""


@pytest.fixture
def site(tmp_path):
    image = tmp_path / "golden.raw"
    image.write_bytes(b"\0" * 1024 * 1024)
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(state=tmp_path / "state", run=tmp_path / "run", image=image,
                                sha=hashlib.sha256(image.read_bytes()).hexdigest()))
    return str(path)


@pytest.fixture
def installed(tmp_path, site):
    home = tmp_path / "pbs_home"
    (home / "mom_priv").mkdir(parents=True)
    qstat = tmp_path / "qstat"
    qstat.write_text("#!/bin/sh\nexec cat " + str(tmp_path / "qstat.json") + "\n")
    qstat.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "pbs", "--home", str(home),
                           "--config", site, "--qstat", str(qstat), "--budget", "6",
                           "--python", pbs_harness.SYSTEM_PYTHON],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return home, done.stdout


# -- arguments and attributes ---------------------------------------------------------------------

words = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n,="), min_size=1,
                max_size=12)


@given(st.lists(words, min_size=0, max_size=14))
def test_prologue_argv_is_accepted_in_exactly_the_two_conventions(argv):
    try:
        job = pbs.parse_prologue_argv(argv)
    except pbs.BadArguments as error:
        control = any(ord(c) < 32 or ord(c) == 127 for c in "".join(argv[:2]))
        assert len(argv) in (0, 1, 2, 5, 6) or not argv[0].strip() or not argv[1] or control
        assert "\n" not in str(error)
        return
    assert len(argv) in (3, 4) or len(argv) >= 7
    assert (job.job_id, job.user) == (argv[0], argv[1])
    assert job.complete == (len(argv) >= 7)
    if len(argv) >= 7:
        assert job.queue == pbs._field(argv[5]) and job.account == pbs._field(argv[6])


@given(st.lists(words, min_size=10, max_size=12), st.integers(-300, 300))
def test_epilogue_reads_the_tenth_argument_as_the_exit_status(argv, status):
    argv[9] = str(status)
    if any(ord(c) < 32 or ord(c) == 127 for c in "".join(argv[:2])):  # a job id or user no mom passes
        with pytest.raises(pbs.BadArguments, match="control characters"):
            pbs.parse_epilogue_argv(argv)
        return
    job, code = pbs.parse_epilogue_argv(argv)
    assert code == status and job.job_id == argv[0] and job.queue == pbs._field(argv[7])


def test_too_few_epilogue_arguments_are_refused():
    with pytest.raises(pbs.BadArguments, match="10 or more"):
        pbs.parse_epilogue_argv(["1.vm", "u", "g"])


names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
values = st.from_regex(r"[0-9a-z:.]{0,10}", fullmatch=True)


@given(st.dictionaries(names, values, max_size=6))
def test_resource_lists_parse_back_to_what_was_printed(resources):
    text = ",".join(f"{k}={v}" for k, v in resources.items())
    assert dict(pbs.parse_resource_list(text)) == resources


@given(st.integers(0, 10 ** 6), st.sampled_from(["", "b", "kb", "mb", "gb", "w", "kw"]))
def test_pbs_sizes_are_powers_of_1024_and_words_are_8_bytes(number, unit):
    scale = {"": 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "w": 8, "kw": 8192}[unit]
    assert pbs.parse_pbs_size(f"{number}{unit}") == number * scale
    assert pbs.parse_pbs_size(f"{number}{unit.upper()}") == number * scale


@given(st.integers(0, 999), st.integers(0, 59), st.integers(0, 59))
def test_walltimes_in_every_pbs_spelling(hours, minutes, seconds):
    total = hours * 3600 + minutes * 60 + seconds
    assert pbs.parse_pbs_duration(f"{hours:02d}:{minutes:02d}:{seconds:02d}") == total
    assert pbs.parse_pbs_duration(f"{minutes}:{seconds}") == minutes * 60 + seconds
    assert pbs.parse_pbs_duration(str(total)) == total


@pytest.mark.parametrize("bad", ["", "1h", "-5", "1:2:3:4", "12xb"])
def test_bad_quantities_are_one_line_errors(bad):
    with pytest.raises(ValueError):
        pbs.parse_pbs_duration(bad) if ":" in bad or bad in ("", "1h", "-5") else pbs.parse_pbs_size(bad)


def test_observed_resources_become_the_submission():
    job = pbs.PbsJob("1.vm", "nobody", "nogroup", queue="workq", account="cms-prod",
                     resources=pbs.parse_resource_list("ncpus=1,place=free,walltime=00:05:00"))
    assert pbs.submission_of(job) == Submission(queue="workq", user="nobody", group="nogroup",
                                                account="cms-prod", walltime=Duration(300), cores=1)
    select = pbs.PbsJob("2.vm", "u", resources=pbs.parse_resource_list(
        "walltime=01:00:00,select=2:ncpus=2:mem=1gb,blahvm_env=demo"))
    assert pbs.submission_of(select).cores == 4 and pbs.submission_of(select).memory == Size(2 * 1024 ** 3)
    assert pbs.submission_of(select).environment == "demo"
    torque = pbs.PbsJob("3.t", "u", resources=pbs.parse_resource_list("neednodes=1:ppn=3,nodes=1:ppn=3"))
    assert pbs.submission_of(torque).cores == 3


def test_a_job_moved_to_its_queue_at_submission_routes_the_same_on_the_execution_host(site):
    from blahvm.config import load_config

    config = load_config(site)
    moved = execution_job(config, "1.vm", Submission(queue="short", user="nobody",
                                                                  walltime=Duration(600)))
    assert isinstance(moved, Job) and moved.decision.rule == "nobody-short" and moved.decision.queue == "short"
    too_long = execution_job(config, "2.vm", Submission(queue="short", user="nobody",
                                                                     walltime=Duration(20 * 3600)))
    assert isinstance(too_long, Rejection)


def test_qstat_json_fills_queue_account_and_resources():
    text = json.dumps({"pbs_version": "23.06.06", "Jobs": {"7.vm": {
        "Job_Name": "STDIN", "queue": "short", "Account_Name": "cms-prod",
        "Resource_List": {"ncpus": 1, "walltime": "00:05:00", "select": "1:ncpus=1"}}}})
    job = pbs.facts_from_qstat_json(text, pbs.PbsJob("7.vm", "nobody", "nogroup", complete=False))
    assert (job.queue, job.account, job.name, job.resource("walltime"), job.complete) == \
        ("short", "cms-prod", "STDIN", "00:05:00", True)
    with pytest.raises(pbs.FactsUnavailable):
        pbs.facts_from_qstat_json("qstat: Unknown Job Id", job)


def test_qstat_json_with_the_bare_backslashes_openpbs_writes_still_reads():
    """OpenPBS 23.06's qstat -F json passes a job's backslash through unescaped (observed: a `sed` with
    \\( in Submit_arguments made the whole document invalid)."""
    text = ('{"Jobs":{"8.vm":{"queue":"short","Job_Name":"a\\qb",'
            '"Submit_arguments":"-- /bin/sed -n \'s/^M: *\\([0-9]*\\) kB/\\1/p\' \\u00e9 \\uzz \\"q\\""}}}')
    with pytest.raises(ValueError):
        json.loads(text)
    assert json.loads(pbs.qstat_json_text(text))["Jobs"]["8.vm"]["Submit_arguments"] == \
        "-- /bin/sed -n 's/^M: *\\([0-9]*\\) kB/\\1/p' \u00e9 \\uzz \"q\""
    job = pbs.facts_from_qstat_json(text, pbs.PbsJob("8.vm", "nobody", "nogroup", complete=False))
    assert (job.queue, job.name) == ("short", "a\\qb")
    valid = json.dumps({"Jobs": {"9.vm": {"Job_Name": "x\\(y"}}})
    assert pbs.qstat_json_text(valid) == valid


# -- the job starter's argv -------------------------------------------------------------------------


def test_launch_rewrite_gives_the_starter_the_shell_for_script_jobs_and_argv_for_qsub_dashdash():
    wrapper = "/var/spool/pbs/mom_priv/blahvm_job_starter"
    progname, argv = pbs.launch_rewrite("/bin/bash", [], wrapper)
    exe, exec_argv = pbs_harness.mom_exec_argv(progname, argv, script_job=True)
    assert exe == wrapper and exec_argv == ["-blahvm_job_starter", "/bin/bash"]
    assert pbs.payload_of(exec_argv[1:]) == (["/bin/bash", "-l"], True)
    progname, argv = pbs.launch_rewrite("/bin/echo", ["/bin/echo", "a", "b c"], wrapper)
    exe, exec_argv = pbs_harness.mom_exec_argv(progname, argv, script_job=False)
    assert exec_argv == [wrapper, "/bin/echo", "a", "b c"]
    assert pbs.payload_of(exec_argv[1:]) == (["/bin/echo", "a", "b c"], False)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=6))
def test_qsub_dashdash_argv_reaches_the_guest_unchanged(argv):
    progname, rewritten = pbs.launch_rewrite(argv[0], argv, "/w")
    assert pbs.payload_of(rewritten[1:]) == (list(argv), False)


# -- the installer ------------------------------------------------------------------------------------


def test_install_writes_root_owned_scripts_and_prints_the_qmgr_commands(installed, site):
    home, said = installed
    for name, mode in (("prologue", 0o700), ("epilogue", 0o700), ("blahvm_job_starter", 0o755)):
        status = os.stat(home / "mom_priv" / name)
        assert status.st_uid == 0 and stat.S_IMODE(status.st_mode) == mode
        assert not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        assert repr(os.path.abspath(site)) in (home / "mom_priv" / name).read_text()
    settings_file = json.loads((home / "blahvm" / "blahvm_hook.json").read_text())
    assert settings_file["config"] == os.path.abspath(site)
    assert settings_file["job_starter"] == str(home / "mom_priv" / "blahvm_job_starter")
    assert (home / "blahvm" / "blahvm_hook.py").read_text() == open(f"{REPO}/plugins/pbs/blahvm_hook.py").read()
    assert 'qmgr -c "set hook blahvm event = \'queuejob,execjob_begin,execjob_launch,execjob_epilogue,execjob_end,' \
        in said
    assert f"sed -i '/^resources: /{{/blahvm_slots/!s/\"$/, blahvm_slots\"/}}' {home}/sched_priv/sched_config" in said
    assert f'kill -HUP "$(head -n 1 {home}/sched_priv/sched.lock)"' in said
    assert "application/x-config default" in said and "$job_starter " in said and "blahvm_slots" in said


def test_install_without_mom_priv_says_so(tmp_path, site):
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "pbs", "--home", str(tmp_path),
                           "--config", site], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "mom_priv" in done.stderr


# -- the classic scripts as the mom runs them ---------------------------------------------------------


def test_prologue_with_arguments_pbs_never_passes_aborts_with_one_line(installed):
    home, _ = installed
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), ["1.vm", "nobody", "nogroup", "x", "y"],
                                 cwd=str(home / "mom_priv"))
    assert ran.code == pbs.EXIT_ABORT and ran.stdout == b""
    assert ran.stderr == b"blahvm: prologue: a prologue gets 3 arguments (OpenPBS) or 7 or more (Torque), not 5\n"


def test_torque_prologue_of_a_job_the_rules_refuse_aborts_it(installed):
    home, _ = installed
    argv = ["5.torque", "nobody", "nogroup", "job", "walltime=20:00:00", "short", ""]
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), argv, cwd=str(home / "mom_priv"))
    assert ran.code == pbs.EXIT_ABORT and ran.stdout == b""
    assert ran.stderr == b"blahvm: prologue: job 5.torque: rejected on this host: no route puts this job in queue " \
        b"short: no execution environment is offered to this VO\n"


@pytest.mark.parametrize("resources", ["walltime=01:00:00,ncpus=" + "9" * 5000,
                                       "walltime=01:00:00,select=" + "9" * 5000 + ":ncpus=1",
                                       "walltime=01:00:00,select=1:ncpus=" + "9" * 5000,
                                       "walltime=01:00:00,mem=" + "9" * 5000 + "gb"])
def test_a_jobs_absurd_request_aborts_it_and_never_requeues(installed, resources):
    """A 5,000-digit ncpus or select is the job's own bad request (FAIL_JOB, exit 1), not a reason to requeue
    it forever (exit 2)."""
    home, _ = installed
    argv = ["8.torque", "nobody", "nogroup", "job", resources, "short", ""]
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), argv, cwd=str(home / "mom_priv"))
    assert ran.code == pbs.EXIT_ABORT and ran.stdout == b"", ran
    assert ran.stderr.startswith(b"blahvm: prologue: job 8.torque: ") and ran.stderr.count(b"\n") == 1, ran
    assert len(ran.stderr) < 300


@pytest.mark.parametrize("job_id", ["9.vm\r", "9\x1b[2J.vm", "9.vm\x7f"])
def test_prologue_refuses_job_ids_with_control_characters(installed, job_id):
    home, _ = installed
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), [job_id, "nobody", "nogroup"],
                                 cwd=str(home / "mom_priv"))
    assert ran.code == pbs.EXIT_ABORT and ran.stdout == b""
    assert ran.stderr.count(b"\n") == 1 and b"\x1b" not in ran.stderr and b"\r" not in ran.stderr
    assert b"has control characters" in ran.stderr


def test_openpbs_prologue_requeues_when_qstat_cannot_say(installed, tmp_path):
    home, _ = installed
    (tmp_path / "qstat.json").write_text("not json")
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), ["6.vm", "nobody", "nogroup"],
                                 cwd=str(home / "mom_priv"), env={"PBS_JOBDIR": "/nonexistent"})
    assert ran.code == pbs.EXIT_REQUEUE and ran.stdout == b""
    assert b"qstat -f -F json gave nothing usable for job 6.vm" in ran.stderr


def test_openpbs_prologue_whose_guest_never_answers_requeues_within_its_budget(installed, tmp_path):
    home, _ = installed  # test:///default starts the guest at once, but no agent ever answers
    (tmp_path / "qstat.json").write_text(json.dumps({"Jobs": {"8.vm": {
        "queue": "short", "Resource_List": {"walltime": "00:10:00", "ncpus": 1}}}}))
    started = time.monotonic()
    ran = pbs_harness.run_script(str(home / "mom_priv" / "prologue"), ["8.vm", "nobody", "nogroup"],
                                 cwd=str(home / "mom_priv"))
    assert ran.code == pbs.EXIT_REQUEUE, ran.stderr
    assert time.monotonic() - started < pbs_harness.PROLOGALARM
    assert ran.stdout == b"" and len(ran.stderr.splitlines()) == 1


def test_epilogue_with_nothing_to_tear_down_is_fine_and_quiet(installed):
    home, _ = installed
    argv = ["9.vm", "nobody", "nogroup", "STDIN", "123", "ncpus=1,walltime=00:05:00",
            "cput=00:00:00,walltime=00:00:02", "short", "", "0"]
    ran = pbs_harness.run_script(str(home / "mom_priv" / "epilogue"), argv, cwd="/")
    assert ran == pbs_harness.Ran(0, b"", b"")


def test_job_starter_refuses_to_run_without_a_job(installed):
    home, _ = installed
    with tempfile.TemporaryDirectory(dir="/var/tmp") as where:  # where the job's user can reach it
        os.chmod(where, 0o755)
        starter = os.path.join(where, "blahvm_job_starter")
        shutil.copy2(home / "mom_priv" / "blahvm_job_starter", starter)
        ran = pbs_harness.run_script(starter, ["/bin/sh"], cwd="/", user="nobody")
    assert ran.code == 255 and ran.stdout == b""
    assert ran.stderr == b"blahvm: job starter: PBS_JOBID is not set: not started by a PBS mom\n"


# -- the OpenPBS hook under the stand-in pbs module ------------------------------------------------------


def hook_event(home, kind, **fields):
    event = {"type": kind, "hook_config": str(home / "blahvm" / "blahvm_hook.json"),
             "queues": ["workq", "grid", "short"], "default_queue": "workq"}
    event.update(fields)
    return pbs_harness.run_hook(str(home / "blahvm" / "blahvm_hook.py"), event)


def test_queuejob_routes_to_the_queue_and_sets_the_environment(installed):
    home, _ = installed
    done = hook_event(home, "queuejob", requestor="nobody", job={
        "id": "", "queue": "grid", "Account_Name": None,
        "Resource_List": {"walltime": "00:05:00", "select": "1:ncpus=1"}})
    assert done["verdict"] == "accept", done
    assert done["job"]["queue"] == "short"
    assert done["job"]["Resource_List"]["blahvm_env"] == "demo"
    assert done["job"]["Resource_List"]["select"] == "1:ncpus=1:blahvm_slots=1"  # one guest slot per job
    assert done["stdout"] == ""


@pytest.mark.parametrize("select, expected", [
    ("1:ncpus=1", "1:ncpus=1:blahvm_slots=1"),
    ("ncpus=2:mem=1gb", "1:ncpus=2:mem=1gb:blahvm_slots=1"),
    ("1:ncpus=1:blahvm_slots=0", "1:ncpus=1:blahvm_slots=1"),  # the user's own value is replaced
    ("3:ncpus=1+1:mem=2gb:blahvm_slots=5", "1:ncpus=1:blahvm_slots=1+2:ncpus=1+1:mem=2gb"),
])
def test_queuejob_reserves_exactly_one_slot_on_the_first_chunk(select, expected):
    assert pbs.select_with_slot(select) == expected


def test_queuejob_rejects_with_the_rules_reason(installed):
    home, _ = installed
    done = hook_event(home, "queuejob", requestor="nobody", job={
        "id": "", "queue": "", "Resource_List": {"walltime": "00:05:00"}})
    assert done["verdict"] == "reject"
    assert done["message"] == "no execution environment is offered to this VO"  # workq: no route


def test_a_job_the_rules_refuse_at_execjob_begin_ends_with_the_reason_on_its_stderr(installed, tmp_path):
    """Accepted at execjob_begin (a rejected begin hook reaches neither the job's comment nor its output),
    then execjob_launch runs the refusal in the job's place: the reason on stderr, exit 255, nothing else."""
    home, _ = installed
    done = hook_event(home, "execjob_begin", job={
        "id": "3.vm", "queue": "short", "euser": "nobody", "egroup": "nogroup",
        "Resource_List": {"walltime": "20:00:00", "ncpus": 1}})
    assert done["verdict"] == "accept" and not done["delete"] and not done["rerun"], done
    launch = hook_event(home, "execjob_launch", progname="/bin/sh", argv=[], env={"PBS_JOBID": "3.vm"},
                        job={"id": "3.vm", "queue": "short", "euser": "nobody"})
    assert launch["verdict"] == "accept" and launch["progname"] == "/bin/sh", launch
    script = tmp_path / "3.vm.SC"
    script.write_text(f"touch {tmp_path}/ran\n")
    for script_job in (True, False):  # the mom's argv rebuild for script jobs keeps the same command
        progname, argv = pbs_harness.mom_exec_argv(launch["progname"], launch["argv"], script_job)
        ran = pbs_harness.run_job_program(progname, argv, {"PATH": "/bin:/usr/bin"}, "/", "nobody",
                                          stdin_file=str(script) if script_job else None)
        assert ran.code == pbs.REFUSED_EXIT and ran.stdout == b"", ran
        assert ran.stderr == (b"blahvm: job 3.vm: rejected on this host: no route puts this job in queue short: "
                              b"no execution environment is offered to this VO\n")
    assert not (tmp_path / "ran").exists()
    again = hook_event(home, "execjob_launch", progname="/bin/sh", argv=[], env={}, job={"id": "3.vm"})
    assert again["progname"] == str(home / "mom_priv" / "blahvm_job_starter")  # the note is used once


def test_execjob_launch_puts_the_wrapper_in_the_jobs_place(installed):
    home, _ = installed
    starter = str(home / "mom_priv" / "blahvm_job_starter")
    script = hook_event(home, "execjob_launch", progname="/bin/bash", argv=[], env={"PBS_JOBID": "1.vm"},
                        job={"id": "1.vm", "queue": "short", "euser": "nobody"})
    assert script["verdict"] == "accept" and script["progname"] == starter and script["argv"] == [starter, "/bin/bash"]
    dashdash = hook_event(home, "execjob_launch", progname="/bin/echo", argv=["/bin/echo", "a", "b c"],
                          env={}, job={"id": "2.vm"})
    assert dashdash["argv"] == [starter, "/bin/echo", "a", "b c"]


def test_exechost_periodic_publishes_capacity(installed):
    home, _ = installed
    done = hook_event(home, "exechost_periodic", job={})
    assert done["verdict"] == "accept"
    assert done["vnodes"]["vm"] == {"blahvm_slots": 2, "blahvm_envs": "demo"}


def test_execjob_end_with_nothing_left_accepts(installed):
    home, _ = installed
    assert hook_event(home, "execjob_end", job={"id": "4.vm"})["verdict"] == "accept"


def test_a_hook_without_its_config_file_rejects_with_one_line(installed, tmp_path):
    home, _ = installed
    done = pbs_harness.run_hook(str(home / "blahvm" / "blahvm_hook.py"), {
        "type": "execjob_begin", "hook_config": str(tmp_path / "missing.json"), "job": {"id": "5.vm"}})
    assert done["verdict"] == "reject" and not done["rerun"]  # a bare reject requeues at execjob_begin
    assert done["message"].startswith("blahvm hook: cannot start: [Errno 2]") and "\n" not in done["message"]
    launch = pbs_harness.run_hook(str(home / "blahvm" / "blahvm_hook.py"), {
        "type": "execjob_launch", "hook_config": str(tmp_path / "missing.json"), "job": {"id": "5.vm"}})
    assert launch["verdict"] == "reject" and launch["rerun"]  # a bare reject at launch would delete the job


def test_execjob_begin_requeues_with_a_bare_reject_never_rerun(installed, tmp_path):
    """job.rerun() at execjob_begin leaves Exit_status -18 on OpenPBS 23.06's server for good: every later
    run of the job is requeued again. A bare reject requeues the job once."""
    home, _ = installed
    hook_settings = json.loads((home / "blahvm" / "blahvm_hook.json").read_text())
    hook_settings["config"] = str(tmp_path / "no-such-site.yaml")  # our failure: RETRY_ELSEWHERE
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(hook_settings))
    done = pbs_harness.run_hook(str(home / "blahvm" / "blahvm_hook.py"), {
        "type": "execjob_begin", "hook_config": str(broken), "queues": ["short"],
        "job": {"id": "6.vm", "queue": "short", "euser": "nobody", "Resource_List": {"ncpus": 1}}})
    assert done["verdict"] == "reject" and not done["rerun"] and not done["delete"], done
    assert done["vnodes"]["vm"] == {"blahvm_slots": 0}  # no slot here until exechost_periodic counts again


def test_the_script_path_openpbs_writes_on_stdin_becomes_the_script(tmp_path):
    """OpenPBS writes PBS_HOME/mom_priv/jobs/ID.SC (brackets escaped) on the shell's stdin: the guest gets
    the file's text; anything else on stdin passes unchanged."""
    jobs = tmp_path / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    script = jobs / "12[3].vm.SC"
    script.write_text("echo the script\n")

    def through(data: bytes, uid: int = os.getuid()) -> bytes:
        read, write = os.pipe()
        os.write(write, data)
        os.close(write)
        try:
            fd = pbs.script_stdin(uid, read)
            try:
                return os.read(fd, 1 << 20)
            finally:
                os.close(fd)
        finally:
            os.close(read)

    escaped = str(script).replace("[", "\\[").replace("]", "\\]")
    assert through(f"{escaped}\n".encode()) == b"echo the script\n"
    assert through(f"{escaped}\n".encode(), uid=os.getuid() + 1) == f"{escaped}\n".encode()  # not the user's
    assert through(b"echo Torque passes the text\n") == b"echo Torque passes the text\n"
    big = b"x" * 10000 + b"\n"
    assert through(big) == big
    assert through(b"") == b""


# -- one guest per job: chunks on one host, no private sandbox (issue 13) ---------------------------------


@pytest.mark.parametrize("sandbox, place, select, refused", [
    (None, None, "2:ncpus=1", None),
    ("HOME", "scatter", "1:ncpus=4", None),  # one chunk: nowhere to spread
    ("private", None, None, "sandbox=PRIVATE is not supported"),
    (None, "scatter:excl", "2:ncpus=1", "spreads the job's 2 chunks over hosts"),
    (None, "vscatter", "1:ncpus=1+1:mem=1gb", "spreads the job's 2 chunks over hosts"),
])
def test_what_one_guest_on_one_host_cannot_run_is_named(sandbox, place, select, refused):
    said = pbs.one_host_refusal(sandbox, place, select)
    assert (said is None) if refused is None else (refused in said and "\n" not in said)


@pytest.mark.parametrize("place, packed", [
    (None, "pack"), ("free", "pack"), ("excl", "pack:excl"), ("free:shared:group=switch", "pack:shared:group=switch"),
    ("pack:exclhost", "pack:exclhost"),
])
def test_every_chunk_is_packed_on_the_guests_host(place, packed):
    assert pbs.packed_place(place) == packed


def test_exec_hosts_are_the_distinct_hosts_in_order():
    assert pbs.exec_hosts("vm/0*2+vm/1") == ("vm",)
    assert pbs.exec_hosts("a/0+b/0+a/1") == ("a", "b")
    assert pbs.exec_hosts(None) == ()


def test_queuejob_packs_a_multi_chunk_job_and_refuses_a_private_sandbox(installed):
    home, _ = installed
    packed = hook_event(home, "queuejob", requestor="nobody", job={
        "id": "", "queue": "grid", "Resource_List": {"walltime": "00:05:00", "select": "2:ncpus=1"}})
    assert packed["verdict"] == "accept", packed
    assert packed["job"]["Resource_List"]["select"] == "1:ncpus=1:blahvm_slots=1+1:ncpus=1"
    assert packed["job"]["Resource_List"]["place"] == "pack"
    private = hook_event(home, "queuejob", requestor="nobody", job={
        "id": "", "queue": "grid", "sandbox": "PRIVATE", "Resource_List": {"walltime": "00:05:00"}})
    assert private["verdict"] == "reject" and private["message"] == pbs.SANDBOX_REFUSED


def test_execjob_begin_of_a_job_spread_over_hosts_deletes_it_with_the_reason(installed):
    home, _ = installed
    done = hook_event(home, "execjob_begin", job={
        "id": "8.vm", "queue": "short", "euser": "nobody", "exec_host": "vm/0+other/0",
        "Resource_List": {"walltime": "00:05:00", "select": "2:ncpus=1"}})
    assert done["verdict"] == "reject" and done["delete"] and not done["rerun"]
    assert done["message"] == "blahvm: the job's chunks are on 2 hosts; a job runs in one guest on one host"


# -- the guest's usage is the job's; suspend and resume reach the guest (issue 15) -----------------------


def _record(cpu, memory, closed=2000.0):
    from blahvm.lifecycle import AccountingRecord

    return AccountingRecord(job_id="1.vm", user="u", vo=None, environment="demo", outcome=None, reason=None,
                            started=closed - 100, closed=closed, provision_seconds=5.0, wall_seconds=90.0,
                            cpu_seconds=cpu, vcpu_seconds=None, max_memory_bytes=memory, disk_read_bytes=0,
                            disk_write_bytes=0)


def test_the_job_is_charged_its_own_usage_plus_its_guests():
    from blahvm.batch.pbs_usage import Charged, charged, run_record

    assert charged(_record(4.2, 300 * 1024 * 1024), host_cput_seconds=1, host_mem_bytes=8 * 1024 * 1024) == \
        Charged(cput_seconds=6, mem_kb=308 * 1024)
    assert charged(_record(None, None)) is None  # statistics lost: the mom's figures stay
    old, new = _record(1.0, 1, closed=1000.0), _record(2.0, 1, closed=3000.0)
    assert run_record([new, old], since=None) is new
    assert run_record([old], since=2000.0) is None  # an earlier run of a requeued job is not charged again


def test_walltime_is_the_guests_run_less_its_suspension_unless_the_mom_counted_more():
    from blahvm.batch.pbs_usage import Suspended, walltime_seconds

    run = _record(4.2, 1)  # wall_seconds 90
    assert walltime_seconds(run, 0.0) == 90
    assert walltime_seconds(run, 30.4) == 60
    assert walltime_seconds(run, 500.0, host_walltime_seconds=3) == 3
    assert walltime_seconds(run, 0.0, host_walltime_seconds=95) == 95
    held = Suspended().paused(100.0).paused(105.0)  # a second postsuspend keeps the first time
    assert held.seconds(110.0) == 10.0
    again = held.resumed(112.0).resumed(200.0).paused(300.0)
    assert again == Suspended(total=12.0, since=300.0) and again.seconds(303.0) == 15.0


def test_suspension_time_is_kept_root_only_and_survives_a_bad_file(tmp_path):
    from blahvm.batch.pbs_usage import Suspended, forget_suspended, read_suspended, write_suspended

    state = str(tmp_path)
    assert read_suspended(state, "1.vm") == Suspended()
    write_suspended(state, "1.vm", Suspended(total=3.0, since=10.0))
    assert read_suspended(state, "1.vm") == Suspended(total=3.0, since=10.0)
    (written,) = os.listdir(tmp_path / "pbs-suspensions")
    assert stat.S_IMODE(os.stat(tmp_path / "pbs-suspensions" / written).st_mode) == 0o600
    (tmp_path / "pbs-suspensions" / written).write_text("{not json")
    assert read_suspended(state, "1.vm") == Suspended()
    forget_suspended(state, "1.vm")
    forget_suspended(state, "1.vm")
    assert os.listdir(tmp_path / "pbs-suspensions") == []


def test_execjob_epilogue_sets_resources_used_from_the_guests_record(installed, site):
    from blahvm.config import load_config
    from blahvm.ledger import Consumed, Ledger
    from blahvm.model import Outcome

    home, _ = installed
    with Ledger(load_config(site).host) as ledger:
        ledger.reserve("9.vm", "nobody", None, "demo", 256 * 1024 * 1024, 1)
        ledger.record_usage("9.vm", Consumed(cpu_seconds=5.5, max_memory=Size(200 * 1024 * 1024)))
        ledger.close("9.vm", Outcome.OK)
    done = hook_event(home, "execjob_epilogue", job={
        "id": "9.vm", "euser": "nobody", "resources_used": {"cput": "00:00:01", "mem": "10240kb", "walltime": "00:01:40"}})
    assert done["verdict"] == "accept", done
    # walltime: the guest never ran (wall_seconds 0), so the mom's 100 s stays
    assert done["job"]["resources_used"] == {"cput": "7", "mem": f"{200 * 1024 + 10240}kb", "walltime": "100"}


def test_suspend_and_resume_of_a_job_without_a_guest_leave_it_to_the_mom(installed):
    home, _ = installed
    for kind in ("execjob_postsuspend", "execjob_preresume"):
        done = hook_event(home, kind, job={"id": "10.vm", "euser": "nobody"})
        assert done["verdict"] == "accept", done


def test_install_asks_for_exactly_the_events_the_hook_handles(installed):
    _, said = installed
    events = "queuejob,execjob_begin,execjob_launch,execjob_epilogue,execjob_end,execjob_postsuspend," \
             "execjob_preresume,exechost_periodic"
    assert f'qmgr -c "set hook blahvm event = \'{events}\'"' in said
