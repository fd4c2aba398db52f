"""The esub: route a submission and tell LSF where it goes (runs as the submitting user).

Input: ``$LSB_SUB_PARM_FILE`` (``blahvm.batch.lsf.params``), the process's user and group.
Output: ``LSB_SUB_QUEUE`` and ``LSB_SUB_RES_REQ`` appended to ``$LSB_SUB_MODIFY_FILE``; on a
``bsub``, ``BLAHVM_*`` hints appended to ``$LSB_SUB_MODIFY_ENVFILE``. The hints are only the user's
request seen again on the execution host, never the decision (PRE_EXEC routes again).
A rejection: the reason on stderr, exit ``$LSB_SUB_ABORT_VALUE``. Nothing ever goes to stdout,
which LSF pipes to eexec.
"""

from __future__ import annotations

import os
import re

from blahvm.batch.lsf import DEFAULT_ABORT_VALUE
from blahvm.batch.lsf.params import RESET, ParamError, assignment, flag, read_params
from blahvm.batch.lsf.resreq import ResReqError, merge
from blahvm.locations import DEFAULT_CACHE_DIR

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

HOOK = "esub"
# the -a application whose argument names the environment: bsub -a "blahvm(slc4)"
APPLICATION = "blahvm"
ENVIRONMENT_VARIABLE = "BLAHVM_ENVIRONMENT"  # the documented alternative: set in the environment at bsub
HINTS = ("BLAHVM_ENVIRONMENT", "BLAHVM_SUBMIT_QUEUE", "BLAHVM_WALLTIME", "BLAHVM_MEMORY")
# options that change what routing sees; a bmod touching none of them is left alone
ROUTED_OPTIONS = ("LSB_SUB_QUEUE", "LSB_SUB_PROJECT_NAME", "LSB_SUB_RLIMIT_RUN", "LSB_SUB_RLIMIT_RSS",
                  "LSB_SUB_NUM_PROCESSORS", "LSB_SUB_ADDITIONAL", "LSB_SUB_RES_REQ")
_APP = re.compile(r"([A-Za-z0-9_-]+)\s*(?:\(([^()]*)\))?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


class Rejected(Exception):
    """Reject the submission with this one-line reason."""


def _say(message: str) -> None:
    try:
        os.write(2, f"blahvm: {' '.join(message.split())}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _text(values: dict, name: str) -> "Optional[str]":
    value = values.get(name)
    if value is RESET or value is None:
        return None
    value = value.strip()
    return value or None


def _integer(values: dict, name: str, what: str) -> "Optional[int]":
    value = _text(values, name)
    if value is None:
        return None
    try:
        number = int(value, 10)
    except ValueError:
        raise Rejected(f"{name}={value!r} is not a whole number of {what}") from None
    if number < 0:
        raise Rejected(f"{name}={value!r} is negative")
    return number


def requested_environment(values: dict, environ) -> "Optional[str]":
    """The environment asked for: ``-a "blahvm(NAME)"``, else ``$BLAHVM_ENVIRONMENT`` at bsub."""
    additional = _text(values, "LSB_SUB_ADDITIONAL")
    if additional:
        for match in _APP.finditer(additional):
            if match.group(1) == APPLICATION and match.group(2) is not None:
                arguments = [a.strip() for a in match.group(2).split(",") if a.strip()]
                if len(arguments) != 1:
                    raise Rejected(f'-a "{APPLICATION}(ENVIRONMENT)" takes one environment name, '
                                   f'got {match.group(0)!r}')
                return _checked_name(arguments[0])
    wanted = environ.get(ENVIRONMENT_VARIABLE)
    return _checked_name(wanted) if wanted else None


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise Rejected(f"{name!r} is not an environment name")
    return name


def facts_of(values: dict, environ) -> tuple:
    """The routing facts (``blahvm.routing.table.FIELDS`` order) of a parameter file."""
    import grp
    import pwd

    uid, gid = os.getuid(), os.getgid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        raise Rejected(f"uid {uid} has no name on this host") from None
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = None
    kib = _integer(values, "LSB_SUB_RLIMIT_RSS", "KiB")
    return (
        _text(values, "LSB_SUB_QUEUE"),
        None,  # the VO: vo_mapping derives it from the user, group or project
        user,
        group,
        _text(values, "LSB_SUB_PROJECT_NAME"),
        _integer(values, "LSB_SUB_RLIMIT_RUN", "seconds"),
        None if kib is None else kib * 1024,
        _integer(values, "LSB_SUB_NUM_PROCESSORS", "processors"),
        requested_environment(values, environ),
    )


def decide(config: str, cache_dir: "Optional[str]", values: dict, environ) -> "Tuple[tuple, tuple]":
    """(facts, result) where result is the route table's ``("route", ...)`` or ``("reject", ...)``."""
    from blahvm.routing.fast import load_table

    facts = facts_of(values, environ)
    table = load_table(config, cache_dir)
    wanted = facts[-1]
    if wanted is not None:
        offered = sorted({route.action[2] for route in table.routes if route.action[0] == "route"})
        if wanted not in offered:
            raise Rejected(f"environment {wanted} does not exist here (asked for with -a \"{APPLICATION}({wanted})\" "
                           f"or ${ENVIRONMENT_VARIABLE}); this site offers {', '.join(offered) or 'none'}")
    return facts, table.decide(facts)


def _append(path: "Optional[str]", lines: str, what: str) -> None:
    if not path:
        raise Rejected(f"LSF gave no {what} to write the routing decision to")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, lines.encode())
    finally:
        os.close(fd)


def _abort_value(environ) -> int:
    try:
        return int(environ.get("LSB_SUB_ABORT_VALUE", ""))
    except ValueError:
        return DEFAULT_ABORT_VALUE


def esub(config: str, cache_dir: "Optional[str]" = DEFAULT_CACHE_DIR, on_broken: str = "reject",
         environ=None) -> int:
    """The whole esub; its exit code. ``on_broken="accept"`` lets jobs through unrouted (with a
    warning on stderr) when blahvm itself cannot route: a broken config, an internal error."""
    environ = os.environ if environ is None else environ
    abort = _abort_value(environ)
    broken = abort if on_broken == "reject" else 0
    try:
        return _esub(config, cache_dir, environ, abort, broken)
    except Rejected as rejection:
        _say(f"job rejected: {rejection}")
        return abort
    except Exception as error:  # blahvm itself is broken: one line, never a traceback
        from blahvm.errors import BlahvmError

        if isinstance(error, BlahvmError):
            problems = getattr(error, "problems", None) or [str(error)]
            more = " ..." if len(problems) > 1 else ""
            message = f"the site's blahvm config {config} is broken ({problems[0]}{more})"
        else:
            message = f"internal error: {type(error).__name__}: {error}"
        from blahvm.batch.log import log_event

        log_event(HOOK, message)
        if broken:
            _say(f"job rejected: {message}; tell your site admins")
        else:
            _say(f"warning: {message}; the job goes on unrouted")
        return broken


def _esub(config: str, cache_dir, environ, abort: int, broken: int) -> int:
    parameter_file = environ.get("LSB_SUB_PARM_FILE")
    if not parameter_file:
        raise Rejected("LSB_SUB_PARM_FILE is not set (this esub runs under bsub or bmod)")
    try:
        values = read_params(parameter_file)
    except ParamError as error:
        raise Rejected(str(error)) from None
    modify = flag(values, "LSB_SUB_MODIFY") or flag(values, "LSB_SUB_MODIFY_ONCE")
    if modify and not any(name in values for name in ROUTED_OPTIONS):
        return 0  # a bmod of something routing never looks at
    facts, result = decide(config, cache_dir, values, environ)
    if result[0] == "reject":
        raise Rejected(result[2])
    _, rule, queue, environment, vo, memory, vcpus, walltime, resources = result
    try:
        res_req = merge(_text(values, "LSB_SUB_RES_REQ"), environment, resources)
        lines = assignment("LSB_SUB_QUEUE", queue) + assignment("LSB_SUB_RES_REQ", res_req)
        hints = ""
        if not modify and not flag(values, "LSB_SUB_RESTART"):  # LSF honours the env file for bsub only
            hints = assignment("BLAHVM_ENVIRONMENT", environment, quote=False)
            if facts[0] is not None and _NAME.match(facts[0]):
                hints += assignment("BLAHVM_SUBMIT_QUEUE", facts[0], quote=False)
            if facts[5] is not None:
                hints += assignment("BLAHVM_WALLTIME", facts[5], quote=False)
            if facts[6] is not None:
                hints += assignment("BLAHVM_MEMORY", facts[6], quote=False)
    except (ResReqError, ValueError) as error:
        raise Rejected(str(error)) from None
    _append(environ.get("LSB_SUB_MODIFY_FILE"), lines, "LSB_SUB_MODIFY_FILE")
    if hints:
        _append(environ.get("LSB_SUB_MODIFY_ENVFILE"), hints, "LSB_SUB_MODIFY_ENVFILE")
    return 0


def main(config: str, cache_dir: "Optional[str]" = DEFAULT_CACHE_DIR, on_broken: str = "reject") -> int:
    """The installed esub's entry point (``blahvm install lsf``)."""
    return esub(config, cache_dir, on_broken)
