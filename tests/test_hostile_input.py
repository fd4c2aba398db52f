"""Hostile input through the real entry points, fuzzed with Hypothesis: LSF parameter files (the installed
esub, as the user), PBS argv (the installed prologue and epilogue, as the mom runs them) and hook
attributes (the installed OpenPBS hook under the stand-in pbs module), Slurm environment variables
(the Prolog and Epilog entry functions), YAML config (``blahvm check``) and agent frames (the agent on a
UNIX socket). Each must end with a defined exit code or verdict, never a traceback, and never run a
command hidden in a string: every string field carries ``$(touch CANARY)`` and backquotes among the
fuzzed values, and the canary file must never appear.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.guest import agent
from blahvm.guest.client import wait_ready
from tests import lsf_harness as lsf
from tests import pbs_harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANARY = f"/tmp/blahvm-hostile-{uuid.uuid4().hex}"
INJECTIONS = [f"$(touch {CANARY})", f"`touch {CANARY}`", f"; touch {CANARY}", f"| touch {CANARY}",
              f"\"; touch {CANARY}; echo \"", f"'$(touch {CANARY})'", f"\n touch {CANARY}\n", f"&& touch {CANARY}"]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# a string a user could put anywhere: shell tricks, quotes, newlines, NULs, non-ASCII, long runs
hostile_text = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(max_size=40),
    st.text(alphabet="$`'\"\\;|&()<>{}[]*?~!#\n\t =%", max_size=20),
    st.builds(lambda a, b: a + b, st.sampled_from(INJECTIONS), st.text(max_size=10)),
    st.just("x" * 5000),
)


def no_canary():
    assert not os.path.exists(CANARY), "a string from the user was run as a command"


def no_traceback(*texts):
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        assert "Traceback" not in (text or ""), text


@pytest.fixture(scope="module", autouse=True)
def canary_never_appears():
    yield
    try:
        no_canary()
    finally:
        if os.path.exists(CANARY):
            os.unlink(CANARY)


# -- LSF: the parameter file through the installed esub, as the submitting user ------------------

LSF_SITE = """\
hypervisor: {{uri: "test:///default", pool: blahvm-hostile, pool_path: {d}/clones}}
host: {{max_guests: 2, state_dir: {d}/state, run_dir: {d}/run}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{account: "^(?P<vo>cms|atlas)$"}}
environments:
  slc4: {{image: {d}/golden.qcow2, flavour: kvm, memory: 256MiB, vcpus: 1}}
queues: {{grid: {{}}, short: {{max_walltime: 10h}}}}
routes:
  - {{name: cms, when: {{queue: grid, vo: cms}}, queue: short, environment: slc4}}
  - {{name: nobody-else, reject: "no execution environment is offered to this VO"}}
"""


@pytest.fixture(scope="module")
def lsf_site():
    directory = tempfile.mkdtemp(prefix="blahvm-hostile-lsf-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    config, serverdir = lsf.write_site(directory, LSF_SITE.format(d=directory))
    done = lsf.install(serverdir, config, os.path.join(directory, "cache"))
    assert done.returncode == 0, done.stderr
    yield serverdir
    shutil.rmtree(directory, ignore_errors=True)


LSF_KEYS = ["LSB_SUB_QUEUE", "LSB_SUB_PROJECT_NAME", "LSB_SUB_JOB_NAME", "LSB_SUB_ADDITIONAL", "LSB_SUB_RES_REQ",
            "LSB_SUB_RLIMIT_RUN", "LSB_SUB_NUM_PROCESSORS", "LSB_SUB_COMMAND_LINE", "LSB_SUB_OUT_FILE",
            "LSB_SUB_USER_GROUP", "LSB_SUB_MODIFY", "LSB_SUB_HOSTS", "LSB_SUB_MEM_LIMIT", "BOGUS"]


@st.composite
def parameter_files(draw):
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.sampled_from(LSF_KEYS))
        value = draw(hostile_text)
        quoting = draw(st.sampled_from(['{k}="{v}"', "{k}={v}", "{k}='{v}'", "{v}", '{k}="{v}']))
        lines.append(quoting.format(k=key, v=value))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))


@FUZZ
@given(text=parameter_files())
def test_lsf_parameter_files_through_the_esub(lsf_site, text):
    done = lsf.run_esub(lsf_site, text)
    assert done.code in (0, lsf.ABORT), (done.code, done.stderr)
    no_traceback(done.stderr, done.stdout)
    assert done.stdout == b""  # the esub's stdout feeds eexec: never chatter
    no_canary()


# -- PBS: prologue and epilogue argv as the mom passes it; the OpenPBS hook's attributes ----------

PBS_SITE = """\
hypervisor: {{uri: "test:///default", pool: blahvm-hostile-pbs, pool_path: /var/lib/blahvm/hostile-clones, timeout: 10}}
host: {{max_guests: 2, state_dir: {d}/state, run_dir: {d}/run}}
defaults: {{walltime: 1h, cores: 1}}
vo_mapping:
  - {{user: "^(?P<vo>nobody)$"}}
environments:
  demo: {{image: {d}/golden.raw, sha256: {sha}, flavour: kvm, memory: 256MiB, vcpus: 2}}
queues: {{grid: {{}}, short: {{max_walltime: 10h}}}}
routes:
  - {{name: nobody-short, when: {{queue: [grid, short], vo: nobody}}, queue: short, environment: demo}}
  - {{name: others, reject: "no execution environment is offered to this VO"}}
"""


@pytest.fixture(scope="module")
def pbs_home():
    directory = tempfile.mkdtemp(prefix="blahvm-hostile-pbs-", dir="/var/tmp")
    image = os.path.join(directory, "golden.raw")
    with open(image, "wb") as stream:
        stream.write(b"\0" * 1024 * 1024)
    # a checksum the golden fails: a job that routes fails fast instead of waiting for a guest
    config = os.path.join(directory, "site.yaml")
    with open(config, "w") as stream:
        stream.write(PBS_SITE.format(d=directory, sha="0" * 64))
    home = os.path.join(directory, "pbs_home")
    os.makedirs(os.path.join(home, "mom_priv"))
    qstat = os.path.join(directory, "qstat")
    with open(qstat, "w") as stream:
        stream.write("#!/bin/sh\necho '{}'\n")
    os.chmod(qstat, 0o755)
    done = subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "pbs", "--home", home, "--config",
                           config, "--qstat", qstat, "--budget", "6", "--python", pbs_harness.SYSTEM_PYTHON],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    yield home
    shutil.rmtree(directory, ignore_errors=True)


pbs_argv = st.lists(st.one_of(hostile_text.filter(lambda s: "\0" not in s),
                              st.sampled_from(["nobody", "123.server", "grid", "short", "0", "-1", "walltime=01:00:00"])),
                    max_size=12)


@FUZZ
@given(argv=pbs_argv)
def test_pbs_prologue_argv(pbs_home, argv):
    ran = pbs_harness.run_script(os.path.join(pbs_home, "mom_priv", "prologue"), argv,
                                 cwd=os.path.join(pbs_home, "mom_priv"), alarm=60)
    assert ran.code in (0, 1, 2), (ran.code, ran.stderr)  # go on, abort, requeue (docs/pbs.md)
    no_traceback(ran.stdout, ran.stderr)
    no_canary()


@FUZZ
@given(argv=pbs_argv)
def test_pbs_epilogue_argv(pbs_home, argv):
    ran = pbs_harness.run_script(os.path.join(pbs_home, "mom_priv", "epilogue"), argv, cwd="/", alarm=60)
    assert ran.code in (0, 1, 2), (ran.code, ran.stderr)
    no_traceback(ran.stdout, ran.stderr)
    no_canary()


attribute_values = st.one_of(hostile_text, st.none(), st.integers(-2**40, 2**40),
                             st.lists(hostile_text, max_size=3), st.dictionaries(hostile_text, hostile_text, max_size=3))


@st.composite
def hook_events(draw):
    kind = draw(st.sampled_from(["queuejob", "execjob_begin", "execjob_launch", "execjob_epilogue", "execjob_end",
                                 "execjob_postsuspend", "execjob_preresume", "exechost_periodic"]))
    resources = draw(st.dictionaries(st.sampled_from(["walltime", "select", "ncpus", "mem", "blahvm_env", "nodes"]),
                                     hostile_text, max_size=4))
    job = {"id": draw(st.one_of(st.just("12.server"), hostile_text)), "queue": draw(st.one_of(st.just("grid"), hostile_text)),
           "Account_Name": draw(st.one_of(st.none(), hostile_text)), "Job_Name": draw(hostile_text),
           "euser": draw(st.one_of(st.just("nobody"), hostile_text)), "Resource_List": resources,
           "Variable_List": draw(st.dictionaries(hostile_text, hostile_text, max_size=3)),
           "sandbox": draw(st.one_of(st.none(), st.just("PRIVATE"), hostile_text)),
           "exec_host": draw(st.one_of(st.none(), st.just("vm/0*2+other/0"), hostile_text))}
    event = {"type": kind, "requestor": draw(st.one_of(st.just("nobody"), hostile_text)), "job": job}
    if draw(st.booleans()):
        event["progname"] = draw(hostile_text)
        event["argv"] = draw(st.lists(hostile_text, max_size=4))
    return event


@FUZZ
@given(event=hook_events())
def test_pbs_hook_attributes(pbs_home, event):
    event.update({"hook_config": os.path.join(pbs_home, "blahvm", "blahvm_hook.json"),
                  "queues": ["workq", "grid", "short"], "default_queue": "workq"})
    try:
        done = pbs_harness.run_hook(os.path.join(pbs_home, "blahvm", "blahvm_hook.py"), event)
    except (AssertionError, json.JSONDecodeError) as error:
        # the stand-in could not even build the event (values PBS itself would never hand over)
        assert "Traceback" not in str(error) or "pbs.py" in str(error), error
        return
    assert done.get("verdict") in ("accept", "reject"), done
    assert not done.get("unhandled"), done
    no_traceback(done["stdout"], done["stderr"])
    no_canary()


# -- Slurm: the job's environment through the Prolog and Epilog entry functions ----------------

SLURM_RUNNER = """
import json, sys
sys.path.insert(0, {root!r})
from blahvm.batch import slurm
config, which, bin_dir, env_file = sys.argv[1:5]
with open(env_file) as stream:
    environ = json.load(stream)
if which == "prolog":
    code = slurm.prolog_main(config, slurm_bin=bin_dir, environ=environ)
else:
    code = slurm.epilog_main(config, environ=environ)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def slurm_site(pbs_home):
    directory = os.path.dirname(pbs_home)
    bin_dir = os.path.join(directory, "slurm-bin")
    os.mkdir(bin_dir)
    for tool in ("scontrol", "scancel"):  # what the prolog asks of Slurm: recorded, always fine
        path = os.path.join(bin_dir, tool)
        with open(path, "w") as stream:
            stream.write(f"#!/bin/sh\necho {tool} \"$@\" >> {bin_dir}/calls\n")
        os.chmod(path, 0o755)
    return os.path.join(directory, "site.yaml"), bin_dir


SLURM_KEYS = ["SLURM_JOB_ID", "SLURM_JOB_USER", "SLURM_JOB_UID", "SLURM_JOB_GID", "SLURM_JOB_PARTITION",
              "SLURM_JOB_ACCOUNT", "SLURM_JOB_CONSTRAINTS", "SLURM_JOB_NAME", "SLURM_JOB_CPUS_PER_NODE",
              "SLURM_JOB_TIME_LIMIT", "SLURM_TIME_LIMIT", "SLURM_MEM_PER_NODE", "SLURM_JOB_WORK_DIR", "BLAHVM_CONFIG"]


@st.composite
def slurm_environments(draw):
    environ = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": draw(st.one_of(st.integers(1, 10**12).map(str), hostile_text))}
    for key in draw(st.lists(st.sampled_from(SLURM_KEYS), max_size=8)):
        environ[key] = draw(st.one_of(hostile_text, st.sampled_from(["nobody", "65534", "grid", "1-00:00:00", "0"])))
    return {k: v.replace("\0", "") for k, v in environ.items()}


@FUZZ
@given(environ=slurm_environments(), which=st.sampled_from(["prolog", "epilog"]))
def test_slurm_environment_through_prolog_and_epilog(slurm_site, tmp_path_factory, environ, which):
    config, bin_dir = slurm_site
    env_file = tmp_path_factory.mktemp("slurm") / "env.json"
    env_file.write_text(json.dumps(environ))
    done = subprocess.run([sys.executable, "-c", SLURM_RUNNER.format(root=ROOT), config, which, bin_dir, str(env_file)],
                          capture_output=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode in (0, 1), (done.returncode, done.stderr)  # 1: drain (epilog only)
    no_traceback(done.stdout, done.stderr)
    no_canary()


# -- YAML config through `blahvm check` ---------------------------------------------------------

yaml_scalars = st.one_of(hostile_text, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(),
                         st.sampled_from(["1GiB", "-5", "10h", "<= 10h", "kvm", "xen-pv", "../../etc/passwd",
                                          "/etc/shadow", "!!python/object/apply:os.system ['touch " + CANARY + "']"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(hostile_text, st.sampled_from(
        ["uri", "pool", "max_guests", "memory", "image", "sha256", "flavour", "when", "queue", "environment", "name",
         "reject", "vo", "walltime", "user"])), inner, max_size=4)), max_leaves=12)
TOP_KEYS = ["hypervisor", "host", "environments", "queues", "routes", "vo_mapping", "defaults", "bogus"]


@st.composite
def yaml_documents(draw):
    if draw(st.integers(0, 4)) == 0:  # raw text: broken YAML, tags, anchors, tabs
        return draw(st.one_of(hostile_text, st.sampled_from([
            f"!!python/object/apply:os.system ['touch {CANARY}']\n", "a: &x [*x]\n", "routes: [\n", "\t- x\n",
            "a: b: c\n", "%YAML 9.9\n---\n", "? [a]\n: b\n", "queues: !!binary AAAA\n"])))
    import yaml

    document = draw(st.dictionaries(st.sampled_from(TOP_KEYS), yaml_values, max_size=6))
    return yaml.safe_dump(document, allow_unicode=True)


@FUZZ
@given(text=yaml_documents())
def test_yaml_config_through_blahvm_check(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "site.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    blahvm = os.path.join(os.path.dirname(sys.executable), "blahvm")
    done = subprocess.run([blahvm, "check", "--config", str(path)], capture_output=True, timeout=60, cwd="/tmp")
    assert done.returncode in (0, 2), (done.returncode, done.stderr)
    no_traceback(done.stdout, done.stderr)
    no_canary()


# -- agent frames over a UNIX socket ------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_socket():
    directory = tempfile.mkdtemp(prefix="blahvm-hostile-agent-")
    script = os.path.join(directory, "agent.py")
    shutil.copy(agent.__file__, script)
    sock = os.path.join(directory, "agent.0.sock")
    log = open(os.path.join(directory, "agent.log"), "w+")
    process = subprocess.Popen(["/usr/bin/python3", "-I", script, "--listen", sock], stderr=log, cwd="/")
    wait_ready(sock, timeout=30)
    yield sock, process, log
    process.kill()
    process.wait()
    log.close()
    shutil.rmtree(directory, ignore_errors=True)


def raw_frame(kind: int, payload: bytes) -> bytes:
    return agent.HEADER.pack(agent.MAGIC, kind, len(payload)) + payload


json_values = st.recursive(st.one_of(hostile_text, st.integers(), st.none(), st.booleans()),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(hostile_text, inner, max_size=3)), max_leaves=8)


@st.composite
def conversations(draw):
    """What a hostile client sends: raw bytes, frames of any kind and length, control messages of any shape."""
    chunks = []
    for _ in range(draw(st.integers(1, 5))):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            chunks.append(draw(st.binary(max_size=64)))
        elif choice == 1:
            chunks.append(raw_frame(draw(st.integers(0, 255)), draw(st.binary(max_size=64))))
        elif choice == 2:
            message = draw(st.dictionaries(st.sampled_from(["type", "argv", "env", "cwd", "uid", "gid", "nonce",
                                                             "protocol", "session", "signal"]), json_values, max_size=6))
            chunks.append(raw_frame(agent.CONTROL, json.dumps(message).encode()))
        elif choice == 3:
            argv = ["/bin/sh", "-c", "exit 0", draw(hostile_text)] if draw(st.booleans()) else [draw(hostile_text)]
            message = {"type": "exec", "argv": argv, "env": {draw(hostile_text): draw(hostile_text)},
                       "cwd": draw(st.one_of(st.just("/"), hostile_text)), "uid": draw(st.integers(-5, 70000)),
                       "gid": 65534}
            chunks.append(raw_frame(agent.CONTROL, json.dumps(message).encode()))
        else:  # a header announcing more than the agent accepts
            chunks.append(agent.HEADER.pack(agent.MAGIC, agent.CONTROL, draw(st.integers(2**20 + 1, 2**32 - 1))))
    return chunks


@FUZZ
@given(chunks=conversations())
def test_agent_frames(agent_socket, chunks):
    sock_path, process, log = agent_socket
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    try:
        client.connect(sock_path)
        for chunk in chunks:
            try:
                client.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        client.shutdown(socket.SHUT_WR)
        try:
            while client.recv(65536):
                pass
        except (socket.timeout, ConnectionResetError):
            pass
    finally:
        client.close()
    assert process.poll() is None, "the agent died"
    wait_ready(sock_path, timeout=30)  # and still serves the next host
    log.seek(0)
    no_traceback(log.read())
    no_canary()


# -- bad input ends with exit 2 and one short line, never an internal error (70) ---------------------

SMALL_SITE = """\
hypervisor: {{uri: "test:///default", pool: blahvm-hostile-small, pool_path: {d}/clones, timeout: {timeout}}}
host: {{max_guests: 2, state_dir: {d}/state, run_dir: {d}/run}}
defaults: {{walltime: 1h, cores: 1, memory: {memory}}}
environments:
  demo: {{image: {d}/golden.raw, flavour: kvm, memory: 256MiB, vcpus: 1}}
queues: {{short: {{}}}}
routes:
  - {{name: all, queue: short, environment: demo}}
"""


def small_site(directory, timeout="20s", memory="256MiB") -> str:
    path = os.path.join(str(directory), "site.yaml")
    with open(path, "w") as stream:
        stream.write(SMALL_SITE.format(d=directory, timeout=timeout, memory=memory))
    return path


def blahvm_cli(*argv: "str | bytes"):
    """The installed command, argv as bytes where a test needs bytes no str can spell (a lone surrogate)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAHVM_")}
    env["BLAHVM_CACHE_DIR"] = "/nonexistent/blahvm-cache"
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "blahvm"), *argv], capture_output=True,
                          env=env, timeout=60, cwd="/")
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def one_short_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300 and "internal error" not in text, text[:1000]
    return lines[0]


@pytest.mark.parametrize("option", ["--walltime", "--memory", "--cores"])
def test_a_5000_digit_quantity_on_the_command_line_is_bad_input(tmp_path, option):
    code, out, err = blahvm_cli("route", "--config", small_site(tmp_path), option, "9" * 5000)
    assert code == 2 and out == ""
    assert "more than 40 digits" in one_short_line(err)


@pytest.mark.parametrize("text, complaint", [
    ("memory: 1." + "0" * 200000 + "GiB", "more than 40 digits"),       # int() refuses past 4300 digits
    ("memory: 99999999999TiB", "too large"),                              # past SQLite's 64-bit integers
    ("walltime: 1:" + "9" * 5000, "more than 40 digits"),
    ("cores: 99999999999999999999", "too large"),
])
def test_an_absurd_quantity_in_the_config_is_a_config_problem(tmp_path, text, complaint):
    path = tmp_path / "site.yaml"
    path.write_text(f"defaults:\n  {text}\n")
    code, _, err = blahvm_cli("check", "--config", str(path))
    assert code == 2, err[:500]
    assert complaint in err.splitlines()[0] and len(err) < 600


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "routes: &r [*r]\n", "hypervisor: &h {x: *h}\n",
                                  "a: " + "[" * 60 + "]" * 60 + "\n"])
def test_a_self_referencing_or_bottomless_yaml_value_is_a_config_problem(tmp_path, text):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    code, _, err = blahvm_cli("check", "--config", str(path))
    assert code == 2 and "internal error" not in err, err
    assert "alias refers to a value that contains it" in err or "nested more than" in err


def test_a_hypervisor_timeout_past_a_day_is_refused_by_check_and_every_command(tmp_path):
    config = small_site(tmp_path, timeout="99999999999999999999999999s")
    for argv in (["check"], ["guests"], ["reap"], ["capacity"],
                 ["prepare", "--job-id", "1", "--user", "nobody", "--no-wait"], ["teardown", "--job-id", "1"]):
        code, _, err = blahvm_cli(*argv, "--config", config)
        assert code == 2, (argv, err)
        assert err.startswith(f"{config}:1: hypervisor.timeout: ") and "longer than 1d" in err, err
    assert blahvm_cli("check", "--config", small_site(tmp_path, timeout="2d"))[0] == 2
    assert blahvm_cli("check", "--config", small_site(tmp_path, timeout="1d"))[0] == 0


# -- user text reaches the terminal and the logs as one line without control characters ----------------

HOSTILE_JOB_ID = "a\nb\x1b[31mred\u2028x"
SHOWN_JOB_ID = "a\\nb\\x1b[31mred\\u2028x"


def no_control_characters(text: str) -> None:
    for line in text.splitlines():
        assert line.isprintable(), repr(line)


def test_a_job_id_with_newlines_and_escapes_stays_one_escaped_line_everywhere(tmp_path):
    with open(tmp_path / "golden.raw", "wb") as stream:
        stream.truncate(1024 * 1024)
    config = small_site(tmp_path)
    code, out, err = blahvm_cli("prepare", "--config", config, "--job-id", HOSTILE_JOB_ID, "--user", "nobody",
                                "--no-wait")
    assert code == 0 and out == "", err
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith(f"blahvm: job {SHOWN_JOB_ID}: ") for line in lines), err
    no_control_characters(err)
    # test:///default forgets the guest with the process: the entry is what reap closes
    code, out, err = blahvm_cli("guests", "--config", config)
    assert code == 0 and out.splitlines()[1].startswith(SHOWN_JOB_ID + "  ")
    no_control_characters(out + err)
    code, out, err = blahvm_cli("reap", "--config", config)
    assert code == 0 and out.splitlines()[0] == f"closed entry {SHOWN_JOB_ID}", out
    no_control_characters(out + err)
    code, out, err = blahvm_cli("teardown", "--config", config, "--job-id", HOSTILE_JOB_ID)
    assert code == 0 and one_short_line(err).startswith(f"blahvm: job {SHOWN_JOB_ID}: ")
    no_control_characters(err)


@pytest.mark.parametrize("argv", [["teardown", "--job-id", b"\xed\xb3\xbf"],
                                  ["prepare", "--job-id", b"7\xff", "--user", "nobody"],
                                  ["prepare", "--job-id", "7", "--user", "nobody", "--name", b"\xed\xb3\xbf"],
                                  ["run", "--user", b"\xed\xb3\xbf", "--", "true"]])
def test_argv_that_is_not_utf8_is_bad_input(tmp_path, argv):
    code, out, err = blahvm_cli(*argv, "--config", small_site(tmp_path))
    assert code == 2 and out == ""
    assert one_short_line(err).endswith("is not UTF-8 text"), err


def test_log_lines_escape_user_text():
    from blahvm.batch.log import format_event

    line = format_event("prologue", f"prepared {HOSTILE_JOB_ID}\x1b]0;owned\x07", job_id=HOSTILE_JOB_ID,
                        user="x\x1b[2J")
    assert line.isprintable() and "\x1b" not in line
    # the fields keep every character, escaped; the message has its whitespace folded to spaces
    assert line == "prologue: job='a\\nb\\x1b[31mred\\u2028x' user='x\\x1b[2J' prepared a b\\x1b[31mred x\\x1b]0;owned\\x07"


def test_route_explains_with_the_users_values_escaped(tmp_path):
    code, out, _ = blahvm_cli("route", "--config", small_site(tmp_path), "--explain", "--queue", HOSTILE_JOB_ID,
                              "--vo", HOSTILE_JOB_ID)
    assert code == 0 and SHOWN_JOB_ID in out
    no_control_characters(out)
    assert all(line.startswith(("  all: ", "route all: ")) for line in out.splitlines()), out
