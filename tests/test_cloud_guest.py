"""A stock cloud image contextualised per job, for real: the cloud image (cloud-init, no blahvm inside)
boots on qemu:///system with the job's NoCloud seed, cloud-init installs and starts the agent, and the
job runs through it as its own user, on its own hostname, with the site's write_files in place.
Teardown leaves nothing: no guest, no overlay, no seed, no run dir, no live ledger entry. The first
job boots and its prepare makes the environment's template in the background (``start: auto``, the
default); the next job is restored from it and is contextualised as its own all the same.

The site config is the entry ``blahvm image build-demo --cloud-init`` prints plus a site addition,
read by the config parser as a site's would be. Real boots in this file: 2, the job's and the
template's, and one restore (their times are printed; nothing here asserts on time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid

import pytest
import yaml

from blahvm.config import parse_config
from blahvm.hypervisor import naming
from blahvm.hypervisor.connection import open_connection
from blahvm.lifecycle import launch, prepare, reap, teardown, templates
from blahvm.model import Decision, Job, Outcome
from tests.test_lifecycle import domain_names, guest_of, live_entries, run_dirs, volume_names

pytest.importorskip("libvirt")
pytestmark = pytest.mark.guest

REAL_URI = "qemu:///system"
READY_TIMEOUT = 900.0  # seconds: systemd and cloud-init under TCG on two cores other tests share
JOB_USER, JOB_UID, JOB_GID = "cloudjob", 4242, 4343
SITE_FILE, SITE_TEXT = "/etc/blahvm-site-test", "hello from the site\n"


@contextlib.contextmanager
def cloud_site(cloud_image):
    """A site on qemu:///system with its own pool, state and run dirs whose one environment is the
    cloud image's printed entry plus the site's write_files; everything removed afterwards."""
    from blahvm.services import ensure_libvirt

    ensure_libvirt(REAL_URI, timeout=90)
    os.makedirs("/var/lib/blahvm", exist_ok=True)
    where = tempfile.mkdtemp(prefix="cloud-", dir="/var/lib/blahvm")
    os.chmod(where, 0o755)  # QEMU's user reaches the clones below it
    pool = f"blahvm-test-{uuid.uuid4().hex[:8]}"
    entry = yaml.safe_load(cloud_image.environment_yaml("cloud"))
    entry["cloud"]["user_data"] = {
        "write_files": [{"path": SITE_FILE, "content": SITE_TEXT, "permissions": "0644"}],
    }
    site = {
        "hypervisor": {"uri": REAL_URI, "pool": pool, "pool_path": os.path.join(where, "clones"),
                       "domain_type": "qemu", "timeout": "60s"},
        "host": {"max_guests": 2, "state_dir": os.path.join(where, "state"), "run_dir": os.path.join(where, "run")},
        "environments": entry,
    }
    config = parse_config(yaml.safe_dump(site), "site.yaml")
    try:
        yield config
    finally:
        with contextlib.suppress(Exception):
            reap(config)
        with open_connection(REAL_URI, timeout=30) as conn:
            with contextlib.suppress(Exception):
                raw = conn.raw.storagePoolLookupByName(pool)
                for volume in raw.listAllVolumes(0):
                    volume.delete(0)
                raw.destroy()
                raw.undefine()
        shutil.rmtree(where, ignore_errors=True)


def run_captured(config, job, argv):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code = launch(config, job, argv, stdout=out.fileno(), stderr=err.fileno(), ready_timeout=120)
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(), err.read().decode()


def test_a_stock_cloud_image_runs_the_job_through_the_agent_its_seed_installed(cloud_image, capsys):
    with cloud_site(cloud_image) as config:
        environment = config.environments["cloud"]
        decision = Decision(queue="short", environment="cloud", rule="r", vo="cms",
                            memory=environment.memory, vcpus=environment.vcpus)
        for how in ("booted", "restored from saved state"):  # the second from the template the first made
            job = Job(job_id=f"cloud-{uuid.uuid4().hex[:6]}", user=JOB_USER, decision=decision,
                      uid=JOB_UID, gid=JOB_GID)
            guest = guest_of(config, job.job_id)
            started = time.monotonic()
            try:
                result = prepare(config, job, ready_timeout=READY_TIMEOUT)
                took = time.monotonic() - started
                assert result.outcome is Outcome.OK, result.message
                assert how in result.message, result.message
                with capsys.disabled():  # shown with or without -s: how long a cloud-init guest takes here
                    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings)
                    print(f"\ncloud-init guest under TCG, {how}: prepare to the agent's answer {took:.1f}s ({phases})")
                # systemd is the guest's init, and the agent running this is the one the seed brought
                script = (f"id -un; id -u; id -g; hostname; cat {SITE_FILE}; cat /proc/1/comm; ls /usr/lib/blahvm; "
                          "exit 3")
                code, out, err = run_captured(config, job, ["/bin/sh", "-c", script])
                assert code == 3, err
                assert out.splitlines() == [JOB_USER, str(JOB_UID), str(JOB_GID), naming.guest_hostname(guest),
                                            SITE_TEXT.strip(), "systemd", "agent.py"], err
                started = time.monotonic()
                with open_connection(REAL_URI, timeout=30) as conn:  # once the template maker is done
                    assert volume_names(config, conn) == {guest + ".qcow2", naming.seed_volume_name(guest)}
                with capsys.disabled():
                    print(f"waited {time.monotonic() - started:.1f}s for the template maker; "
                          f"templates: {[(t['key'], t['state_size']) for t in templates.listing(config)]}")
            finally:
                done = teardown(config, job.job_id)
            assert done.outcome is Outcome.OK and done.guest_removed, done.message
            with open_connection(REAL_URI, timeout=30) as conn:
                assert guest not in domain_names(conn)
                assert volume_names(config, conn) == set()  # the overlay and the seed
            assert run_dirs(config) == set() and live_entries(config) == ()
