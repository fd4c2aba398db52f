"""Routing: examples from a realistic site, and properties against a naive reference interpreter."""

from __future__ import annotations

import fnmatch
import operator
import re

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blahvm.config import parse_config
from blahvm.model import Decision, Rejection, Submission
from blahvm.quantities import Duration, Size
from blahvm.routing.engine import Router, route
from blahvm.routing.lint import lint
from blahvm.routing.table import RouteTable, compile_table
from tests.strategies import site_configs, submissions

SITE = """
host: {max_guests: 4, memory: 14GiB, vcpus: 8}
defaults: {cores: 1}
vo_mapping:
  - {user: "^(?P<vo>[a-z]+)[0-9]{3}$"}
  - {group: "^(?P<vo>[a-z]+)$"}
environments:
  slc4: {image: /images/slc4.qcow2, flavour: kvm, memory: 2GiB, vcpus: 2}
  slc3: {image: /images/slc3.qcow2, flavour: xen-pv, memory: 1GiB, vcpus: 1}
queues:
  grid: {}
  short: {max_walltime: 10h, slots_per_host: 2}
  long: {max_walltime: 72h, slots_per_host: 1}
routes:
  - name: cms-short
    when: {queue: grid, vo: cms, walltime: "< 10h"}
    queue: short
    environment: slc4
    resources: "select[blahvm_slc4]"
  - name: cms-long
    when: {queue: grid, vo: cms}
    queue: long
    environment: slc4
  - name: old-software
    when: {vo: [atlas, lhcb], environment: slc3}
    queue: long
    environment: slc3
  - name: atlas-any
    when: {vo: "atl*"}
    queue: long
    environment: slc4
  - name: nobody-else
    reject: "no execution environment is offered to this VO"
"""


@pytest.fixture(scope="module")
def site():
    return parse_config(SITE, "site.yaml")


def test_first_match_wins_and_vo_comes_from_pool_account(site):
    decision = route(site, Submission(queue="grid", user="cms001", walltime=Duration.parse("2h")))
    assert decision == Decision(queue="short", environment="slc4", rule="cms-short", vo="cms",
                                memory=Size.parse("2GiB"), vcpus=1, walltime=Duration.parse("2h"),
                                resources="select[blahvm_slc4]")


def test_a_later_route_takes_what_an_earlier_one_refuses(site):
    decision = route(site, Submission(queue="grid", vo="cms", walltime=Duration.parse("30h")))
    assert decision.rule == "cms-long" and decision.queue == "long"


def test_limits_are_never_silently_exceeded(site):
    too_long = route(site, Submission(queue="grid", vo="cms", walltime=Duration.parse("4d")))
    assert too_long == Rejection(reason="walltime 4d exceeds the 3d limit of queue long (route cms-long)",
                                 rule="cms-long")
    too_big = route(site, Submission(vo="atlas", memory=Size.parse("4GiB")))
    assert isinstance(too_big, Rejection) and "memory 4GiB exceeds the 2GiB of environment slc4" in too_big.reason
    too_wide = route(site, Submission(vo="atlas", cores=3))
    assert isinstance(too_wide, Rejection) and "3 cores exceed the 2 vcpus" in too_wide.reason


def test_the_environment_asked_for_is_honoured_or_refused(site):
    assert route(site, Submission(vo="atlas", environment="slc3")).environment == "slc3"
    assert route(site, Submission(vo="atlas")).environment == "slc4"
    refused = route(site, Submission(vo="atlas", environment="el9"))
    assert refused == Rejection(reason="no execution environment is offered to this VO", rule="nobody-else")


def test_group_mapping_and_reject_route(site):
    assert route(site, Submission(group="atlas")).rule == "atlas-any"
    assert route(site, Submission(user="alice")).rule == "nobody-else"


def test_no_match_says_what_was_submitted():
    config = parse_config(SITE.replace('  - name: nobody-else\n    reject: "no execution environment is offered to '
                                       'this VO"\n', ""))
    rejection = route(config, Submission(queue="grid", user="alice", walltime=Duration.parse("90m")))
    assert rejection.rule is None
    assert rejection.reason.startswith("no route accepts this job (queue=grid vo=- user=alice")
    assert "walltime=90m" in rejection.reason and "cores=1" in rejection.reason


def test_explain_says_why_each_earlier_route_did_not_match(site):
    explanation = Router(site).explain(Submission(vo="lhcb", environment="slc4"))
    assert [(s.rule, s.why_not) for s in explanation.steps] == [
        ("cms-short", "queue not given (route wants grid)"),
        ("cms-long", "queue not given (route wants grid)"),
        ("old-software", "environment is slc4, route wants slc3"),
        ("atlas-any", "vo is lhcb, route wants atl*"),
        ("nobody-else", None),
    ]
    assert explanation.result.rule == "nobody-else"


# -- properties -----------------------------------------------------------------------------------

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}


def reference_route(config, submission):
    """The rules as the docs state them, interpreted as plainly as possible."""
    s = submission
    d = config.defaults
    s = attrs.evolve(s, walltime=s.walltime if s.walltime is not None else d.walltime,
                     memory=s.memory if s.memory is not None else d.memory,
                     cores=s.cores if s.cores is not None else d.cores)
    if s.vo is None:
        for rule in config.vo_mapping:
            value = getattr(s, rule.field)
            found = value is not None and re.search(rule.pattern, value)
            if found and found.group("vo"):
                s = attrs.evolve(s, vo=found.group("vo"))
                break

    def holds(p):
        value = getattr(s, p.field)
        if value is None:
            return False
        if p.kind == "any":
            return any(value == v or (isinstance(v, str) and fnmatch.fnmatchcase(value, v)) for v in p.values)
        if p.kind == "range":
            return p.values[0] <= value <= p.values[1]
        return _OPS[p.op](value, p.values[0])

    for r in config.routes:
        if not all(holds(p) for p in r.when):
            continue
        if r.reject is not None:
            return ("reject", r.name)
        if s.environment is not None and s.environment != r.environment:
            continue
        queue, env = config.queues[r.queue], config.environments[r.environment]
        if queue.max_walltime is not None and s.walltime is not None and s.walltime > queue.max_walltime:
            return ("reject", r.name)
        if (s.memory is not None and s.memory > env.memory) or (s.cores is not None and s.cores > env.vcpus):
            return ("reject", r.name)
        return ("route", r.name, r.queue, r.environment, s.vo)
    return ("reject", None)


def summary(result):
    if isinstance(result, Rejection):
        return ("reject", result.rule)
    return ("route", result.rule, result.queue, result.environment, result.vo)


@settings(max_examples=300)
@given(site_configs(), st.lists(submissions, min_size=1, max_size=10))
def test_routing_agrees_with_the_reference_interpreter(config, subs):
    router = Router(config)
    for submission in subs:
        assert summary(router.route(submission)) == reference_route(config, submission)


@settings(max_examples=200)
@given(site_configs(), submissions)
def test_routing_is_total_deterministic_and_within_limits(config, submission):
    first = Router(config).route(submission)
    assert first == Router(config).route(submission) == route(config, submission)
    if isinstance(first, Rejection):
        assert first.reason
        return
    queue = config.queues[first.queue]
    environment = config.environments[first.environment]
    assert first.memory <= environment.memory and first.vcpus <= environment.vcpus
    if queue.max_walltime is not None:
        assert first.walltime is not None and first.walltime <= queue.max_walltime


@settings(max_examples=300)
@given(site_configs(), st.lists(submissions, min_size=1, max_size=20))
def test_a_route_lint_calls_unreachable_never_decides(config, subs):
    dead = {f.subject for f in lint(config) if f.kind in ("shadowed", "unreachable")}
    router = Router(config)
    for submission in subs:
        result = router.route(submission)
        assert result.rule not in dead or result.rule is None


@settings(max_examples=100)
@given(site_configs(), submissions)
def test_the_index_never_changes_a_decision(config, submission):
    table = RouteTable(compile_table(config))
    from blahvm.routing.engine import facts_of

    facts = facts_of(submission)
    assert table.decide(facts) == table.decide(facts, trace=[])


def test_lint_finds_shadowed_unused_and_over_limit():
    config = parse_config("""
environments:
  a: {image: /a, flavour: kvm, memory: 1GiB, vcpus: 1}
  b: {image: /b, flavour: kvm, memory: 1GiB, vcpus: 1}
queues: {grid: {}, short: {max_walltime: 10h}, spare: {}}
routes:
  - {name: wide, when: {vo: [cms, atlas]}, queue: short, environment: a}
  - {name: narrow, when: {vo: cms, walltime: "< 2h"}, queue: short, environment: a}
  - {name: other-env, when: {vo: cms}, queue: short, environment: a}
  - {name: impossible, when: {environment: b}, queue: short, environment: a}
  - {name: greedy, when: {queue: grid, walltime: "> 1h"}, queue: short, environment: a}
""")
    found = {(f.kind, f.subject) for f in lint(config)}
    assert found == {
        ("shadowed", "narrow"),
        ("shadowed", "other-env"),
        ("unreachable", "impossible"),
        ("over-limit", "greedy"),
        ("unused-environment", "b"),
        ("unused-queue", "spare"),
    }
