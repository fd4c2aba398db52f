"""``pip install .`` gives everything the checkout gives: the wheel carries the hooks' sources
(``plugins/``, as ``blahvm/plugins``), and every ``blahvm install`` runs from a fresh venv that holds
only the wheel and blahvm's dependencies (copied from this venv: no network but pip's own build of
the wheel, which fetches setuptools as ``scripts/setup`` does)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests import lsf_harness as lsf
from tests.test_lsf import SITE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"
DEPENDENCIES = ("attrs", "PyYAML", "libvirt-python", "pycdlib")
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache"}


def _run(argv, **options):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, **options)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
    return done


@pytest.fixture(scope="module")
def installed():
    """(venv, scratch dir): a venv on the system interpreter with the wheel built from this tree."""
    scratch = tempfile.mkdtemp(prefix="blahvm-wheel-", dir="/var/tmp")
    os.chmod(scratch, 0o755)  # the hooks' users (nobody, SlurmUser) run the venv's interpreter
    try:
        source = os.path.join(scratch, "src")  # a copy: the build writes build/ and egg-info beside it
        shutil.copytree(ROOT, source, symlinks=True,
                        ignore=lambda _, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
              "-w", os.path.join(scratch, "dist"), source])
        (wheel,) = os.listdir(os.path.join(scratch, "dist"))
        venv = os.path.join(scratch, "venv")
        _run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv])
        python = os.path.join(venv, "bin", "python")
        _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check",
              "--no-deps", "--no-index", os.path.join(scratch, "dist", wheel)])
        site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        for name in DEPENDENCIES:  # this venv's installed copies, file by file from their RECORD
            distribution = importlib.metadata.distribution(name)
            for path in distribution.files or ():
                if str(path).startswith(".."):
                    continue  # scripts outside site-packages
                origin = distribution.locate_file(path)
                target = os.path.join(site_packages, str(path))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(origin, target)
        yield venv, scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_the_wheel_carries_the_plugins_and_imports_from_itself(installed):
    venv, _ = installed
    python = os.path.join(venv, "bin", "python")
    where = _run([python, "-c", "import blahvm, os; print(os.path.dirname(blahvm.__file__))"], cwd="/").stdout.strip()
    assert where.startswith(venv + "/"), where  # the wheel's blahvm, never the checkout's
    for directory, _, files in os.walk(os.path.join(ROOT, "plugins")):
        for name in files:
            if "__pycache__" in directory or name.endswith(".pyc"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), ROOT)
            with open(os.path.join(ROOT, relative), "rb") as ours, open(os.path.join(where, relative), "rb") as theirs:
                assert ours.read() == theirs.read(), relative


def test_every_install_runs_from_the_installed_wheel(installed):
    venv, scratch = installed
    blahvm = os.path.join(venv, "bin", "blahvm")
    python = os.path.join(venv, "bin", "python")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for system in ("lsf", "pbs", "slurm"):
        assert "usage: blahvm install " + system in _run([blahvm, "install", system, "--help"], env=env, cwd="/").stdout
    site = os.path.join(scratch, "site")
    os.mkdir(site, 0o755)
    config, serverdir = lsf.write_site(site, SITE.format(d=site))
    _run([blahvm, "install", "lsf", "--serverdir", serverdir, "--config", config, "--cache-dir",
          os.path.join(site, "cache"), "--bjobs", "/bin/true", "--python", python, "--elim-name", "elim"],
         env=env, cwd="/")
    assert sorted(os.listdir(serverdir)) == ["blahvm-job-starter", "blahvm-post-exec", "blahvm-pre-exec", "elim",
                                             "esub.blahvm"]
    home = os.path.join(scratch, "pbs_home")
    os.makedirs(os.path.join(home, "mom_priv"))
    _run([blahvm, "install", "pbs", "--home", home, "--config", config, "--qstat", "/bin/true", "--python", python],
         env=env, cwd="/")
    with open(os.path.join(ROOT, "plugins", "pbs", "blahvm_hook.py")) as ours, \
            open(os.path.join(home, "blahvm", "blahvm_hook.py")) as theirs:
        assert ours.read() == theirs.read()
    slurm = os.path.join(scratch, "slurm")
    _run([blahvm, "install", "slurm", "--dir", slurm, "--config", config, "--python", python,
          "--slurm-conf", os.path.join(scratch, "no-slurm.conf")], env=env, cwd="/")
    assert {"job_submit.lua", "blahvm_spank.so", "plugstack.conf", "prolog", "route"} <= set(os.listdir(slurm))
