"""``blahvm image warm`` makes templates ahead; ``blahvm guests`` reports what each one costs."""

from __future__ import annotations

import json
import os
import re

import pytest

from blahvm.cli.outcomes import EXIT_BAD_INPUT
from tests.test_cli_host import blahvm, golden_env, site, write_config  # noqa: F401  (fixtures)


def test_warm_says_why_an_environment_gets_no_template_and_refuses_an_unknown_one(site, tmp_path,  # noqa: F811
                                                                                   golden_env):  # noqa: F811
    done = blahvm("image", "warm", "--config", site)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "demo: no template: libvirt's test driver saves no guest states\n"  # start: auto
    booting = write_config(str(tmp_path / "boot"), {**golden_env, "start": "boot"})
    done = blahvm("image", "warm", "--config", booting)
    assert (done.returncode, done.stdout) == (0, "demo: no template: the environment says start: boot\n"), done.stderr
    unknown = blahvm("image", "warm", "--config", site, "--environment", "nope")
    assert unknown.returncode == EXIT_BAD_INPUT and "'nope' is not in this host's config" in unknown.stderr


def test_guests_reports_each_templates_size(site, tmp_path):  # noqa: F811
    directory = tmp_path / "state" / "templates" / "t-0123456789abcdef"
    directory.mkdir(parents=True)
    record = {"key": "0123456789abcdef", "environment": "demo", "memory": 256 * 1024**2, "vcpus": 1,
              "state_size": 105 * 1024**2, "disk_size": 512 * 1024, "made": 0}
    (directory / "template.json").write_text(json.dumps(record))
    listed = blahvm("guests", "--config", site)
    assert "template t-0123456789abcdef of demo (256MiB, 1 vcpus): state 105.0MiB, disk 0.5MiB" in listed.stdout
    as_json = json.loads(blahvm("guests", "--config", site, "--json").stdout)
    assert as_json["templates"] == [{**record}]


@pytest.mark.guest
def test_warm_makes_a_real_template_once_and_prints_its_key_and_size(demo_image, tmp_path):
    from blahvm.config.dump import dump_config
    from tests.test_templates import _root_site

    site_cm, config = _root_site(demo_image)
    try:
        path = os.path.join(os.path.dirname(config.host.state_dir), "site.yaml")
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(dump_config(config))
        first = blahvm("image", "warm", "--config", path, "--environment", "demo", timeout=300)
        assert first.returncode == 0, first.stderr
        made = re.fullmatch(r"demo: t-([0-9a-f]{16}) state ([0-9.]+)MiB disk ([0-9.]+)MiB \(made in [0-9.]+s\)\n",
                            first.stdout)
        assert made and float(made.group(2)) > 50, first.stdout  # a 256 MiB guest's memory, saved
        second = blahvm("image", "warm", "--config", path, timeout=300)
        assert second.returncode == 0 and second.stdout.startswith(f"demo: t-{made.group(1)} ") \
            and second.stdout.endswith("(present)\n"), second.stdout
    finally:
        site_cm.__exit__(None, None, None)
