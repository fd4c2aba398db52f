"""An environment's ``user_data:``: the site's cloud-config additions merged into every job's seed.

Only the keys below are taken, each checked for its shape, so a typo or a wrong type is a problem
with file and line at ``blahvm check`` instead of a guest whose cloud-init silently skipped it. The
keys blahvm writes itself (the job's identity, hostname, how the agent starts) and the keys that
would give the guest a login or end it are refused by name. The value kept is canonical JSON text:
hashable inside the frozen ``Environment``, and the same whatever order the file wrote its keys in.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

from blahvm.config.problems import Problems, did_you_mean, kind_of
from blahvm.config.source import Path

# Where blahvm writes in the guest (blahvm.context): a site's write_files never lands there.
BLAHVM_GUEST_DIR = "/usr/lib/blahvm/"
AGENT_UNIT = "blahvm-agent.service"
AGENT_UNIT_PATH = "/etc/systemd/system/" + AGENT_UNIT

# Keys blahvm sets, or that must never reach a job's guest, and why.
OWNED = {
    "users": "blahvm makes the job's user (and no other)",
    "groups": "blahvm makes the job's group",
    "hostname": "blahvm names the guest after the job",
    "fqdn": "blahvm names the guest after the job",
    "preserve_hostname": "blahvm names the guest after the job",
    "prefer_fqdn_over_hostname": "blahvm names the guest after the job",
    "manage_etc_hosts": "blahvm names the guest after the job",
    "chpasswd": "a job's guest has no passwords",
    "password": "a job's guest has no passwords",
    "ssh_pwauth": "a job's guest has no passwords",
    "ssh_authorized_keys": "a job's guest takes no logins",
    "disable_root": "a job's guest takes no logins",
    "power_state": "the guest ends when its job does",
}

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # text keeps tabs and line ends, nothing else
_PERMISSIONS = re.compile(r"0?[0-7]{3}\Z")
_OWNER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}(:[a-z_][a-z0-9_.-]{0,31})?\Z")


def _text(problems: Problems, path: Path, value: Any, empty: bool = False) -> bool:
    """Whether ``value`` is text a cloud-config file can carry as is (one problem if not)."""
    if not isinstance(value, str) or (not value and not empty):
        hint = "; quote it" if isinstance(value, (bool, int, float)) else ""
        problems.add(path, f"expected {'text' if empty else 'non-empty text'}, got {kind_of(value)}{hint}")
        return False
    if _CONTROL.search(value):
        problems.add(path, "contains control characters (text only: tabs and line ends are fine)")
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problems.add(path, "is not valid UTF-8 text")
        return False
    return True


def _bool(problems: Problems, path: Path, value: Any) -> bool:
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {kind_of(value)}")
        return False
    return True


def _list(problems: Problems, path: Path, value: Any, item: Callable[[Problems, Path, Any], bool]) -> bool:
    if not isinstance(value, list):
        problems.add(path, f"expected a list, got {kind_of(value)}")
        return False
    results = [item(problems, path + (i,), entry) for i, entry in enumerate(value)]
    return all(results)


def _command(problems: Problems, path: Path, value: Any) -> bool:
    """A runcmd or bootcmd entry: a shell line, or a command as a list of words (run without a shell)."""
    if isinstance(value, list):
        if not value:
            problems.add(path, "an empty command")
            return False
        return all([_text(problems, path + (i,), word, empty=True) for i, word in enumerate(value)])
    return _text(problems, path, value)


def _package(problems: Problems, path: Path, value: Any) -> bool:
    if isinstance(value, list):
        if len(value) != 2:
            problems.add(path, "a package with a version is [NAME, VERSION]")
            return False
        return all([_text(problems, path + (i,), word) for i, word in enumerate(value)])
    return _text(problems, path, value)


def _mount(problems: Problems, path: Path, value: Any) -> bool:
    if not isinstance(value, list) or not 2 <= len(value) <= 6:
        problems.add(path, "a mount is a list of 2 to 6 fstab fields: [WHAT, WHERE, TYPE, OPTIONS, DUMP, PASS]")
        return False
    return all([_text(problems, path + (i,), word) for i, word in enumerate(value)])


WRITE_FILE_KEYS = ("path", "content", "permissions", "owner", "append", "defer")


def _write_file(problems: Problems, path: Path, value: Any) -> bool:
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping with path and content, got {kind_of(value)}")
        return False
    good = True
    for key in value:
        if key not in WRITE_FILE_KEYS:
            hint = "; give the content as text" if key == "encoding" else ""
            problems.add(path + (key,), f"unknown key{did_you_mean(key, WRITE_FILE_KEYS)}; known keys: "
                         f"{', '.join(WRITE_FILE_KEYS)}{hint}")
            good = False
    if "path" not in value:
        problems.add(path, "a write_files entry needs a path")
        good = False
    else:
        target = value["path"]
        if _text(problems, path + ("path",), target):
            if not target.startswith("/") or "/../" in target + "/" or "\n" in target or "\t" in target:
                problems.add(path + ("path",), f"{target!r} must be an absolute path without '..'")
                good = False
            elif target.startswith(BLAHVM_GUEST_DIR) or target == AGENT_UNIT_PATH:
                problems.add(path + ("path",), f"{target!r} is blahvm's own (the agent and its unit)")
                good = False
        else:
            good = False
    if "content" in value and not _text(problems, path + ("content",), value["content"], empty=True):
        good = False
    if "permissions" in value:
        permissions = value["permissions"]
        if not isinstance(permissions, str) or not _PERMISSIONS.match(permissions):
            problems.add(path + ("permissions",), f"expected octal text such as '0644' (quoted), got {kind_of(permissions)}")
            good = False
    if "owner" in value:
        owner = value["owner"]
        if not isinstance(owner, str) or not _OWNER.match(owner):
            problems.add(path + ("owner",), "expected USER or USER:GROUP (plain names)")
            good = False
    for key in ("append", "defer"):
        if key in value and not _bool(problems, path + (key,), value[key]):
            good = False
    return good


# What a site may add, each with the check of its value.
ALLOWED = {
    "write_files": lambda problems, path, value: _list(problems, path, value, _write_file),
    "runcmd": lambda problems, path, value: _list(problems, path, value, _command),
    "bootcmd": lambda problems, path, value: _list(problems, path, value, _command),
    "packages": lambda problems, path, value: _list(problems, path, value, _package),
    "package_update": _bool,
    "package_upgrade": _bool,
    "mounts": lambda problems, path, value: _list(problems, path, value, _mount),
    "timezone": _text,
}


def read_user_data(problems: Problems, path: Path, value: Any) -> Optional[str]:
    """The additions as canonical JSON text, or None after recording every problem."""
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of cloud-config keys, got {kind_of(value)}")
        return None
    good = True
    for key, item in value.items():
        if key in OWNED:
            problems.add(path + (key,), f"blahvm owns {key!r}: {OWNED[key]}")
            good = False
        elif key not in ALLOWED:
            problems.add(path + (key,), f"unknown or unsupported cloud-config key{did_you_mean(key, ALLOWED)}; "
                         f"a site may add: {', '.join(ALLOWED)}")
            good = False
        elif not ALLOWED[key](problems, path + (key,), item):
            good = False
    if not good:
        return None
    return canonical(value)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def additions(text: Optional[str]) -> dict:
    """The additions an ``Environment.user_data`` holds, as a fresh mapping (empty if none)."""
    return {} if text is None else json.loads(text)
