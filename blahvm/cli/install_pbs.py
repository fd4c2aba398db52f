"""``blahvm install pbs --home PBS_HOME``: the prologue, epilogue and job starter in ``mom_priv``, the
OpenPBS hook and its config file beside them, and the qmgr commands and Torque mom config lines."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

HOOK_NAME = "blahvm"
HOOK_EVENTS = ("queuejob,execjob_begin,execjob_launch,execjob_epilogue,execjob_end,execjob_postsuspend,"
               "execjob_preresume,exechost_periodic")


def add_parser(systems) -> None:
    parser = systems.add_parser(
        "pbs", help="Torque and OpenPBS: prologue, epilogue, job starter, Python hook",
        description="Write PBS_HOME/mom_priv/{prologue,epilogue,blahvm_job_starter} (root-owned, not "
                    "group/other-writable) and PBS_HOME/blahvm/{blahvm_hook.py,blahvm_hook.json} with the "
                    "config path fixed, then print the qmgr commands and Torque mom config lines.",
    )
    parser.add_argument("--home", required=True, metavar="DIR", help="PBS_HOME (the directory with mom_priv)")
    parser.add_argument("--config", metavar="FILE",
                        help="site config fixed into the hooks (default: $BLAHVM_CONFIG, else /etc/blahvm/site.yaml)")
    parser.add_argument("--qstat", metavar="PATH",
                        help="qstat the 3-argument OpenPBS prologue asks for queue, account and resources "
                             "(default: $PBS_EXEC/bin/qstat from /etc/pbs.conf)")
    parser.add_argument("--budget", type=float, default=25.0, metavar="SECONDS",
                        help="seconds prepare may take, below $prologalarm and the hook's alarm (default 25)")
    parser.add_argument("--openpbs", action="store_true",
                        help="OpenPBS / PBS Pro: the hook does everything; no classic prologue or epilogue is "
                             "written (the mom would run them as well as the hook) and an existing blahvm one is "
                             "removed. Without it: Torque's prologue, epilogue and $job_starter")
    parser.add_argument("--python", metavar="PATH",
                        help="interpreter fixed into the scripts (default: this one); the job starter runs as "
                             "every job's user, so it must be executable by all")
    parser.set_defaults(run=run)


def _hook_source() -> str:
    import blahvm

    here = os.path.dirname(os.path.abspath(blahvm.__file__))  # blahvm/plugins: the checkout's, or the wheel's copy
    with open(os.path.join(here, "plugins", "pbs", "blahvm_hook.py")) as stream:
        return stream.read()


def run(args: argparse.Namespace) -> int:
    from blahvm.batch.install import hook_script, import_paths, install_file
    from blahvm.batch.pbs import default_qstat
    from blahvm.cli.common import fail
    from blahvm.locations import config_path

    if args.budget < 5:
        return fail("--budget: at least 5 seconds")
    mom_priv = os.path.join(os.path.abspath(args.home), "mom_priv")
    if not os.path.isdir(mom_priv):
        return fail(f"--home {args.home}: no mom_priv directory there (is it PBS_HOME?)")
    config = os.path.abspath(config_path(args.config))
    if not os.path.isfile(config):
        return fail(f"--config {config}: no such file")
    try:
        source = _hook_source()
    except OSError as error:
        return fail(f"cannot read the hook's source plugins/pbs/blahvm_hook.py: {error.strerror}")
    qstat = args.qstat or default_qstat()
    hook_dir = os.path.join(os.path.abspath(args.home), "blahvm")
    starter = os.path.join(mom_priv, "blahvm_job_starter")
    files = (
        (os.path.join(mom_priv, "prologue"), hook_script("pbs", "blahvm.batch.pbs", "prologue", config,
                                                          {"qstat": qstat, "budget": args.budget}), 0o700),
        (os.path.join(mom_priv, "epilogue"), hook_script("pbs", "blahvm.batch.pbs", "epilogue", config), 0o700),
        (starter, hook_script("pbs", "blahvm.batch.pbs", "job_starter", config), 0o755),
        (os.path.join(hook_dir, "blahvm_hook.py"), source, 0o644),
        (os.path.join(hook_dir, "blahvm_hook.json"),
         json.dumps({"path": import_paths(), "config": config, "job_starter": starter, "budget": args.budget},
                    indent=2) + "\n", 0o644),
    )
    classic = tuple(os.path.join(mom_priv, name) for name in ("prologue", "epilogue"))
    if args.openpbs:
        files = tuple(entry for entry in files if entry[0] not in classic)
    if args.python:
        shebang = f"#!{sys.executable} "
        files = tuple((path, text.replace(shebang, f"#!{os.path.abspath(args.python)} ", 1), mode)
                      for path, text, mode in files)
    try:
        os.makedirs(hook_dir, mode=0o755, exist_ok=True)
        for path, text, mode in files:
            install_file(path, text, mode)
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
        if args.openpbs:
            for path in classic:  # the mom runs them besides the hook: remove what blahvm put there
                try:
                    with open(path) as stream:
                        ours = "Installed by `blahvm install pbs`" in stream.read(4096)
                except OSError:
                    continue
                if ours:
                    os.unlink(path)
    except OSError as error:
        return fail(f"cannot write {error.filename or 'a hook'}: {error.strerror}")
    print(instructions(hook_dir, starter, args.budget, torque=not args.openpbs))
    return 0


def instructions(hook_dir: str, starter: str, budget: float, torque: bool = True) -> str:
    hook = shlex.quote(os.path.join(hook_dir, "blahvm_hook.py"))
    settings = shlex.quote(os.path.join(hook_dir, "blahvm_hook.json"))
    sched_priv = os.path.join(os.path.dirname(hook_dir), "sched_priv")
    sched_config = shlex.quote(os.path.join(sched_priv, "sched_config"))
    sched_lock = shlex.quote(os.path.join(sched_priv, "sched.lock"))
    alarm = int(budget) + 5
    text = f"""\
# OpenPBS / PBS Pro, as root on the server host (the server sends the hook to every mom):
qmgr -c "create resource blahvm_env type=string,flag=m"
qmgr -c "create resource blahvm_slots type=long,flag=nh"
qmgr -c "create resource blahvm_envs type=string,flag=h"
qmgr -c "create hook {HOOK_NAME}"
qmgr -c "set hook {HOOK_NAME} event = '{HOOK_EVENTS}'"
qmgr -c "set hook {HOOK_NAME} alarm = {alarm}"
qmgr -c "set hook {HOOK_NAME} freq = 60"
qmgr -c "import hook {HOOK_NAME} application/x-python default {hook}"
qmgr -c "import hook {HOOK_NAME} application/x-config default {settings}"
# A suspended job's guest is paused, not gone: it keeps its slot and memory; only its cores are free:
qmgr -c "set server restrict_res_to_release_on_suspend = ncpus"
# The scheduler must count blahvm_slots (queuejob adds blahvm_slots=1 to every job's select):
sed -i '/^resources: /{{/blahvm_slots/!s/"$/, blahvm_slots"/}}' {sched_config}
kill -HUP "$(head -n 1 {sched_lock})"
# The hook does all the work; the mom would run mom_priv/prologue and epilogue as well: have none."""
    if torque:
        text += f"""
#
# Torque, in PBS_HOME/mom_priv/config on every execution host (then restart pbs_mom):
$job_starter {starter}
$prologalarm {alarm}"""
    return text
