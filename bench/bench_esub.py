"""The LSF esub's whole-process time from a cold start, as a ratio to ``python -c pass``.

Installs the hooks into a scratch LSF_SERVERDIR (compiled route table cached, as ``blahvm install
lsf`` leaves it), then times N runs of the installed ``esub.blahvm`` (``python -IS``) on a real
parameter file against N runs of the same interpreter doing ``-c pass``. Target: <= 2.5x.

    .venv/bin/python bench/bench_esub.py [--runs 100] [--python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.lsf_harness import standin_bjobs, write_site  # noqa: E402
from tests.test_lsf import REAL_SUBMIT, SITE  # noqa: E402  (the test site and a real parameter file)


def timed(argv, env, runs):
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        samples.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{argv[0]} exited {result.returncode}: {result.stderr.decode()}")
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--python", default=sys.executable, help="the interpreter the hooks are installed with")
    args = parser.parse_args()
    bare, isolated, hook = measure(args.runs, args.python)
    print(f"interpreter                 {args.python}")
    print(f"python -c pass              {bare * 1000:6.1f} ms")
    print(f"python -IS -c pass          {isolated * 1000:6.1f} ms")
    print(f"esub.blahvm (routed, cached) {hook * 1000:6.1f} ms  = {hook / bare:.2f}x python -c pass (target <= 2.5x)")
    return 0 if hook / bare <= 2.5 else 1


def measure(runs: int = 100, python: str = sys.executable):
    """Median seconds of (python -c pass, python -IS -c pass, the installed esub), measured alternately."""
    directory = tempfile.mkdtemp(prefix="blahvm-bench-esub-", dir="/var/tmp")
    os.chmod(directory, 0o755)  # the install checks, as an unprivileged user, that the hooks can run
    try:
        config, serverdir = write_site(directory, SITE.format(d=directory))
        subprocess.run([sys.executable, "-m", "blahvm.cli.main", "install", "lsf", "--serverdir", serverdir,
                        "--config", config, "--cache-dir", os.path.join(directory, "cache"), "--python", python,
                        "--bjobs", standin_bjobs(serverdir)],  # PRE_EXEC's; the esub never runs it
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parm = os.path.join(directory, "parm")
        with open(parm, "w") as stream:
            stream.write(REAL_SUBMIT.replace("projA", "cms") + 'LSB_SUB_QUEUE="grid"\n')
        env = {"PATH": "/usr/bin:/bin", "LSB_SUB_PARM_FILE": parm, "LSB_SUB_ABORT_VALUE": "97",
               "LSB_SUB_MODIFY_FILE": os.path.join(directory, "m"),
               "LSB_SUB_MODIFY_ENVFILE": os.path.join(directory, "e")}
        esub = [os.path.join(serverdir, "esub.blahvm")]
        timed(esub, env, 3)  # warm the page cache
        bare = timed([python, "-c", "pass"], env, runs)
        isolated = timed([python, "-IS", "-c", "pass"], env, runs)
        hook = timed(esub, env, runs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return bare, isolated, hook


if __name__ == "__main__":
    sys.exit(main())
