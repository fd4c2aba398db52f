"""Trust boundaries: user strings never become XML structure or paths, agent sockets are reachable only by
the job's own user, and one job's user cannot reach another job's guest. Real boots here: 2."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.config import ConfigError, parse_config
from blahvm.hypervisor.domain import DiskSpec, GuestMetadata, GuestSpec, build_domain_xml, guest_uuid
from blahvm.hypervisor.errors import SpecError
from blahvm.hypervisor import naming
from blahvm.hypervisor.metadata import read_metadata
from blahvm.quantities import Size
from tests.test_lifecycle import guest_of

pytest.importorskip("libvirt")

NASTY = [
    "</name><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><name>",
    "]]><devices/><![CDATA[",
    "<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/shadow'>]>&e;",
    "&lt;&amp;&quot;\"'<>&",
    "job\x00name", "\udcff\udcfe", "a\nb\rc\td",
]
xml_strings = st.one_of(st.sampled_from(NASTY), st.text(max_size=60))


def spec_with(job_id: str, user: str, name: str, vo: str) -> GuestSpec:
    guest = naming.guest_name(job_id)
    metadata = GuestMetadata(job_id=job_id, user=user, environment="demo", host="h", created=1, vo=vo, name=name)
    return GuestSpec(name=guest, uuid=guest_uuid(guest), flavour="kvm", memory=Size(256 * 1024**2), vcpus=1,
                     disks=(DiskSpec("/var/lib/blahvm/clones/x.qcow2", "qcow2"),), metadata=metadata,
                     agent_sockets=("/run/blahvm/x/agent.0.sock",))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(job_id=xml_strings.filter(bool), user=xml_strings, name=xml_strings, vo=xml_strings)
def test_job_names_and_user_strings_stay_text_in_the_domain_xml(job_id, user, name, vo):
    try:
        spec = spec_with(job_id, user, name, vo)
        xml = build_domain_xml(spec)
    except SpecError as error:  # refused with one line is fine (e.g. characters XML cannot carry)
        assert "\n" not in str(error)
        return
    root = ET.fromstring(xml)  # parses: no string broke out of its element
    assert root.tag == "domain"
    assert [child.tag for child in root].count("devices") == 1
    disks = root.findall("./devices/disk/source")
    assert [d.get("file") for d in disks] == ["/var/lib/blahvm/clones/x.qcow2"]
    assert "ENTITY" not in xml or "<!DOCTYPE" not in xml.split("?>", 1)[-1].split("<domain", 1)[0]
    # every string comes back exactly as given, from text (base64 where XML cannot carry it)
    assert read_metadata(xml) == spec.metadata
    # the domain's own name is blahvm's, never the user's
    assert root.findtext("name") == spec.name and naming.PREFIX in spec.name


BASE = """\
hypervisor: {{uri: "test:///default", pool: p, pool_path: /var/lib/blahvm/clones}}
host: {{max_guests: 1, state_dir: /var/lib/blahvm/state, run_dir: /run/blahvm}}
environments:
  {env}: {{image: {image}, flavour: kvm, memory: 256MiB, vcpus: 1}}
queues: {{grid: {{}}}}
routes:
  - {{name: r, when: {{queue: grid}}, queue: grid, environment: {env_ref}}}
"""


@pytest.mark.parametrize("env", ["../../etc", "a/b", "..", "x/../../y", "/abs", "e\\x"])
def test_environment_names_that_are_paths_are_refused_by_the_config(env):
    text = BASE.format(env=f'"{env}"', env_ref=f'"{env}"', image="/var/lib/blahvm/images/ok.qcow2")
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    assert "Traceback" not in str(refused.value)


@pytest.mark.parametrize("image", ["relative/img.qcow2", "../img.qcow2", "/var/lib/blahvm/../../etc/shadow",
                                   "/images/./../etc/shadow"])
def test_image_paths_with_traversal_are_refused_by_the_config(image):
    with pytest.raises(ConfigError):
        parse_config(BASE.format(env="e", env_ref="e", image=f'"{image}"'))


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "/etc/passwd", "..", "a/../../b", "x\x00y"])
def test_job_ids_never_become_paths(job_id, tmp_path):
    from blahvm.lifecycle._common import job_names
    from blahvm.model import HostConfig, HypervisorConfig, SiteConfig

    config = SiteConfig(hypervisor=HypervisorConfig(uri="test:///default", pool="p", pool_path=str(tmp_path / "c")),
                        host=HostConfig(max_guests=1, state_dir=str(tmp_path / "s"), run_dir=str(tmp_path / "run")),
                        environments={})
    try:
        names = job_names(config, job_id)
    except SpecError:
        return
    run_root = str(tmp_path / "run")
    assert os.path.dirname(os.path.realpath(names.run_dir)) == os.path.realpath(run_root), names.run_dir
    assert "/" not in names.guest and names.guest not in (".", "..")  # one plain path component
    assert "/" not in names.disk


# -- real guests: sockets belong to their job's user only ---------------------------------------


def connect_as(uid: int, gid: int, path: str) -> str:
    """Try to connect to ``path`` from a forked child running as ``uid``; what happened, as a word."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            try:
                sock.connect(path)
                word = b"connected"
            except PermissionError:
                word = b"refused"
            except OSError as error:
                word = f"error {error.errno}".encode()
            os.write(write, word)
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return answer


def naming_control_socket(config, job) -> str:
    from blahvm.lifecycle._common import job_names

    return job_names(config, job.job_id).control_socket


@pytest.fixture
def throwaway_user():
    name = f"bvm{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.mark.guest
def test_each_jobs_agent_socket_is_its_users_alone(demo_image, throwaway_user):
    from tests.test_lifecycle_reliability import build_config, build_job, real_params
    from blahvm.lifecycle import launch, prepare, teardown
    from blahvm.model import Outcome

    with real_params(demo_image, max_guests=2) as (params, made):
        config = build_config(params)
        mine = build_job(f"sec-{uuid.uuid4().hex[:6]}", params)  # nobody's job
        other = build_job(f"sec-{uuid.uuid4().hex[:6]}", params)
        other = type(other)(job_id=other.job_id, user=throwaway_user.pw_name, decision=other.decision,
                            uid=throwaway_user.pw_uid, gid=throwaway_user.pw_gid, name="other")
        made.update(guest_of(config, job.job_id) for job in (mine, other))
        try:
            results = {job.job_id: prepare(config, job, ready_timeout=180) for job in (mine, other)}
            for job in (mine, other):
                result = results[job.job_id]
                assert result.outcome is Outcome.OK, result.message
                info = os.stat(result.socket)
                assert (info.st_uid, info.st_mode & 0o777) == (job.uid, 0o600), (job.job_id, oct(info.st_mode))
            nobody = pwd.getpwnam("nobody")
            # each user reaches their own guest ...
            assert connect_as(nobody.pw_uid, nobody.pw_gid, results[mine.job_id].socket) == "connected"
            assert connect_as(throwaway_user.pw_uid, throwaway_user.pw_gid,
                              results[other.job_id].socket) == "connected"
            # ... and never the other's, nor a third user's
            assert connect_as(nobody.pw_uid, nobody.pw_gid, results[other.job_id].socket) == "refused"
            assert connect_as(throwaway_user.pw_uid, throwaway_user.pw_gid, results[mine.job_id].socket) == "refused"
            daemon = pwd.getpwnam("daemon")
            for job in (mine, other):
                assert connect_as(daemon.pw_uid, daemon.pw_gid, results[job.job_id].socket) == "refused"
            # the job's own launch works and runs as its user, in its own guest
            read, write = os.pipe()
            code = launch(config, other, ["/bin/sh", "-c", "id -u"], cwd="/", stdout=write)
            os.close(write)
            assert (code, os.read(read, 100).strip()) == (0, str(throwaway_user.pw_uid).encode())
            os.close(read)
            # whoever holds a job's socket cannot choose who the payload runs as: root's bind decides
            from blahvm.guest.client import AgentError, run_payload

            for ids in ({"uid": 0}, {"uid": 0, "gid": 0}, {"uid": throwaway_user.pw_uid}):
                with pytest.raises(AgentError, match="refusing"):
                    run_payload(results[mine.job_id].socket, ["id"], cwd="/", ready_timeout=60, **ids)
            read, write = os.pipe()  # a request that names nobody runs as the job's user, not as root
            assert run_payload(results[mine.job_id].socket, ["id", "-u"], cwd="/", stdout=write) == 0
            os.close(write)
            assert os.read(read, 100) == b"65534\n"
            os.close(read)
            # the control port that binds it is root's alone
            control_socket = naming_control_socket(config, mine)
            assert os.stat(control_socket).st_mode & 0o077 == 0
            for user in (nobody, throwaway_user, daemon):
                assert connect_as(user.pw_uid, user.pw_gid, control_socket) == "refused"
        finally:
            for job in (mine, other):
                teardown(config, job.job_id)


def test_every_test_docs_security_names_exists():
    """docs/security.md proves each boundary by naming tests: each must be a test of the suite."""
    import re
    from pathlib import Path

    top = Path(__file__).resolve().parent.parent
    named = set(re.findall(r"\btest_[a-z0-9_]+\b", (top / "docs" / "security.md").read_text()))
    files = {path.stem for path in (top / "tests").glob("test_*.py")}
    defined = set()
    for path in (top / "tests").glob("test_*.py"):
        defined.update(re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert named - files - defined == set()
    assert len(named - files) >= 20
