"""The site configuration's shape: plain YAML values in, a validated ``SiteConfig`` out.

Each reader checks one value and either returns it converted or records a problem and returns
``INVALID``; sections carry on past a bad value so that every problem is reported at once.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from blahvm.config.cloud_config import read_user_data
from blahvm.config.problems import Problems, did_you_mean, kind_of
from blahvm.config.source import Path
from blahvm.model import (
    CLONE_METHODS,
    CONTEXTS,
    START_METHODS,
    DOMAIN_TYPES,
    FLAVOURS,
    Defaults,
    Environment,
    HostConfig,
    HypervisorConfig,
    Predicate,
    Queue,
    Route,
    SiteConfig,
    VoRule,
)
from blahvm.quantities import MAX, Duration, QuantityError, QuantityTooLarge, Size, parse_count, shown

INVALID = object()

# Names end up in resource names, volume names and log lines: keep them plain.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}\Z")
SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")

NAME_FIELDS = ("queue", "vo", "user", "group", "account", "environment")
QUANTITY_FIELDS = ("walltime", "memory", "cores")
WHEN_FIELDS = NAME_FIELDS + QUANTITY_FIELDS
VO_SOURCES = ("user", "group", "account")
OPERATORS = ("<=", ">=", "==", "!=", "<", ">")

Reader = Callable[[Problems, Path, Any], Any]


# -- scalar readers ---------------------------------------------------------------------------


def read_string(problems: Problems, path: Path, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        hint = "; quote it" if isinstance(value, (bool, int, float)) else ""
        problems.add(path, f"expected a non-empty string, got {kind_of(value)}{hint}")
        return INVALID
    return value


def read_name(problems: Problems, path: Path, value: Any) -> Any:
    if read_string(problems, path, value) is INVALID:
        return INVALID
    if not NAME_RE.match(value):
        problems.add(path, f"{value!r} is not a valid name (a letter, then letters, digits, '_', '.' or '-')")
        return INVALID
    return value


def read_absolute_path(problems: Problems, path: Path, value: Any) -> Any:
    if read_string(problems, path, value) is INVALID:
        return INVALID
    if not value.startswith("/") or "\0" in value or "/../" in value + "/":
        problems.add(path, f"{value!r} must be an absolute path without '..'")
        return INVALID
    return value


def read_positive_int(problems: Problems, path: Path, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.add(path, f"expected a whole number of at least 1, got {kind_of(value)}")
        return INVALID
    if value > MAX:  # it must fit the ledger's 64-bit integers
        problems.add(path, f"{shown(value)} is too large (at most {MAX})")
        return INVALID
    return value


def read_bool(problems: Problems, path: Path, value: Any) -> Any:
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {kind_of(value)}")
        return INVALID
    return value


def _quantity_text(problems: Problems, path: Path, value: Any) -> Any:
    # the text as written wins over YAML 1.1's reading of it (10:00:00 is a clock, not 36000)
    text = problems.text(path)
    return text if text is not None and not isinstance(value, str) else value


def read_positive(quantity: Any, zero: str, most: Any = None) -> Reader:
    """A reader of a non-zero ``Duration`` or ``Size``, at most ``most``; ``zero`` says why 0 will not do."""

    def read(problems: Problems, path: Path, value: Any) -> Any:
        try:
            parsed = quantity.parse(_quantity_text(problems, path, value))
        except QuantityTooLarge as error:
            problems.add(path, str(error) if most is None else f"{shown(value)} is longer than {most}")
            return INVALID
        except QuantityError as error:
            problems.add(path, str(error))
            return INVALID
        if parsed == 0:
            problems.add(path, zero)
            return INVALID
        if most is not None and parsed > most:
            problems.add(path, f"{parsed} is longer than {most}")
            return INVALID
        return parsed

    return read


read_positive_duration = read_positive(Duration, "must be longer than 0s")
read_positive_size = read_positive(Size, "must be larger than 0B")
# A bound on each libvirt call, waited for with threading and poll: a day is far past any call a site
# could mean, and far below what their clocks can count (poll's milliseconds overflow at 24.8 days).
MAX_HYPERVISOR_TIMEOUT = Duration(86400)
read_hypervisor_timeout = read_positive(Duration, "must be longer than 0s", MAX_HYPERVISOR_TIMEOUT)


def read_sha256(problems: Problems, path: Path, value: Any) -> Any:
    if read_string(problems, path, value) is INVALID:
        return INVALID
    if not SHA256_RE.match(value):
        problems.add(path, "expected 64 lowercase hex digits (sha256sum prints them)")
        return INVALID
    return value


def read_choice(*choices: str) -> Reader:
    def read(problems: Problems, path: Path, value: Any) -> Any:
        if value not in choices or not isinstance(value, str):
            problems.add(
                path, f"{kind_of(value)} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
            )
            return INVALID
        return value

    return read


def read_list_of(reader: Reader) -> Reader:
    def read(problems: Problems, path: Path, value: Any) -> Any:
        if not isinstance(value, list):
            problems.add(path, f"expected a list, got {kind_of(value)}")
            return INVALID
        items = [reader(problems, path + (i,), item) for i, item in enumerate(value)]
        return INVALID if INVALID in items else tuple(items)

    return read


# -- mappings ---------------------------------------------------------------------------------


def read_fields(
    problems: Problems,
    path: Path,
    value: Any,
    fields: Mapping[str, Reader],
    required: Tuple[str, ...] = (),
) -> Optional[Dict[str, Any]]:
    """Read a mapping with known keys; unknown and missing keys are problems. None if not a mapping."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {kind_of(value)}")
        return None
    result: Dict[str, Any] = {}
    for key, item in value.items():
        if key not in fields:
            problems.add(
                path + (key,),
                f"unknown key{did_you_mean(key, fields)}; known keys: {', '.join(fields)}",
            )
            continue
        converted = fields[key](problems, path + (key,), item)
        if converted is not INVALID:
            result[key] = converted
    for key in required:
        if key not in value:
            problems.add(path, f"missing required key {key!r}")
    return result


def read_named_section(
    problems: Problems, path: Path, value: Any, read_entry: Callable[[Problems, Path, str, Any], Any]
) -> Dict[str, Any]:
    """``name: {...}`` entries, e.g. environments and queues."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of names, got {kind_of(value)}")
        return {}
    entries = {}
    for name, entry in value.items():
        if read_name(problems, path + (name,), name) is INVALID:
            continue
        built = read_entry(problems, path + (name,), name, entry)
        if built is not INVALID:
            entries[name] = built
    return entries


# -- sections ---------------------------------------------------------------------------------

HYPERVISOR_FIELDS = {
    "uri": read_string,
    "pool": read_name,
    "pool_path": read_absolute_path,
    "domain_type": read_choice(*DOMAIN_TYPES),
    "timeout": read_hypervisor_timeout,
}

HOST_FIELDS = {
    "max_guests": read_positive_int,
    "memory": read_positive_size,
    "vcpus": read_positive_int,
    "state_dir": read_absolute_path,
    "run_dir": read_absolute_path,
    "log_file": read_absolute_path,
}

DEFAULTS_FIELDS = {
    "walltime": read_positive_duration,
    "memory": read_positive_size,
    "cores": read_positive_int,
}

ENVIRONMENT_FIELDS = {
    "image": read_absolute_path,
    "flavour": read_choice(*FLAVOURS),
    "memory": read_positive_size,
    "vcpus": read_positive_int,
    "sha256": read_sha256,
    "kernel": read_absolute_path,
    "initrd": read_absolute_path,
    "cmdline": read_string,
    "bootloader": read_absolute_path,
    "network": read_name,
    "clone": read_choice(*CLONE_METHODS),
    "scratch": read_positive_size,
    "guests": read_list_of(read_name),
    "allow_root": read_bool,
    "start": read_choice(*START_METHODS),
    "context": read_choice(*CONTEXTS),
    "user_data": lambda problems, path, value: _or_invalid(read_user_data(problems, path, value)),
    "ready_timeout": read_hypervisor_timeout,
}

QUEUE_FIELDS = {
    "max_walltime": read_positive_duration,
    "slots_per_host": read_positive_int,
}

ROUTE_FIELDS = {
    "name": read_name,
    "when": lambda problems, path, value: value,  # read by read_when, which knows the fields
    "queue": read_name,
    "environment": read_name,
    "resources": read_string,
    "reject": read_string,
}


def _or_invalid(value: Any) -> Any:
    return INVALID if value is None else value


def read_environment(problems: Problems, path: Path, name: str, value: Any) -> Any:
    fields = read_fields(problems, path, value, ENVIRONMENT_FIELDS, ("image", "flavour", "memory", "vcpus"))
    if fields is None or not {"image", "flavour", "memory", "vcpus"} <= fields.keys():
        return INVALID
    if "initrd" in fields and "kernel" not in fields:
        problems.add(path + ("initrd",), "an initrd needs a kernel")
    if "bootloader" in fields and ("kernel" in fields or fields["flavour"] != "xen-pv"):
        problems.add(path + ("bootloader",), "a bootloader is for xen-pv guests without a kernel")
    contextualised = fields.get("context") == "cloud-init"
    if isinstance(value, dict) and "user_data" in value and not contextualised:
        problems.add(path + ("user_data",), "user_data is for environments with context: cloud-init")
    if contextualised and fields.get("guests"):
        problems.add(path + ("context",), "a static guest is not made for each job: it takes no per-job seed")
    return Environment(name=name, **fields)


def read_queue(problems: Problems, path: Path, name: str, value: Any) -> Any:
    fields = read_fields(problems, path, value, QUEUE_FIELDS)
    return INVALID if fields is None else Queue(name=name, **fields)


def read_vo_rule(problems: Problems, path: Path, value: Any) -> Any:
    if not isinstance(value, dict) or len(value) != 1:
        problems.add(path, "expected one of {user: REGEX}, {group: REGEX} or {account: REGEX}")
        return INVALID
    [(field, pattern)] = value.items()
    if field not in VO_SOURCES:
        problems.add(path + (field,), f"cannot derive a VO from {field!r}{did_you_mean(field, VO_SOURCES)}; "
                     f"use one of {', '.join(VO_SOURCES)}")
        return INVALID
    if read_string(problems, path + (field,), pattern) is INVALID:
        return INVALID
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        problems.add(path + (field,), f"not a valid regular expression: {error}")
        return INVALID
    if "vo" not in compiled.groupindex:
        problems.add(path + (field,), "the regular expression needs a named group (?P<vo>...)")
        return INVALID
    return VoRule(field=field, pattern=pattern)


def _parse_quantity(field: str, text: Any) -> Any:
    """One walltime, memory or cores value; raises QuantityError."""
    if field == "walltime":
        return Duration.parse(text)
    if field == "memory":
        return Size.parse(text)
    if isinstance(text, str):
        return 0 if text.strip() == "0" else parse_count(text.strip(), "cores")
    if isinstance(text, bool) or not isinstance(text, int) or not 0 <= text <= MAX:
        raise QuantityError(f"cores {shown(text)}: expected a whole number")
    return text


def read_quantity_predicate(problems: Problems, path: Path, field: str, value: Any) -> Any:
    try:
        if isinstance(value, list):
            if not value:
                raise QuantityError("an empty list matches nothing")
            items = [_parse_quantity(field, _quantity_text(problems, path + (i,), v)) for i, v in enumerate(value)]
            return Predicate(field, "any", tuple(items))
        text = _quantity_text(problems, path, value)
        if isinstance(text, str):
            stripped = text.strip()
            for op in OPERATORS:
                if stripped.startswith(op):
                    return Predicate(field, "compare", (_parse_quantity(field, stripped[len(op):].strip()),), op)
            if ".." in stripped:
                low, _, high = stripped.partition("..")
                bounds = (_parse_quantity(field, low.strip()), _parse_quantity(field, high.strip()))
                if bounds[0] > bounds[1]:
                    raise QuantityError(f"range {stripped!r} is empty: {low.strip()} is above {high.strip()}")
                return Predicate(field, "range", bounds)
        return Predicate(field, "any", (_parse_quantity(field, text),))
    except QuantityError as error:
        problems.add(path, f"{error} (a value, a list, a comparison like '< 10h', or a range like '1h..10h')")
        return INVALID


def read_name_predicate(problems: Problems, path: Path, field: str, value: Any) -> Any:
    items = value if isinstance(value, list) else [value]
    if not items:
        problems.add(path, "an empty list matches nothing")
        return INVALID
    names = [read_string(problems, path + (i,) if isinstance(value, list) else path, v) for i, v in enumerate(items)]
    return INVALID if INVALID in names else Predicate(field, "any", tuple(names))


def read_when(problems: Problems, path: Path, value: Any) -> Tuple[Predicate, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping of conditions, got {kind_of(value)}")
        return ()
    predicates: List[Predicate] = []
    for field, condition in value.items():
        if field not in WHEN_FIELDS:
            problems.add(path + (field,), f"cannot route on {field!r}{did_you_mean(field, WHEN_FIELDS)}; "
                         f"conditions: {', '.join(WHEN_FIELDS)}")
            continue
        reader = read_name_predicate if field in NAME_FIELDS else read_quantity_predicate
        predicate = reader(problems, path + (field,), field, condition)
        if predicate is not INVALID:
            predicates.append(predicate)
    return tuple(predicates)


def read_route(problems: Problems, path: Path, index: int, value: Any) -> Any:
    fields = read_fields(problems, path, value, ROUTE_FIELDS)
    if fields is None:
        return INVALID
    when = read_when(problems, path + ("when",), fields.pop("when", None))
    name = fields.pop("name", f"route-{index + 1}")
    rejecting = "reject" in fields
    routing = "queue" in fields or "environment" in fields
    if rejecting and (routing or "resources" in fields):
        problems.add(path, "a route either rejects or names a queue and an environment, not both")
        return INVALID
    if not rejecting:
        for key in ("queue", "environment"):
            if key not in fields and isinstance(value, dict) and key not in value:
                problems.add(path, f"missing {key!r} (or 'reject: \"reason\"')")
        if not {"queue", "environment"} <= fields.keys():
            return INVALID
    return Route(name=name, when=when, **fields)


def read_routes(problems: Problems, path: Path, value: Any) -> List[Tuple[int, Route]]:
    """The valid routes, each with its index in the file (for messages about it)."""
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, f"expected a list of routes, got {kind_of(value)}")
        return []
    routes = []
    for index, item in enumerate(value):
        route = read_route(problems, path + (index,), index, item)
        if route is not INVALID:
            routes.append((index, route))
    return routes


TOP_LEVEL = ("hypervisor", "host", "defaults", "vo_mapping", "environments", "queues", "routes")


def build_site_config(problems: Problems, data: Any, source: Optional[str]) -> SiteConfig:
    """Validate a whole document; raises ConfigError listing every problem."""
    top = read_fields(problems, (), data, {key: lambda p, path, v: v for key in TOP_LEVEL})
    if top is None:
        problems.raise_if_any()
    hypervisor = read_fields(problems, ("hypervisor",), top.get("hypervisor"), HYPERVISOR_FIELDS) or {}
    host = read_fields(problems, ("host",), top.get("host"), HOST_FIELDS) or {}
    defaults = read_fields(problems, ("defaults",), top.get("defaults"), DEFAULTS_FIELDS) or {}
    vo_rules = read_list_of(read_vo_rule)(problems, ("vo_mapping",), top.get("vo_mapping") or [])
    environments = read_named_section(problems, ("environments",), top.get("environments"), read_environment)
    queues = read_named_section(problems, ("queues",), top.get("queues"), read_queue)
    routes = read_routes(problems, ("routes",), top.get("routes"))
    config = SiteConfig(
        hypervisor=HypervisorConfig(**hypervisor),
        host=HostConfig(**host),
        defaults=Defaults(**defaults),
        vo_mapping=() if vo_rules is INVALID else vo_rules,
        environments=environments,
        queues=queues,
        routes=tuple(route for _, route in routes),
        source=source,
    )
    check_references(problems, config, [index for index, _ in routes])
    problems.raise_if_any()
    return config


def check_references(problems: Problems, config: SiteConfig, route_indices: List[int]) -> None:
    """What no single value can tell: names that must exist, uniqueness, fit on the host."""
    seen = set()
    for index, route in zip(route_indices, config.routes):
        where = ("routes", index)
        if route.name in seen:
            problems.add(where + ("name",), f"duplicate route name {route.name!r}")
        seen.add(route.name)
        if route.queue is not None and route.queue not in config.queues:
            problems.add(where + ("queue",), f"no queue named {route.queue!r}{did_you_mean(route.queue, config.queues)}")
        if route.environment is not None and route.environment not in config.environments:
            problems.add(
                where + ("environment",),
                f"no environment named {route.environment!r}{did_you_mean(route.environment, config.environments)}",
            )
    host = config.host
    owners: Dict[str, str] = {}
    for name, environment in config.environments.items():
        where = ("environments", name)
        if host.memory is not None and environment.memory > host.memory:
            problems.add(where + ("memory",), f"{environment.memory} is more than the host offers ({host.memory})")
        if host.vcpus is not None and environment.vcpus > host.vcpus:
            problems.add(where + ("vcpus",), f"{environment.vcpus} is more than the host offers ({host.vcpus})")
        for guest in environment.guests:
            if guest in owners:
                problems.add(where + ("guests",), f"guest {guest!r} is already listed by environment {owners[guest]!r}")
            owners[guest] = name
