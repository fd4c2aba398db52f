"""LSF resource names for blahvm and merging blahvm's request into the user's own ``-R``.

The elim reports ``blahvm_slots`` (free guest slots) and ``blahvm_env_<environment>`` (1 where one
more guest of that environment fits now). The esub asks for both, merged into what the user wrote:
``-R "select[mem>100] rusage[mem=50]"`` becomes
``select[(mem>100) && blahvm_env_slc4>0 && blahvm_slots>0] rusage[mem=50:blahvm_slots=1]``.
"""

from __future__ import annotations

import hashlib
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional

SLOTS = "blahvm_slots"
_ENV_PREFIX = "blahvm_env_"
_MAX_NAME = 39  # LSF's limit on resource names


class ResReqError(ValueError):
    """A resource requirement blahvm cannot merge into (the message says why)."""


def environment_resource(environment: str) -> str:
    """The LSF resource that says whether ``environment`` fits on a host now."""
    name = _ENV_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", environment)
    if len(name) > _MAX_NAME or name != _ENV_PREFIX + environment:
        # not a valid LSF name as is: keep it readable and unique
        digest = hashlib.sha256(environment.encode("utf-8", "surrogatepass")).hexdigest()[:6]
        name = name[: _MAX_NAME - 7] + "_" + digest
    return name


_SECTION = re.compile(r"\s*([a-z]+)\s*\[")
_ALLOWED = re.compile(r"[A-Za-z0-9 _.,:=<>!&|()\[\]*+/~-]*\Z")
KNOWN = ("select", "order", "rusage", "span", "same", "cu", "affinity")


def split_sections(text: str) -> "Dict[str, str]":
    """``{"select": ..., "rusage": ..., ...}`` of a simple LSF resource requirement string.

    A leading part outside any section is a selection string. Compound (``2*{...}``) and
    alternative (``{...} || {...}``) requirements, unknown or repeated sections, and characters
    outside LSF's resource-requirement alphabet raise ``ResReqError``.
    """
    if not _ALLOWED.match(text):
        bad = sorted({c for c in text if not _ALLOWED.match(c)})
        raise ResReqError(f"the resource requirement {text!r} has characters blahvm does not accept: {''.join(bad)!r}")
    if "{" in text or "}" in text:
        raise ResReqError("blahvm cannot merge into a compound or alternative resource requirement ({...})")
    sections: "Dict[str, str]" = {}
    position = 0
    first = _SECTION.match(text, 0)
    if first is None or first.group(1) not in KNOWN:
        # a bare selection string up to the first section
        following = re.search(r"\b(" + "|".join(KNOWN) + r")\s*\[", text)
        end = following.start() if following else len(text)
        bare = text[:end].strip()
        if bare:
            sections["select"] = bare
        position = end
    while position < len(text):
        if not text[position:].strip():
            break
        match = _SECTION.match(text, position)
        if match is None or match.group(1) not in KNOWN:
            raise ResReqError(f"cannot read the resource requirement {text!r} near {text[position:position + 20]!r}")
        name = match.group(1)
        depth, index = 1, match.end()
        while index < len(text) and depth:
            depth += {"[": 1, "]": -1}.get(text[index], 0)
            index += 1
        if depth:
            raise ResReqError(f"unbalanced brackets in the resource requirement {text!r}")
        if name in sections:
            raise ResReqError(f"the resource requirement {text!r} has two {name}[] sections")
        sections[name] = text[match.end():index - 1].strip()
        position = index
    return sections


def merge(user: "Optional[str]", environment: str, route_resources: "Optional[str]" = None) -> str:
    """The user's ``-R`` (and the route's own ``resources``) with blahvm's selection and slot."""
    parts: "List[Dict[str, str]]" = [split_sections(s) for s in (user, route_resources) if s and s.strip()]
    selects = [f"({p['select']})" for p in parts if p.get("select")]
    selects += [f"{environment_resource(environment)}>0", f"{SLOTS}>0"]
    usages = [p["rusage"] for p in parts if p.get("rusage")] + [f"{SLOTS}=1"]
    out = [f"select[{' && '.join(selects)}]"]
    for name in KNOWN:
        if name == "select":
            continue
        if name == "rusage":
            out.append(f"rusage[{':'.join(usages)}]")
            continue
        values = [p[name] for p in parts if p.get(name)]
        if values:
            out.append(f"{name}[{values[0]}]")  # the user's own wins over the route's
    return " ".join(out)
