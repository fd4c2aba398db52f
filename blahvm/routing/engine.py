"""Routing on the model's types: ``route(config, submission) -> Decision | Rejection``."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import attrs

from blahvm.model import Decision, Rejection, RouteResult, SiteConfig, Submission
from blahvm.quantities import Duration, Size
from blahvm.routing.table import FIELDS, RouteTable, compile_table

if TYPE_CHECKING:
    from blahvm.routing.table import Facts, Result


def facts_of(submission: Submission) -> Facts:
    return tuple(getattr(submission, field) for field in FIELDS)


def result_of(result: Result) -> RouteResult:
    if result[0] == "reject":
        return Rejection(reason=result[2], rule=result[1])
    _, rule, queue, environment, vo, memory, vcpus, walltime, resources = result
    return Decision(
        queue=queue,
        environment=environment,
        rule=rule,
        vo=vo,
        memory=Size(memory),
        vcpus=vcpus,
        walltime=None if walltime is None else Duration(walltime),
        resources=resources,
    )


@attrs.frozen
class Step:
    """One route looked at while explaining: it matched (``why_not`` None) or why it did not."""

    rule: str
    why_not: Optional[str]


@attrs.frozen
class Explanation:
    result: RouteResult
    steps: Tuple[Step, ...]


class Router:
    """A site config compiled for routing; build once per config, route many submissions."""

    def __init__(self, config: SiteConfig):
        self.config = config
        self.table = RouteTable(compile_table(config))

    def route(self, submission: Submission) -> RouteResult:
        return result_of(self.table.decide(facts_of(submission)))

    def explain(self, submission: Submission) -> Explanation:
        trace: List[Tuple[str, Optional[str]]] = []
        result = result_of(self.table.decide(facts_of(submission), trace))
        return Explanation(result, tuple(Step(rule, why) for rule, why in trace))


_last: Optional[Router] = None


def route(config: SiteConfig, submission: Submission) -> RouteResult:
    """Route one submission; the compiled table of the last config used is kept."""
    global _last
    if _last is None or _last.config is not config:
        _last = Router(config)
    return _last.route(submission)
