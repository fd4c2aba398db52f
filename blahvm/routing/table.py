"""The compiled route table: the one routing engine, on plain data.

A ``SiteConfig``'s routes compile to nested tuples of str, int and None (``compile_table``),
which ``marshal`` can store and load in microseconds. ``RouteTable`` turns them into matchers
and decides. This module imports nothing beyond the standard library's cheapest parts, because
it runs on every job submission in a fresh interpreter (see ``blahvm.routing.fast``).

Semantics: facts get the site's defaults and, when the batch system gave no VO, a VO from
``vo_mapping``; then the first route whose conditions all hold wins. A fact the submission
does not carry fails any condition on it. A route that would give a different environment
than the one the user asked for does not match. The winning route's decision must fit its
queue's ``max_walltime`` and its environment's memory and vcpus, or the job is rejected
saying which limit it breaks.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs more to import than the whole decision
    from typing import Any, Callable, List, Optional, Sequence, Tuple

    Facts = Tuple[Any, ...]  # one value (or None) per FIELDS entry
    # ("route", rule, queue, environment, vo, memory, vcpus, walltime, resources)
    # ("reject", rule or None, reason)
    Result = Tuple[Any, ...]

from blahvm.quantities import Duration, Size

FORMAT = 1

FIELDS = ("queue", "vo", "user", "group", "account", "walltime", "memory", "cores", "environment")
QUEUE, VO, USER, GROUP, ACCOUNT, WALLTIME, MEMORY, CORES, ENVIRONMENT = range(len(FIELDS))
NAME_FIELDS = frozenset((QUEUE, VO, USER, GROUP, ACCOUNT, ENVIRONMENT))

def is_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def show(field: int, value: Any) -> str:
    """A fact as a person would write it."""
    if value is None:
        return "-"
    if field == WALLTIME:
        return str(Duration(value))
    if field == MEMORY:
        return str(Size(value))
    return str(value)


def compile_table(config: Any) -> tuple:
    """A ``SiteConfig`` as plain, marshal-able data."""
    defaults = config.defaults
    routes = []
    for route in config.routes:
        predicates = tuple(
            (
                FIELDS.index(p.field),
                p.kind,
                p.op,
                tuple(v if isinstance(v, str) else int(v) for v in p.values),
                p.describe(),
            )
            for p in route.when
        )
        if route.reject is not None:
            action: tuple = ("reject", route.reject)
        else:
            queue = config.queues[route.queue]
            environment = config.environments[route.environment]
            action = (
                "route",
                route.queue,
                route.environment,
                route.resources,
                None if queue.max_walltime is None else int(queue.max_walltime),
                int(environment.memory),
                environment.vcpus,
            )
        routes.append((route.name, predicates, action))
    return (
        FORMAT,
        tuple(None if v is None else int(v) for v in (defaults.walltime, defaults.memory, defaults.cores)),
        tuple((FIELDS.index(rule.field), rule.pattern) for rule in config.vo_mapping),
        tuple(routes),
    )


def _matcher(field: int, kind: str, op: Optional[str], values: tuple) -> Callable[[Any], bool]:
    if kind == "compare":
        limit = values[0]
        return {
            "<": lambda v: v < limit,
            "<=": lambda v: v <= limit,
            ">": lambda v: v > limit,
            ">=": lambda v: v >= limit,
            "==": lambda v: v == limit,
            "!=": lambda v: v != limit,
        }[op]
    if kind == "range":
        low, high = values
        return lambda v: low <= v <= high
    exact = frozenset(v for v in values if not (field in NAME_FIELDS and is_glob(v)))
    globs = tuple(v for v in values if field in NAME_FIELDS and is_glob(v))
    if not globs:
        return exact.__contains__

    def match(value: Any) -> bool:
        if value in exact:
            return True
        from fnmatch import fnmatchcase  # only sites that use globs pay for ``re``

        return any(fnmatchcase(value, pattern) for pattern in globs)

    return match


class _Route:
    __slots__ = ("name", "conditions", "action")

    def __init__(self, name: str, predicates: tuple, action: tuple):
        self.name = name
        # (field, matcher, description) per condition
        self.conditions = tuple((f, _matcher(f, k, op, vals), text) for f, k, op, vals, text in predicates)
        self.action = action

    def mismatch(self, facts: Facts) -> Optional[str]:
        """Why this route does not accept the facts, or None if it does."""
        for field, matches, text in self.conditions:
            value = facts[field]
            if value is None:
                return f"{FIELDS[field]} not given (route wants {text})"
            if not matches(value):
                return f"{FIELDS[field]} is {show(field, value)}, route wants {text}"
        wanted = facts[ENVIRONMENT]
        if wanted is not None and self.action[0] == "route" and self.action[2] != wanted:
            return f"environment {wanted} asked for, route gives {self.action[2]}"
        return None


class RouteTable:
    """Decides routes from compiled data; build once, decide many times."""

    def __init__(self, data: tuple):
        if not isinstance(data, tuple) or len(data) != 4 or data[0] != FORMAT:
            raise ValueError("not a route table of this version")
        _, self.defaults, self.vo_rules, routes = data
        self.data = data
        self.routes = tuple(_Route(*route) for route in routes)
        self._vo_patterns: Optional[list] = None
        self._index_field, self._buckets, self._others = self._build_index()

    # -- an index on the most discriminating name field, so a decision looks at few routes --

    def _build_index(self) -> Tuple[Optional[int], dict, tuple]:
        def exact_values(route: _Route, field: int) -> Optional[frozenset]:
            for f, matcher, _ in route.conditions:
                if f == field and isinstance(getattr(matcher, "__self__", None), frozenset):
                    return matcher.__self__
            return None

        best = None
        for field in sorted(NAME_FIELDS):
            sets = [exact_values(r, field) for r in self.routes]
            if all(s is None for s in sets):
                continue
            others = tuple(i for i, s in enumerate(sets) if s is None)
            values = set().union(*(s for s in sets if s is not None))
            buckets = {v: tuple(i for i, s in enumerate(sets) if s is None or v in s) for v in values}
            # the field whose buckets are smallest on average leaves the fewest routes to look at
            cost = sum(map(len, buckets.values())) / len(buckets)
            if best is None or cost < best[0]:
                best = (cost, field, buckets, others)
        if best is None:
            return None, {}, tuple(range(len(self.routes)))
        return best[1:]

    def candidates(self, facts: Facts) -> Sequence[int]:
        if self._index_field is None:
            return self._others
        return self._buckets.get(facts[self._index_field], self._others)

    # -- deciding ---------------------------------------------------------------------------

    def complete(self, facts: Facts) -> Facts:
        """Apply defaults and derive the VO when the batch system gave none."""
        walltime, memory, cores = self.defaults
        if (facts[WALLTIME] is None and walltime is not None) or (facts[MEMORY] is None and memory is not None) \
                or (facts[CORES] is None and cores is not None) or (facts[VO] is None and self.vo_rules):
            facts = list(facts)
            for field, default in ((WALLTIME, walltime), (MEMORY, memory), (CORES, cores)):
                if facts[field] is None:
                    facts[field] = default
            if facts[VO] is None:
                facts[VO] = self.derive_vo(facts)
            facts = tuple(facts)
        return facts

    def derive_vo(self, facts: Sequence[Any]) -> Optional[str]:
        if self._vo_patterns is None:
            import re

            self._vo_patterns = [(field, re.compile(pattern)) for field, pattern in self.vo_rules]
        for field, pattern in self._vo_patterns:
            value = facts[field]
            if value is not None:
                found = pattern.search(value)
                if found and found.group("vo"):
                    return found.group("vo")
        return None

    def decide(self, facts: Facts, trace: Optional[List[Tuple[str, Optional[str]]]] = None) -> Result:
        """The first route that accepts the facts decides. With ``trace``, every route looked at
        is recorded as (name, why it did not match, or None for the one that did)."""
        facts = self.complete(facts)
        order = range(len(self.routes)) if trace is not None else self.candidates(facts)
        for index in order:
            route = self.routes[index]
            why_not = route.mismatch(facts)
            if trace is not None:
                trace.append((route.name, why_not))
            if why_not is None:
                return self._act(route, facts)
        described = " ".join(f"{FIELDS[i]}={show(i, facts[i])}" for i in range(len(FIELDS)))
        return ("reject", None, f"no route accepts this job ({described})")

    def _act(self, route: _Route, facts: Facts) -> Result:
        action = route.action
        if action[0] == "reject":
            return ("reject", route.name, action[1])
        _, queue, environment, resources, max_walltime, env_memory, env_vcpus = action
        walltime, memory, cores = facts[WALLTIME], facts[MEMORY], facts[CORES]
        if max_walltime is not None and walltime is not None and walltime > max_walltime:
            return ("reject", route.name, f"walltime {show(WALLTIME, walltime)} exceeds the "
                    f"{show(WALLTIME, max_walltime)} limit of queue {queue} (route {route.name})")
        if memory is not None and memory > env_memory:
            return ("reject", route.name, f"memory {show(MEMORY, memory)} exceeds the "
                    f"{show(MEMORY, env_memory)} of environment {environment} (route {route.name})")
        if cores is not None and cores > env_vcpus:
            return ("reject", route.name, f"{cores} cores exceed the {env_vcpus} vcpus "
                    f"of environment {environment} (route {route.name})")
        return (
            "route", route.name, queue, environment, facts[VO],
            env_memory if memory is None else memory,
            env_vcpus if cores is None else cores,
            walltime if walltime is not None else max_walltime,
            resources,
        )
