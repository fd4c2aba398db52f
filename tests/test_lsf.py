"""The LSF plugin: the parameter-file parser, the resource-request merge, and every hook run as LSF
runs it (tests/lsf_harness.py). The whole job on a real guest is in tests/test_lsf_guest.py."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.batch.lsf.esub import esub
from blahvm.batch.lsf.params import RESET, assignment, parse_params
from blahvm.batch.lsf.resreq import ResReqError, environment_resource, merge, split_sections
from tests import lsf_harness as lsf

# the parameter files a real volclava 2.2 wrote (observed-real-batch.md)
REAL_SUBMIT = '''LSB_SUB_JOB_NAME="lj1"
LSB_SUB_OUT_FILE="lj1.%J.out"
LSB_SUB_PROJECT_NAME="projA"
LSB_SUB_RLIMIT_RUN=300
LSB_SUB_NUM_PROCESSORS=1
LSB_SUB_MAX_NUM_PROCESSORS=1
'''
REAL_COMMAND_LINE = '''LSB_SUB_COMMANDNAME="./lj2.sh"
LSB_SUB_COMMAND_LINE="./lj2.sh a1 "a 2""
LSB_SUB_HOSTS="vm "
LSB_SUB_ADDITIONAL="myapp"
'''
REAL_BMOD = '''LSB_SUB_JOB_NAME="renamed"
LSB_SUB_RES_REQ="select[mem>10]"
LSB_SUB_MODIFY=Y
'''

SITE = """\
hypervisor: {{uri: "qemu:///system?socket=/var/tmp/blahvm-lsf-no-libvirt.sock", pool: blahvm-lsf-test,
             pool_path: {d}/clones, domain_type: qemu}}
host: {{max_guests: 2, memory: 2GiB, vcpus: 2, state_dir: {d}/state, run_dir: {d}/run}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{user: "^(?P<vo>[a-z]+)[0-9]{{3}}$"}}
  - {{account: "^(?P<vo>cms|atlas)$"}}
environments:
  slc4: {{image: {d}/golden.qcow2, flavour: kvm, memory: 256MiB, vcpus: 1}}
  el9: {{image: {d}/golden.qcow2, flavour: kvm, memory: 512MiB, vcpus: 2}}
queues:
  grid: {{}}
  short: {{max_walltime: 10h}}
  long: {{max_walltime: 72h}}
routes:
  - {{name: cms-short, when: {{queue: grid, vo: cms, walltime: "<= 10h"}}, queue: short, environment: slc4}}
  - {{name: cms-el9, when: {{queue: grid, vo: cms}}, queue: long, environment: el9}}
  - {{name: atlas, when: {{queue: grid, vo: atlas}}, queue: long, environment: el9, resources: "span[hosts=1]"}}
  - {{name: nobody-else, reject: "no execution environment is offered to this VO"}}
"""


@pytest.fixture(scope="module")
def site():
    """An installed site: config, route cache and LSF_SERVERDIR, all readable by nobody."""
    directory = tempfile.mkdtemp(prefix="blahvm-lsf-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    config, serverdir = lsf.write_site(directory, SITE.format(d=directory))
    cache = os.path.join(directory, "cache")
    result = lsf.install(serverdir, config, cache)
    assert result.returncode == 0, result.stderr
    yield {"dir": directory, "config": config, "serverdir": serverdir, "cache": cache}
    shutil.rmtree(directory, ignore_errors=True)


# -- the parameter file ---------------------------------------------------------------------------

def test_real_parameter_files_parse():
    assert parse_params(REAL_SUBMIT) == {
        "LSB_SUB_JOB_NAME": "lj1", "LSB_SUB_OUT_FILE": "lj1.%J.out", "LSB_SUB_PROJECT_NAME": "projA",
        "LSB_SUB_RLIMIT_RUN": "300", "LSB_SUB_NUM_PROCESSORS": "1", "LSB_SUB_MAX_NUM_PROCESSORS": "1"}
    values = parse_params(REAL_COMMAND_LINE)
    assert values["LSB_SUB_COMMAND_LINE"] == './lj2.sh a1 "a 2"'  # unescaped inner quotes kept
    assert values["LSB_SUB_HOSTS"] == "vm "
    assert values["LSB_SUB_ADDITIONAL"] == "myapp"
    assert parse_params(REAL_BMOD)["LSB_SUB_MODIFY"] == "Y"


def test_escapes_reset_and_odd_lines():
    values = parse_params('A="x \\"y\\" \\$z"\nB=SUB_RESET\nnot an assignment\nC="open\nmore"\nD="unterminated\nE=1')
    assert values["A"] == 'x "y" $z'
    assert values["B"] is RESET
    assert values["C"] == "open\nmore"
    assert values["D"] == "unterminated"
    assert values["E"] == "1"


param_names = st.sampled_from(["LSB_SUB_QUEUE", "LSB_SUB_PROJECT_NAME", "LSB_SUB_RLIMIT_RUN", "LSB_SUB_RES_REQ",
                               "LSB_SUB_NUM_PROCESSORS", "LSB_SUB_ADDITIONAL", "LSB_SUB_COMMAND_LINE",
                               "LSB_SUB_MODIFY", "LSB_SUB_RLIMIT_RSS", "LSB_SUB_JOB_NAME"])
param_values = st.one_of(
    st.text(max_size=40), st.integers(-5, 10**12).map(str), st.just("SUB_RESET"), st.just("Y"),
    st.sampled_from(["grid", "short", "cms", "atlas", 'blahvm(slc4)', 'blahvm(el9) x(1,2)', "blahvm(a,b)",
                     "select[mem>1] rusage[mem=1]", "2*{select[a]}", "$(touch /tmp/x)", "rusage[", "]"]),
)
param_lines = st.lists(st.tuples(param_names, param_values, st.booleans()), max_size=8).map(
    lambda items: "".join(f'{n}="{v}"\n' if quoted else f"{n}={v}\n" for n, v, quoted in items))
param_files = st.one_of(param_lines, st.text(max_size=200))


@given(param_files)
def test_parser_never_raises(text):
    values = parse_params(text)
    assert all(isinstance(v, str) or v is RESET for v in values.values())


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_assignment_writes_only_what_reads_back(value):
    try:
        line = assignment("X", value)
    except ValueError:
        assert any(c in value for c in '"\\$`\'#?^')
        return
    assert parse_params(line) == {"X": value if value != "SUB_RESET" else RESET}


# -- resource requirements ------------------------------------------------------------------------

def test_merge_keeps_the_users_request():
    assert merge("select[mem>100] rusage[mem=50] order[r1m]", "slc4", "span[hosts=1]") == (
        "select[(mem>100) && blahvm_env_slc4>0 && blahvm_slots>0] order[r1m] rusage[mem=50:blahvm_slots=1] "
        "span[hosts=1]")
    assert merge("mem>100 && swp>1", "el9").startswith("select[(mem>100 && swp>1) && blahvm_env_el9>0")
    assert merge(None, "el9") == "select[blahvm_env_el9>0 && blahvm_slots>0] rusage[blahvm_slots=1]"
    for bad in ("2*{select[a]}", "select[a] select[b]", "rusage[mem=1", "select[a] $(id)", 'a"b'):
        with pytest.raises(ResReqError):
            merge(bad, "el9")


def test_environment_resources_are_lsf_names():
    assert environment_resource("slc4") == "blahvm_env_slc4"
    for name in ("slc-4.x", "x" * 80, "a.b"):
        resource = environment_resource(name)
        assert len(resource) <= 39 and resource.replace("_", "").isalnum()
    assert environment_resource("a.b") != environment_resource("a-b")


@given(st.text(max_size=60))
def test_merge_never_raises_anything_else(text):
    try:
        sections = split_sections(text)
        merged = merge(text, "el9")
    except ResReqError:
        return
    assert set(sections) <= {"select", "order", "rusage", "span", "same", "cu", "affinity"}
    assert "blahvm_slots=1" in merged and "$" not in merged and '"' not in merged


# -- esub, run as LSF runs it -------------------------------------------------------------------------

def test_esub_routes_and_writes_queue_resources_and_hints(site):
    run = lsf.run_esub(site["serverdir"], REAL_SUBMIT.replace("projA", "cms")
                       + 'LSB_SUB_QUEUE="grid"\nLSB_SUB_RES_REQ="select[mem>100] rusage[mem=50]"\n')
    assert run.code == 0, run.stderr
    assert run.stdout == b"" and run.stderr == ""
    assert run.modify == ('LSB_SUB_QUEUE="short"\n'
                          'LSB_SUB_RES_REQ="select[(mem>100) && blahvm_env_slc4>0 && blahvm_slots>0] '
                          'rusage[mem=50:blahvm_slots=1]"\n')
    assert lsf.env_lines(run.envfile) == {"BLAHVM_ENVIRONMENT": "slc4", "BLAHVM_SUBMIT_QUEUE": "grid",
                                          "BLAHVM_WALLTIME": "300"}


def test_esub_honours_the_environment_asked_for(site):
    params = 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="cms"\nLSB_SUB_ADDITIONAL="blahvm(el9)"\n'
    run = lsf.run_esub(site["serverdir"], params)
    assert run.code == 0 and 'LSB_SUB_QUEUE="long"' in run.modify and "blahvm_env_el9>0" in run.modify
    # the documented alternative: BLAHVM_ENVIRONMENT in the environment at bsub
    run = lsf.run_esub(site["serverdir"], params.replace("blahvm(el9)", "myapp"), env={"BLAHVM_ENVIRONMENT": "el9"})
    assert run.code == 0 and 'LSB_SUB_QUEUE="long"' in run.modify
    unknown = lsf.run_esub(site["serverdir"], params.replace("el9", "nowhere"))
    assert unknown.code == lsf.ABORT and unknown.modify is None and unknown.stdout == b""
    assert unknown.stderr == ('blahvm: job rejected: environment nowhere does not exist here (asked for with -a '
                              '"blahvm(nowhere)" or $BLAHVM_ENVIRONMENT); this site offers el9, slc4\n'), unknown.stderr


def test_esub_rejects_with_the_reason(site):
    run = lsf.run_esub(site["serverdir"], REAL_SUBMIT)  # projA: no VO
    assert run.code == lsf.ABORT
    assert run.stderr == "blahvm: job rejected: no execution environment is offered to this VO\n"
    assert run.stdout == b"" and run.modify is None and run.envfile is None
    long = lsf.run_esub(site["serverdir"], 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="atlas"\n'
                                           'LSB_SUB_RLIMIT_RUN=360000\n')
    assert long.code == lsf.ABORT and "exceeds the 3d limit of queue long" in long.stderr
    bad = lsf.run_esub(site["serverdir"], 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="cms"\nLSB_SUB_RLIMIT_RUN=5m\n')
    assert bad.code == lsf.ABORT and "LSB_SUB_RLIMIT_RUN='5m' is not a whole number of seconds" in bad.stderr


def test_esub_on_bmod(site):
    untouched = lsf.run_esub(site["serverdir"], 'LSB_SUB_JOB_NAME="renamed"\nLSB_SUB_MODIFY=Y\n')
    assert untouched.code == 0 and untouched.modify is None
    moved = lsf.run_esub(site["serverdir"], 'LSB_SUB_QUEUE="grid"\nLSB_SUB_PROJECT_NAME="cms"\n'
                                            'LSB_SUB_RES_REQ=SUB_RESET\nLSB_SUB_MODIFY=Y\n')
    assert moved.code == 0 and 'LSB_SUB_QUEUE="short"' in moved.modify
    assert moved.envfile is None  # LSF ignores the env file for bmod: none is written
    refused = lsf.run_esub(site["serverdir"], REAL_BMOD)  # -R changed: routed again, nobody has no VO
    assert refused.code == lsf.ABORT


def test_a_command_line_is_never_run(site):
    marker = f"/var/tmp/blahvm-lsf-pwned-{os.getpid()}"
    params = REAL_COMMAND_LINE.replace("a1", f"$(touch {marker}) `touch {marker}`") + 'LSB_SUB_PROJECT_NAME="cms"\n'
    run = lsf.run_esub(site["serverdir"], params + 'LSB_SUB_QUEUE="grid"\n')
    assert run.code == 0, run.stderr
    assert not os.path.exists(marker)


def test_the_config_is_the_installed_one(site):
    permissive = os.path.join(site["dir"], "permissive.yaml")
    with open(permissive, "w") as stream:
        stream.write(SITE.format(d=site["dir"]).replace('reject: "no execution', 'queue: long, environment: el9, x: "'))
    run = lsf.run_esub(site["serverdir"], REAL_SUBMIT, env={"BLAHVM_CONFIG": permissive, "PYTHONPATH": "/nonexistent",
                                                             "BLAHVM_CACHE_DIR": site["dir"]})
    assert run.code == lsf.ABORT and "no execution environment is offered" in run.stderr


def test_broken_config_rejects_unless_told_to_let_through(site):
    directory = tempfile.mkdtemp(prefix="blahvm-lsf-broken-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    try:
        config = os.path.join(directory, "site.yaml")
        shutil.copy(site["config"], config)
        os.chmod(config, 0o644)
        for policy, expected in (("reject", lsf.ABORT), ("accept", 0)):
            serverdir = os.path.join(directory, policy)
            os.mkdir(serverdir, 0o755)
            assert lsf.install(serverdir, config, os.path.join(directory, "cache"),
                               "--on-broken-config", policy).returncode == 0
        with open(config, "a") as stream:
            stream.write("routez: []\n")
        rejected = lsf.run_esub(os.path.join(directory, "reject"), REAL_SUBMIT)
        assert rejected.code == lsf.ABORT and rejected.stdout == b""
        assert rejected.stderr.startswith("blahvm: job rejected: the site's blahvm config")
        assert "Traceback" not in rejected.stderr
        accepted = lsf.run_esub(os.path.join(directory, "accept"), REAL_SUBMIT)
        assert accepted.code == 0 and accepted.modify is None and "goes on unrouted" in accepted.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(param_files)
def test_generated_parameter_files_through_the_real_esub(site, text):
    run = lsf.run_esub(site["serverdir"], text)
    assert run.code in (0, lsf.ABORT)
    assert run.stdout == b""
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) <= 1
    if run.code == lsf.ABORT:
        assert run.stderr.startswith("blahvm: job rejected: ") and run.modify is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(param_files)
def test_generated_parameter_files_in_process(site, tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("esub")
    parm = directory / "parm"
    parm.write_text(text, errors="surrogateescape")
    environ = {"LSB_SUB_PARM_FILE": str(parm), "LSB_SUB_ABORT_VALUE": "97",
               "LSB_SUB_MODIFY_FILE": str(directory / "m"), "LSB_SUB_MODIFY_ENVFILE": str(directory / "e")}
    assert esub(site["config"], site["cache"], "reject", environ=environ) in (0, 97)


def test_esub_without_lsf_around_it(site):
    result = subprocess.run([os.path.join(site["serverdir"], "esub.blahvm")], capture_output=True,
                            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 97 and result.stdout == b""
    assert result.stderr == b"blahvm: job rejected: LSB_SUB_PARM_FILE is not set (this esub runs under bsub or bmod)\n"


# -- installer ----------------------------------------------------------------------------------------

def test_installed_hooks(site):
    names = sorted(os.listdir(site["serverdir"]))
    assert names == ["blahvm-job-starter", "blahvm-post-exec", "blahvm-pre-exec", "elim.blahvm", "esub.blahvm"]
    for name in names:
        path = os.path.join(site["serverdir"], name)
        mode = os.stat(path).st_mode
        assert stat.S_IMODE(mode) == 0o755
        with open(path) as stream:
            text = stream.read()
        assert text.startswith(f"#!{lsf.SYSTEM_PYTHON} -IS\n") and repr(site["config"]) in text
    bad = lsf.install("/nonexistent-dir", site["config"], site["cache"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    openlava = tempfile.mkdtemp(dir="/var/tmp")
    try:
        assert lsf.install(openlava, site["config"], site["cache"], "--elim-name", "elim").returncode == 0
        assert "elim" in os.listdir(openlava)
    finally:
        shutil.rmtree(openlava)


def test_install_checks_that_an_unprivileged_user_can_run_the_hooks(site, tmp_path):
    """An esub nobody can execute makes LSF accept every job unrouted: the install stops first, writing nothing."""
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)  # as a pyenv or venv interpreter under a 0700 home
    python = hidden / "python3"
    os.symlink(lsf.SYSTEM_PYTHON, python)
    serverdir = tmp_path / "serverdir"
    serverdir.mkdir()
    refused = lsf.install(str(serverdir), site["config"], site["cache"], "--python", str(python))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "user nobody cannot run the hooks" in refused.stderr and os.listdir(serverdir) == []
    # the interpreter is fine, the config is not readable by users
    private = tmp_path / "site.yaml"
    shutil.copy(site["config"], private)
    private.chmod(0o600)
    refused = lsf.install(str(serverdir), str(private), site["cache"])
    assert refused.returncode == 2 and "user nobody cannot run the hooks" in refused.stderr, refused.stderr
    assert "Permission denied" in refused.stderr and os.listdir(serverdir) == []


# -- elim ---------------------------------------------------------------------------------------------

def test_elim_reports_zero_while_libvirt_is_down_and_stops_on_sigterm(site):
    serverdir = tempfile.mkdtemp(dir="/var/tmp")
    try:
        assert lsf.install(serverdir, site["config"], site["cache"], "--elim-interval", "0.2").returncode == 0
        elim = lsf.start_elim(serverdir, "elim.blahvm", "blahvm_slots blahvm_env_slc4")
        try:
            first = elim.stdout.readline().decode()
            assert first == "3 blahvm_slots 0 blahvm_env_el9 0 blahvm_env_slc4 0\n"
            started = time.monotonic()
            second = elim.stdout.readline().decode()
            assert second == first and time.monotonic() - started >= 0.2 * 3  # unchanged: repeated every 4th sample
            elim.send_signal(signal.SIGTERM)
            assert elim.wait(timeout=30) == 0
        finally:
            if elim.poll() is None:
                elim.kill()
                elim.wait()
        assert elim.stderr.read() == b""
    finally:
        shutil.rmtree(serverdir)


def test_elim_aborts_on_a_host_without_blahvm(site):
    serverdir = tempfile.mkdtemp(dir="/var/tmp")
    os.chmod(serverdir, 0o755)  # the config installed from here must be readable by users
    try:
        missing = os.path.join(serverdir, "no-such-site.yaml")
        shutil.copy(site["config"], missing)
        assert lsf.install(serverdir, missing, site["cache"]).returncode == 0
        os.unlink(missing)
        elim = lsf.start_elim(serverdir, "elim.blahvm", "blahvm_slots", abort=5)
        out, err = elim.communicate(timeout=60)
        assert (elim.returncode, out, err) == (5, b"", b"")
        # blahvm here, but LSF maps none of its resources to this host
        other = lsf.start_elim(site["serverdir"], "elim.blahvm", "somethingelse", abort=6)
        out, err = other.communicate(timeout=60)
        assert (other.returncode, out) == (6, b"")
    finally:
        shutil.rmtree(serverdir)


# -- PRE_EXEC / JOB_STARTER / POST_EXEC where no guest is needed ---------------------------------------------

def test_pre_exec_refusals(site):
    hints = {"BLAHVM_ENVIRONMENT": "slc4", "BLAHVM_SUBMIT_QUEUE": "grid"}
    serverdir = site["serverdir"]
    for job_id, project in (("11", "cms"), ("12", "cms"), ("13", "projA"), ("14", "cms"), ("15", "cms"),
                            ("17", "cms")):
        lsf.set_project(serverdir, job_id, project)
    # a queue blahvm does not know, an environment the rules do not give there, a project no route takes,
    # a forged hint, no such user, a job id that is not one
    assert lsf.run_pre_exec(serverdir, lsf.job_env("11", "normal", "nobody", hints)) == 99
    assert lsf.run_pre_exec(serverdir, lsf.job_env("12", "short", "nobody", dict(hints, BLAHVM_ENVIRONMENT="el9"))) == 99
    assert lsf.run_pre_exec(serverdir, lsf.job_env("13", "short", "nobody", hints)) == 99
    assert lsf.run_pre_exec(serverdir, lsf.job_env("14", "short", "nobody", dict(hints, BLAHVM_WALLTIME="$(id)"))) == 99
    assert lsf.run_pre_exec(serverdir, lsf.job_env("15", "short", "nobody", hints, LSFUSER="no-such-user-x")) == 99
    assert lsf.run_pre_exec(serverdir, lsf.job_env("../16", "short", "nobody", hints)) == 99
    # a job LSF does not know (bjobs: "Job <19> is not found")
    assert lsf.run_pre_exec(serverdir, lsf.job_env("19", "short", "nobody", hints)) == 99
    # routed fine, but libvirt cannot be reached: re-pend
    assert lsf.run_pre_exec(serverdir, lsf.job_env("17", "short", "nobody", hints)) == 1


def test_pre_exec_takes_the_project_from_lsf_never_from_the_jobs_environment(site):
    """volclava sets no LSB_PROJECT_NAME: whatever the submitter had in their environment passes through."""
    hints = {"BLAHVM_ENVIRONMENT": "slc4", "BLAHVM_SUBMIT_QUEUE": "grid"}
    serverdir = site["serverdir"]
    lsf.set_project(serverdir, "31", "atlas")  # bsub -P atlas with LSB_PROJECT_NAME=cms in the environment
    assert lsf.run_pre_exec(serverdir, lsf.job_env("31", "short", "nobody", hints, LSB_PROJECT_NAME="cms")) == 99
    lsf.set_project(serverdir, "32", "cms")  # bsub -P cms with LSB_PROJECT_NAME=atlas: routed as cms
    assert lsf.run_pre_exec(serverdir, lsf.job_env("32", "short", "nobody", hints, LSB_PROJECT_NAME="atlas")) == 1
    lsf.set_project(serverdir, "33", "default")  # no -P: LSF's default project is none
    assert lsf.run_pre_exec(serverdir, lsf.job_env("33", "short", "nobody", hints, LSB_PROJECT_NAME="cms")) == 99


def test_project_from_bjobs_json():
    from blahvm.batch.lsf.execution import LsfUnavailable, NotRunnable, project_from_bjobs

    real = '{\n\t"COMMAND":\t"bjobs",\n\t"JOBS":\t1,\n\t"RECORDS":\t[{\n\t\t\t"JOBID":\t"1",\n\t\t\t"PROJ_NAME":\t"cms"\n\t\t}]\n}\n'
    assert project_from_bjobs(real, "1") == "cms"
    assert project_from_bjobs(real.replace('"cms"', '"default"'), "1") is None
    with pytest.raises(NotRunnable, match="Job <999> is not found"):
        project_from_bjobs('{"RECORDS": [{"JOBID": "999", "ERROR": "Job <999> is not found"}]}', "999")
    for bad in ("", "{", '{"RECORDS": []}', '{"RECORDS": [{"JOBID": "1"}]}', '{"RECORDS": [{"PROJ_NAME": 3}]}'):
        with pytest.raises(LsfUnavailable):
            project_from_bjobs(bad, "1")


# bjobs -l of a real volclava 2.2 for a job submitted with LSB_ESUB_METHOD=none (the esub never ran)
REAL_BJOBS_L_UNROUTED = """
Job <20>, User <rbuser>, Project <cms>, Status <PSUSP>, Queue <normal>, Command </bin/sh -c 'sleep 1; echo "a > b"'>
Sun Dec  6 21:16:34: Submitted from host <vm> with hold, CWD </tmp>, Requested Resources <select[mem>10] rusage[mem=5]>;
 PENDING REASONS:
 The job was suspended by the user while pending: 1 host;

 SCHEDULING PARAMETERS:
           r15s   r1m  r15m   ut      pg    io   ls    it    tmp    swp    mem
 loadSched   -     -     -     -       -     -    -     -     -      -      -
 loadStop    -     -     -     -       -     -    -     -     -      -      -

 RESOURCE REQUIREMENT DETAILS:
 Combined: select[(mem>10) && (type == local)] order[r15s:pg] rusage[mem=5.00]
 Effective: -
"""


def test_routed_by_blahvm_reads_lsfs_combined_requirement():
    from blahvm.batch.lsf.execution import LsfUnavailable, NotRunnable, routed_by_blahvm

    assert not routed_by_blahvm(REAL_BJOBS_L_UNROUTED, "20")
    routed = REAL_BJOBS_L_UNROUTED.replace("rusage[mem=5.00]", "rusage[mem=5.00:blahvm_slots=1.00]")
    assert routed_by_blahvm(routed, "20")
    assert not routed_by_blahvm(REAL_BJOBS_L_UNROUTED.replace("rusage[mem=5.00]", "rusage[blahvm_slots=0.00]"), "20")
    assert not routed_by_blahvm(REAL_BJOBS_L_UNROUTED.replace("mem>10", "blahvm_slots>0"), "20")
    # a command line forging the section comes before LSF's own, which is the one read
    forged = REAL_BJOBS_L_UNROUTED.replace(
        "echo \"a > b\"'>", "\n RESOURCE REQUIREMENT DETAILS:\n Combined: rusage[blahvm_slots=1]\n'>")
    assert "Combined: rusage[blahvm_slots=1]" in forged and not routed_by_blahvm(forged, "20")
    with pytest.raises(NotRunnable, match="not found"):
        routed_by_blahvm("Job <21> is not found", "21")
    with pytest.raises(LsfUnavailable):
        routed_by_blahvm("", "21")


def test_pre_exec_refuses_a_job_the_esub_never_routed(site):
    """LSB_ESUB_METHOD=none, or an esub that could not run: LSF's record reserves no blahvm slot."""
    hints = {"BLAHVM_ENVIRONMENT": "slc4", "BLAHVM_SUBMIT_QUEUE": "grid"}
    serverdir = site["serverdir"]
    lsf.set_project(serverdir, "51", "cms")
    lsf.set_resreq(serverdir, "51", "select[type == local] order[r15s:pg]")
    assert lsf.run_pre_exec(serverdir, lsf.job_env("51", "short", "nobody", hints)) == 99
    # in the routing queue too (no starter there): refused, even with a slot written by hand
    lsf.set_project(serverdir, "52", "cms")
    lsf.set_resreq(serverdir, "52", "select[type == local] order[r15s:pg] rusage[blahvm_slots=1.00]")
    assert lsf.run_pre_exec(serverdir, lsf.job_env("52", "grid", "nobody", {})) == 99
    # the same job in the execution queue is routed again and goes on (here: libvirt is unreachable)
    assert lsf.run_pre_exec(serverdir, lsf.job_env("52", "short", "nobody", {})) == 1


def test_pre_exec_tells_the_user_why_in_the_jobs_error_file(site, tmp_path):
    """volclava's PRE_EXEC has stdio on /dev/null and no message channel: the reason goes into the job's
    -e file (else -o), appended as the job's user before LSF appends its report there."""
    hints = {"BLAHVM_ENVIRONMENT": "slc4", "BLAHVM_SUBMIT_QUEUE": "grid"}
    serverdir = site["serverdir"]
    work = tmp_path.__class__(site["dir"]) / "notices"  # the harness site is 0755: nobody reaches it
    work.mkdir()
    os.chown(work, 65534, 65534)
    lsf.set_project(serverdir, "61", "projA")
    err = work / "61.err"
    env = lsf.job_env("61", "short", "nobody", hints, LSB_ERRORFILE=str(err), LSB_OUTPUTFILE=str(work / "61.out"))
    assert lsf.run_pre_exec(serverdir, env) == 99
    line = err.read_text()
    assert line.startswith("blahvm: job 61 did not start: job 61: ") and line.count("\n") == 1, line
    assert err.stat().st_uid == 65534 and not (work / "61.out").exists()
    # only -o, given relative to the submission directory: there
    lsf.set_project(serverdir, "62", "projA")
    env = lsf.job_env("62", "short", "nobody", hints, LSB_OUTPUTFILE="62.out", LS_SUBCWD=str(work))
    assert lsf.run_pre_exec(serverdir, env) == 99
    assert (work / "62.out").read_text().startswith("blahvm: job 62 did not start: ")
    # a link the user planted towards root's file is not followed, and nothing is written as root
    lsf.set_project(serverdir, "63", "projA")
    target = tmp_path / "roots"
    target.write_text("root's\n")
    (work / "63.err").symlink_to(target)
    assert lsf.run_pre_exec(serverdir, lsf.job_env("63", "short", "nobody", hints, LSB_ERRORFILE=str(work / "63.err"))) == 99
    assert target.read_text() == "root's\n"
    # a directory: LSF's ID.err inside; a place the user may not write: nothing, the log says so
    lsf.set_project(serverdir, "64", "projA")
    assert lsf.run_pre_exec(serverdir, lsf.job_env("64", "short", "nobody", hints, LSB_ERRORFILE=f"{work}/")) == 99
    assert (work / "64.err").read_text().startswith("blahvm: job 64 did not start: ")
    lsf.set_project(serverdir, "65", "projA")
    assert lsf.run_pre_exec(serverdir, lsf.job_env("65", "short", "nobody", hints, LSB_ERRORFILE=str(tmp_path / "x"))) == 99
    assert not (tmp_path / "x").exists()  # tmp_path is root's, 0700


def test_notice_line_is_one_printable_line():
    from blahvm.batch.lsf.notice import job_file, notice_line

    assert notice_line("7", "environment \x1b[31mx\ny does not exist") == \
        "blahvm: job 7 did not start: environment \\x1b[31mx y does not exist\n"
    assert job_file({"LSB_OUTPUTFILE": "/dev/null", "LSB_ERRORFILE": "/dev/null"}) is None
    assert job_file({"LSB_OUTPUTFILE": "o", "LS_SUBCWD": "relative"}) is None
    assert job_file({"LSB_ERRORFILE": "/e", "LSB_OUTPUTFILE": "/o"}) == "/e"


def test_pre_exec_re_pends_while_lsf_cannot_say(site, tmp_path):
    serverdir = str(tmp_path / "serverdir")
    os.mkdir(serverdir)
    hanging = tmp_path / "bjobs"
    hanging.write_text("#!/bin/sh\nexit 255\n")
    hanging.chmod(0o755)
    assert lsf.install(serverdir, site["config"], site["cache"], "--bjobs", str(hanging)).returncode == 0
    env = lsf.job_env("41", "short", "nobody", {"BLAHVM_SUBMIT_QUEUE": "grid"}, LSB_PROJECT_NAME="cms")
    assert lsf.run_pre_exec(serverdir, env) == 1


def test_the_starter_logs_to_syslog_when_the_log_file_is_roots():
    """The starter runs as the job's user: it never tries (and fails silently) to append to root's log file."""
    import pwd
    import types

    from blahvm.batch.lsf.execution import starter_log

    directory = tempfile.mkdtemp(prefix="blahvm-lsf-log-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        roots, shared = os.path.join(directory, "roots.log"), os.path.join(directory, "shared.log")
        for path, mode in ((roots, 0o644), (shared, 0o666)):
            open(path, "w").close()
            os.chmod(path, mode)

        def config(path):
            return types.SimpleNamespace(host=types.SimpleNamespace(log_file=path))

        nobody = pwd.getpwnam("nobody")
        child = os.fork()
        if child == 0:
            ok = False
            try:
                os.setgroups([])
                os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
                os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
                ok = (starter_log(config(roots)) is None and starter_log(config(shared)) == shared
                      and starter_log(config(None)) is None)
            finally:
                os._exit(0 if ok else 1)
        assert os.waitpid(child, 0)[1] == 0
        assert starter_log(config(roots)) == roots  # root may append
    finally:
        shutil.rmtree(directory)


def test_starter_and_post_exec_without_a_guest(site):
    env = lsf.job_env("21", "short", "nobody", {"BLAHVM_SUBMIT_QUEUE": "grid"})
    run = lsf.run_job_starter(site["serverdir"], env, "/bin/echo hello", "nobody", "/tmp")
    assert run.returncode == 255 and run.stdout == b""
    assert run.stderr.startswith(b"blahvm: job 21 could not run in its guest") and run.stderr.count(b"\n") == 1
    # a job environment over what one agent frame holds: refused with one clear line, not "internal error"
    big = dict(env, **{f"BIG{n}": "x" * 110_000 for n in range(10)})
    refused = lsf.run_job_starter(site["serverdir"], big, "/bin/echo hello", "nobody", "/tmp")
    assert refused.returncode == 255 and refused.stdout == b"", refused
    assert refused.stderr.count(b"\n") == 1 and b"more than the" in refused.stderr and b"internal error" not in \
        refused.stderr, refused.stderr
    empty = lsf.run_job_starter(site["serverdir"], env, "", "nobody", "/tmp")
    assert empty.returncode == 255 and b"got no command" in empty.stderr
    # a job that never had a guest: teardown needs no hypervisor (none is reachable here) and is done
    assert lsf.run_post_exec(site["serverdir"], env, 0) == 0
