"""``blahvm install slurm --dir DIR [--config FILE]``: write the Slurm hooks and print slurm.conf's lines."""

from __future__ import annotations

import argparse
import os

HOOKS = (  # file, function in blahvm.batch.slurm
    ("prolog", "prolog_main"),
    ("epilog", "epilog_main"),
    ("task", "task_main"),
    ("route", "route_main"),
    ("health", "health_main"),
    ("follow", "follow_main"),  # root: the SPANK plugin starts it for each task
    ("charge", "charge_main"),  # root: the SPANK plugin starts it with the extern step (PrologFlags=Contain)
)
# blahvm/plugins: the checkout's plugins/ (a link), or the copy an installed wheel carries
PLUGIN_SOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "slurm")
TEMPLATE = os.path.join(PLUGIN_SOURCES, "job_submit.lua.in")
SPANK_SOURCE = os.path.join(PLUGIN_SOURCES, "blahvm_spank.c")


def add_parser(systems) -> None:
    parser = systems.add_parser(
        "slurm", help="Slurm: Prolog, Epilog, health check, task wrapper, job_submit.lua, SPANK plugin",
        description="Write blahvm's Slurm hooks into DIR with the config path fixed into them, build the SPANK "
                    "plugin that runs every srun task in the job's guest (needs a C compiler and Slurm's "
                    "headers: Debian's gcc and libslurm-dev), and print the slurm.conf lines that enable "
                    "them and each host's Features= and Gres=. job_submit.lua must then be copied next to "
                    "slurm.conf.",
    )
    parser.add_argument("--dir", required=True, help="where the hooks go (on every node, e.g. /etc/slurm/blahvm)")
    parser.add_argument("--config", default=None, help="the site config the hooks use (default /etc/blahvm/site.yaml)")
    parser.add_argument("--slurm-bin", default="/usr/bin",
                        help="where scontrol, scancel and squeue are (default /usr/bin)")
    parser.add_argument("--slurm-conf", default="/etc/slurm/slurm.conf",
                        help="slurm.conf, for the scontrol the Prolog and health check run: slurmd gives "
                             "HealthCheckProgram no SLURM_CONF (default /etc/slurm/slurm.conf)")
    parser.add_argument("--slurm-user", default=None,
                        help="the SlurmUser that runs the route hook inside slurmctld: the install checks, as that "
                             "user, that it can run it (default: SlurmUser in --slurm-conf, else 'slurm' if it exists)")
    parser.add_argument("--python", default=None,
                        help="the interpreter of the root and SlurmUser hooks (default: the one running this "
                             "command); it must be executable by SlurmUser")
    parser.add_argument("--task-python", default=None,
                        help="the interpreter of the task wrapper, which runs as the job's user: it must be one "
                             "every user can execute (default: the one running this command)")
    parser.add_argument("--no-spank", action="store_true",
                        help="do not build the SPANK plugin: srun then runs a command in the guest only when "
                             "given as 'srun DIR/task -- COMMAND', and any other srun command on the host")
    parser.add_argument("--cc", default="cc", help="the C compiler for the SPANK plugin (default cc)")
    parser.add_argument("--slurm-include", default="/usr/include",
                        help="the directory holding slurm/spank.h of the Slurm the nodes run (default /usr/include)")
    parser.set_defaults(run=run)


def _problem(path: str) -> "str | None":
    if not os.path.isabs(path):
        return "must be an absolute path"
    if any(c.isspace() or c in "'\"\\\0" for c in path):
        return "must not contain spaces, quotes or backslashes (it becomes a #! line and a Lua string)"
    if len(path) > 100:
        return "is too long for a #! line"
    return None


def run(args: argparse.Namespace) -> int:
    from blahvm.batch.install import hook_script, install_file
    from blahvm.cli.common import fail
    from blahvm.config import DEFAULT_PATH

    directory = os.path.abspath(args.dir)
    config = os.path.abspath(args.config or DEFAULT_PATH)
    checked = [("--dir", directory), ("--config", config), ("--slurm-bin", args.slurm_bin),
               ("--slurm-conf", args.slurm_conf)]
    for label, value in (("--python", args.python), ("--task-python", args.task_python)):
        if value:
            checked.append((label, value))
    for label, path in checked:
        problem = _problem(path)
        if problem:
            return fail(f"{label} {path!r}: {problem}")
    if not os.path.isfile(config):
        return fail(f"--config {config}: no such file")
    if not args.no_spank and not os.path.isfile(os.path.join(args.slurm_include, "slurm", "spank.h")):
        return fail(f"--slurm-include {args.slurm_include}: no slurm/spank.h (install libslurm-dev, or pass "
                    "--no-spank)")
    node = node_line(config)  # a config that cannot be read stops here, before anything is written
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        paths = {}
        for name, function in HOOKS:
            extra = {"slurm_bin": args.slurm_bin, "slurm_conf": args.slurm_conf} if name in ("prolog", "health") else None
            python = (args.task_python or args.python) if name == "task" else args.python
            text = hook_script("slurm", "blahvm.batch.slurm", function, config, extra, python=python)
            paths[name] = os.path.join(directory, name)
            install_file(paths[name], text, 0o755)
        with open(TEMPLATE) as stream:
            lua = stream.read().replace("@ROUTE@", paths["route"]).replace("@TASK@", paths["task"])
        install_file(os.path.join(directory, "job_submit.lua"), lua, 0o644)
        if not args.no_spank:
            problem = build_spank(args.cc, args.slurm_include, os.path.join(directory, "blahvm_spank.so"))
            if problem:
                return fail(f"cannot build the SPANK plugin: {problem} (or pass --no-spank)")
            install_file(os.path.join(directory, "plugstack.conf"),
                         f"required {directory}/blahvm_spank.so task={paths['task']} follow={paths['follow']} "
                         f"charge={paths['charge']}\n", 0o644)
    except OSError as error:
        return fail(f"cannot install into {directory}: {error.strerror or error}")
    user = args.slurm_user or slurm_user(args.slurm_conf)
    problem = route_problem(paths["route"], user)
    if problem:
        return fail(problem)
    print(f"""# blahvm: add to slurm.conf on every host, then copy {directory}/job_submit.lua next to slurm.conf
JobSubmitPlugins=lua
GresTypes=blahvm
Prolog={paths['prolog']}
Epilog={paths['epilog']}
PrologFlags=Alloc,NoHold
# with Slurm's cgroup plugins (proctrack/cgroup, task/cgroup, jobacct_gather/cgroup), PrologFlags=Alloc,Contain
# instead: each job's guest joins the job's cgroups (accounted, limited, frozen with it; docs/slurm.md); 22.05 refuses NoHold with Contain
# merge into an existing SchedulerParameters= line (Slurm reads only one), e.g. SchedulerParameters=defer,nohold_on_prolog_fail
SchedulerParameters=nohold_on_prolog_fail
HealthCheckProgram={paths['health']}
HealthCheckInterval=60
# and to each blahvm host's NodeName= line (this config's environments and guest slots):
#   {node}""")
    if args.no_spank:
        print(f"# without the SPANK plugin, srun runs a command in the guest only as: srun {paths['task']} -- COMMAND")
    else:
        print(f"""# every srun task runs in the guest: use this plugstack.conf, or include it from yours
PlugStackConfig={directory}/plugstack.conf""")
    return 0


def slurm_user(slurm_conf: str) -> "str | None":
    """SlurmUser from slurm.conf (its last setting), else ``slurm`` when that user exists, else None."""
    import pwd

    user = None
    try:
        with open(slurm_conf) as stream:
            for line in stream:
                key, _, value = line.split("#", 1)[0].strip().partition("=")
                if key.strip().lower() == "slurmuser" and value.strip():
                    user = value.strip()
    except OSError:
        pass
    if user is None:
        try:
            pwd.getpwnam("slurm")
        except KeyError:
            return None
        user = "slurm"
    return user


def route_problem(route: str, user: "str | None") -> "str | None":
    """Why ``user`` (SlurmUser: job_submit.lua runs the route hook as it) cannot run the route hook, or None.

    Run for real, as that user, with no facts: its interpreter, blahvm and the site config must all be
    readable by it, or every submission is refused.
    """
    import shutil
    import subprocess

    if not user or user == "root" or os.geteuid() != 0:
        return None  # root reads everything; only root can become another user
    runuser = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
    argv = [runuser, "-u", user, "--", route]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd="/",
                              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot run the route hook as SlurmUser {user}: {error}"
    if done.returncode == 0 and done.stdout.startswith(("route\t", "reject\t")):
        return None
    said = " ".join((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].split())[:300]
    return (f"SlurmUser {user} cannot run {route} ({said}): the interpreter (--python), blahvm and the site "
            f"config must be readable by {user}, or every job is refused")


def node_line(config_path: str) -> str:
    """``Features=... Gres=blahvm:N`` for a host running ``config_path``: its environments, its slots."""
    from blahvm.config import load_config

    site = load_config(config_path)
    features = ",".join(sorted(site.environments)) or "NONE"
    return f"Features={features} Gres=blahvm:{site.host.max_guests}"


def build_spank(cc: str, include: str, target: str) -> "str | None":
    """Compile the SPANK plugin against this Slurm's headers into ``target``; None, or what went wrong."""
    import subprocess
    import tempfile

    from blahvm.batch.install import install_file

    with tempfile.TemporaryDirectory(prefix="blahvm-spank-") as scratch:
        built = os.path.join(scratch, "blahvm_spank.so")
        argv = [cc, "-O2", "-Wall", "-shared", "-fPIC", f"-I{include}", "-o", built, SPANK_SOURCE]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return f"no C compiler {cc!r} (install gcc)"
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{cc}: {error}"
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
            return f"{cc} failed: {' '.join(first.split())[:300]}"
        with open(built, "rb") as stream:
            install_file(target, stream.read(), 0o755)
    return None
