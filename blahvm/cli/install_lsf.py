"""``blahvm install lsf --serverdir DIR``: the esub, the elim and the execution-host hooks for LSF."""

from __future__ import annotations

import argparse
import os
import sys

ESUB = "esub.blahvm"  # made mandatory with LSB_ESUB_METHOD=blahvm; also run by bsub -a "blahvm(ENV)"
ELIM_NAMES = ("elim.blahvm", "elim")  # IBM LSF runs every elim.NAME; openlava-family LSF only 'elim'
PRE_EXEC, JOB_STARTER, POST_EXEC = "blahvm-pre-exec", "blahvm-job-starter", "blahvm-post-exec"


def add_parser(systems) -> None:
    parser = systems.add_parser(
        "lsf", help="esub, elim, PRE_EXEC, JOB_STARTER and POST_EXEC for LSF (docs/lsf.md)",
        description="Write blahvm's LSF hooks into LSF_SERVERDIR with the config path fixed into them: "
                    f"{ESUB}, the elim, {PRE_EXEC}, {JOB_STARTER} and {POST_EXEC}. Then add the "
                    "lsf.conf, lsf.shared, lsf.cluster, lsb.queues and lsf.sudoers lines of docs/lsf.md.",
    )
    parser.add_argument("--serverdir", required=True, metavar="DIR", help="LSF_SERVERDIR")
    parser.add_argument("--config", metavar="FILE", help="site config the hooks use "
                        "(default: $BLAHVM_CONFIG, else /etc/blahvm/site.yaml)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where the compiled route table is kept for the esub "
                        "(default /var/cache/blahvm)")
    parser.add_argument("--on-broken-config", choices=("reject", "accept"), default="reject",
                        help="what the esub does when blahvm cannot route at all (a broken config): reject "
                             "the job with the reason (default) or let it through unrouted with a warning")
    parser.add_argument("--elim-name", choices=ELIM_NAMES, default="elim.blahvm",
                        help="'elim' for openlava/volclava, which run only a file of that exact name "
                             "(default elim.blahvm, for IBM LSF)")
    parser.add_argument("--elim-interval", type=float, default=15.0, metavar="SECONDS",
                        help="how often the elim samples (default 15, LIM's own period)")
    parser.add_argument("--bjobs", metavar="PATH",
                        help="the bjobs PRE_EXEC asks for a job's project (-P): LSF sets no variable a job "
                             "could not forge (default: LSF_BINDIR/bjobs from lsf.conf)")
    parser.add_argument("--lsf-envdir", metavar="DIR",
                        help="LSF_ENVDIR (the directory of lsf.conf) fixed into PRE_EXEC for bjobs "
                             "(default: $LSF_ENVDIR, else SERVERDIR/../etc if lsf.conf is there, else /etc)")
    parser.add_argument("--python", metavar="PATH", default=sys.executable,
                        help="the interpreter the hooks run on; every LSF user must be able to execute it "
                             f"(default {sys.executable})")
    parser.add_argument("--check-user", metavar="USER", default="nobody",
                        help="an unprivileged user the install runs the hooks' interpreter as, to check that "
                             "every user can run it, import blahvm and read the config (default nobody)")
    parser.set_defaults(run=run)


def lsf_conf_value(envdir: str, key: str):
    """``KEY`` from ``envdir``/lsf.conf (the last assignment, quotes stripped), or None."""
    value = None
    try:
        with open(os.path.join(envdir, "lsf.conf")) as stream:
            for line in stream:
                name, equals, rest = line.strip().partition("=")
                if equals and name.strip() == key:
                    value = rest.strip().strip('"') or None
    except OSError:
        return None
    return value


def find_envdir(serverdir: str, given) -> str:
    if given:
        return os.path.abspath(given)
    if os.environ.get("LSF_ENVDIR"):
        return os.environ["LSF_ENVDIR"]
    beside = os.path.join(os.path.dirname(os.path.abspath(serverdir)), "etc")
    return beside if os.path.isfile(os.path.join(beside, "lsf.conf")) else "/etc"


def find_bjobs(envdir: str, given):
    import shutil

    if given:
        return os.path.abspath(given)
    bindir = lsf_conf_value(envdir, "LSF_BINDIR")
    if bindir and os.path.isfile(os.path.join(bindir, "bjobs")):
        return os.path.join(bindir, "bjobs")
    return shutil.which("bjobs")


def run(args: argparse.Namespace) -> int:
    from blahvm.batch.install import hook_script, install_file
    from blahvm.cli.common import fail, report_config_error, resolved_config_path
    from blahvm.config import load_config
    from blahvm.errors import ConfigError
    from blahvm.locations import DEFAULT_CACHE_DIR
    from blahvm.routing.fast import load_table

    config = os.path.abspath(resolved_config_path(args))
    cache_dir = os.path.abspath(args.cache_dir) if args.cache_dir else DEFAULT_CACHE_DIR
    if not os.path.isdir(args.serverdir):
        return fail(f"install lsf: --serverdir {args.serverdir!r} is not a directory")
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        return fail(f"install lsf: --python {args.python!r} is not an executable file")
    envdir = find_envdir(args.serverdir, args.lsf_envdir)
    bjobs = find_bjobs(envdir, args.bjobs)
    if not bjobs or not (os.path.isfile(bjobs) and os.access(bjobs, os.X_OK)):
        return fail(f"install lsf: cannot find an executable bjobs ({bjobs or 'not in lsf.conf LSF_BINDIR nor PATH'}): "
                    "give --bjobs PATH")
    if args.elim_interval <= 0:
        return fail("install lsf: --elim-interval must be positive")
    try:
        load_config(config)
        load_table(config, cache_dir)  # compiled now, as root: every esub then starts from the cache
    except ConfigError as error:
        return report_config_error(error)

    problem = user_problem(args.python, config, cache_dir, args.check_user)
    if problem:  # checked before anything is written: a broken esub lets every job through unrouted
        return fail(problem)

    def script(module: str, function: str, extra=None) -> str:
        return hook_script("lsf", module, function, config, extra, python=args.python)

    hooks = {
        ESUB: script("blahvm.batch.lsf.esub", "main", {"cache_dir": cache_dir, "on_broken": args.on_broken_config}),
        args.elim_name: script("blahvm.batch.lsf.elim", "elim", {"interval": args.elim_interval}),
        PRE_EXEC: script("blahvm.batch.lsf.execution", "pre_exec", {"bjobs": bjobs, "lsf_envdir": envdir}),
        JOB_STARTER: script("blahvm.batch.lsf.execution", "job_starter"),
        POST_EXEC: script("blahvm.batch.lsf.execution", "post_exec"),
    }
    try:
        for name, text in hooks.items():
            install_file(os.path.join(args.serverdir, name), text, 0o755)
    except OSError as error:
        return fail(f"install lsf: cannot write into {args.serverdir}: {error.strerror or error}")
    for name in hooks:
        print(os.path.join(args.serverdir, name))
    print(f"blahvm: LSF hooks installed with config {config}; see docs/lsf.md for the LSF side", file=sys.stderr)
    return 0


# What the esub and the job starter need, run as a user who is neither root nor LSF's admin: an esub
# that cannot run (exit 126) makes LSF accept the job unrouted, a starter that cannot run fails every job.
CHECK = """\
import sys
sys.path[:0] = {paths!r}
from blahvm.routing.fast import load_table
load_table({config!r}, {cache_dir!r})
import blahvm.batch.lsf.esub, blahvm.batch.lsf.execution, blahvm.lifecycle
from blahvm.config import load_config
load_config({config!r})
print("ok")
"""


def user_problem(python: str, config: str, cache_dir: str, user: str):
    """Why ``user`` cannot run the hooks (their interpreter, blahvm's modules, the config), or None."""
    import shutil
    import subprocess

    from blahvm.batch.install import import_paths

    if os.geteuid() != 0:
        return None  # only root can become another user; whoever installs as themselves runs as themselves
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
    code = CHECK.format(paths=import_paths(), config=config, cache_dir=cache_dir)
    try:
        done = subprocess.run([runuser, "-u", user, "--", python, "-IS", "-c", code], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, cwd="/",
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"install lsf: cannot run {python} as {user}: {error}"
    if done.returncode == 0 and done.stdout.strip() == "ok":
        return None
    said = " ".join((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].split())[:300]
    return (f"install lsf: user {user} cannot run the hooks ({python}: {said}): the interpreter (--python), blahvm "
            "and the site config must be readable by every user, or LSF accepts jobs unrouted when the esub "
            "cannot run")
