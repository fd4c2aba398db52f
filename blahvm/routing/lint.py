"""Find what a config says but can never do: shadowed routes, unused environments and queues.

Reports are conservative: a route is called shadowed or unreachable only when that is certain,
so a reported route truly never decides anything (a property the tests check by routing).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import List, Optional, Sequence, Tuple

import attrs

from blahvm.model import Predicate, Route, SiteConfig
from blahvm.routing.table import is_glob

INFINITY = float("inf")
Interval = Tuple[float, float]


@attrs.frozen
class Finding:
    kind: str  # shadowed | unreachable | unused-environment | unused-queue | over-limit
    subject: str  # the route, environment or queue concerned
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def intervals(predicate: Predicate) -> List[Interval]:
    """The whole numbers a quantity condition admits, as closed intervals."""
    if predicate.kind == "range":
        return [(predicate.values[0], predicate.values[1])]
    if predicate.kind == "any":
        return [(v, v) for v in predicate.values]
    v = predicate.values[0]
    return {
        "<": [(0, v - 1)],
        "<=": [(0, v)],
        ">": [(v + 1, INFINITY)],
        ">=": [(v, INFINITY)],
        "==": [(v, v)],
        "!=": [(0, v - 1), (v + 1, INFINITY)],
    }[predicate.op]


def _nonempty(spans: Sequence[Interval]) -> List[Interval]:
    return [(low, high) for low, high in spans if low <= high]


def implies(narrow: Predicate, wide: Predicate) -> bool:
    """Every value ``narrow`` admits, ``wide`` admits too (False when unsure)."""
    if narrow.field in ("walltime", "memory", "cores"):
        return all(
            any(wl <= low and high <= wh for wl, wh in intervals(wide))
            for low, high in _nonempty(intervals(narrow))
        )
    wide_exact = {v for v in wide.values if not is_glob(v)}
    wide_globs = [v for v in wide.values if is_glob(v)]
    for value in narrow.values:
        if is_glob(value):
            if value not in wide_globs and "*" not in wide_globs:
                return False
        elif value not in wide_exact and not any(fnmatchcase(value, g) for g in wide_globs):
            return False
    return True


def _condition(route: Route, field: str) -> Optional[Predicate]:
    return next((p for p in route.when if p.field == field), None)


def admits_nothing(route: Route) -> Optional[str]:
    for predicate in route.when:
        if predicate.field in ("walltime", "memory", "cores") and not _nonempty(intervals(predicate)):
            return f"its {predicate.field} condition {predicate.describe()} admits no value"
    wanted = _condition(route, "environment")
    if route.environment is not None and wanted is not None and not implies(
        Predicate("environment", "any", (route.environment,)), wanted
    ) and not any(is_glob(v) for v in wanted.values):
        return f"it is only for jobs asking for {wanted.describe()} but gives {route.environment}"
    return None


def covers(earlier: Route, later: Route) -> bool:
    """``earlier`` takes every job ``later`` would match, so ``later`` never decides."""
    for wide in earlier.when:
        narrow = _condition(later, wide.field)
        if narrow is None or not implies(narrow, wide):
            return False
    if earlier.reject is not None:
        return True
    # a routing route steps aside for a job asking for another environment than its own
    if later.reject is None and later.environment == earlier.environment:
        return True
    wanted = _condition(later, "environment")
    return wanted is not None and not any(is_glob(v) for v in wanted.values) \
        and set(wanted.values) == {earlier.environment}


def lint(config: SiteConfig) -> List[Finding]:
    findings: List[Finding] = []
    live: List[Route] = []
    for route in config.routes:
        why = admits_nothing(route)
        if why:
            findings.append(Finding("unreachable", route.name, f"route {route.name} can never match: {why}"))
            continue
        shadow = next((earlier for earlier in live if covers(earlier, route)), None)
        if shadow is not None:
            findings.append(Finding("shadowed", route.name,
                                    f"route {route.name} can never match: route {shadow.name} above it takes "
                                    "every job it would"))
            continue
        live.append(route)
        findings.extend(_over_limit(config, route))
    used_environments = {r.environment for r in config.routes if r.environment}
    for name in config.environments:
        if name not in used_environments:
            findings.append(Finding("unused-environment", name, f"environment {name}: no route uses it"))
    routed_to = {r.queue for r in config.routes if r.queue}
    matched_on = {v for r in config.routes for p in r.when if p.field == "queue" for v in p.values}
    for name in config.queues:
        if name not in routed_to and not any(fnmatchcase(name, v) for v in matched_on):
            findings.append(Finding("unused-queue", name,
                                    f"queue {name}: no route sends jobs to it or matches on it"))
    return findings


def _over_limit(config: SiteConfig, route: Route) -> List[Finding]:
    """A route that accepts more than its queue or environment allows rejects those jobs."""
    if route.reject is not None:
        return []
    queue = config.queues[route.queue]
    environment = config.environments[route.environment]
    limits = (
        ("walltime", queue.max_walltime, f"queue {queue.name}'s max_walltime"),
        ("memory", environment.memory, f"environment {environment.name}'s memory"),
        ("cores", environment.vcpus, f"environment {environment.name}'s vcpus"),
    )
    findings = []
    for field, limit, what in limits:
        if limit is None:
            continue
        condition = _condition(route, field)
        bounded = condition is not None and implies(condition, Predicate(field, "compare", (limit,), "<="))
        default = getattr(config.defaults, field)
        if condition is None and default is not None and default > limit:
            findings.append(Finding("over-limit", route.name,
                                    f"route {route.name}: the default {field} {default} is above {what} {limit}"))
        elif condition is not None and not bounded:
            findings.append(Finding("over-limit", route.name,
                                    f"route {route.name} accepts {field} {condition.describe()}, above {what} "
                                    f"{limit}; such jobs are rejected"))
    return findings
