"""The site config: strict, every problem at once with file, line and key, never a traceback."""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blahvm.config import ConfigError, load_config, parse_config
from blahvm.config.dump import dump_config
from blahvm.model import Predicate
from blahvm.quantities import Duration, Size
from tests.strategies import site_configs

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "examples", "site.yaml")


def problems_of(text: str) -> list:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "site.yaml")
    return [str(p) for p in caught.value.problems]


def test_the_documented_example_loads():
    config = load_config(EXAMPLE)
    assert set(config.environments) == {"slc3", "slc4"}
    assert config.queues["long"].max_walltime == Duration.parse("72h")
    assert config.host.memory == Size.parse("14GiB")
    assert config.routes[1].when[2] == Predicate("walltime", "range", (Duration(36000), Duration(259200)))
    assert config.source == EXAMPLE


def test_every_problem_is_reported_at_once_with_line_and_key():
    text = """\
hypervisor:
  uri: qemu:///system
  timout: 20s
host: {max_guests: 0}
environments:
  slc4: {image: /i.qcow2, flavour: kvm, memory: 2Gb, vcpus: 1}
  slc5: {image: relative.qcow2, flavour: vmware, memory: 2GiB, vcpus: 1}
queues:
  short: {max_walltime: 10x}
routes:
  - name: a
    when: {vo: cms, walltime: "< 10 hours", colour: red}
    queue: shrot
    environment: slc4
  - name: a
    queue: short
    environment: slc9
"""
    assert problems_of(text) == [
        "site.yaml:3: hypervisor.timout: unknown key (did you mean 'timeout'?); known keys: uri, pool, pool_path, "
        "domain_type, timeout",
        "site.yaml:4: host.max_guests: expected a whole number of at least 1, got 0 (a number)",
        "site.yaml:7: environments.slc5.image: 'relative.qcow2' must be an absolute path without '..'",
        "site.yaml:7: environments.slc5.flavour: 'vmware' is not one of kvm, xen-pv, xen-hvm",
        "site.yaml:9: queues.short.max_walltime: duration '10x': expected e.g. 90m, 10h, 2d, 1h30m or HH:MM:SS",
        "site.yaml:12: routes[0].when.walltime: duration '10 hours': expected e.g. 90m, 10h, 2d, 1h30m or HH:MM:SS "
        "(a value, a list, a comparison like '< 10h', or a range like '1h..10h')",
        "site.yaml:12: routes[0].when.colour: cannot route on 'colour'; conditions: queue, vo, user, group, "
        "account, environment, walltime, memory, cores",
        "site.yaml:13: routes[0].queue: no queue named 'shrot' (did you mean 'short'?)",
        "site.yaml:15: routes[1].name: duplicate route name 'a'",
        "site.yaml:17: routes[1].environment: no environment named 'slc9' (did you mean 'slc4'?)",
    ]


def test_zero_quantities_are_refused():
    assert problems_of("host: {memory: 0}\nqueues: {q: {max_walltime: '0:00'}}") == [
        "site.yaml:1: host.memory: must be larger than 0B",
        "site.yaml:2: queues.q.max_walltime: must be longer than 0s",
    ]


def test_sizes_follow_the_documented_rules():
    config = parse_config("environments: {e: {image: /i, flavour: kvm, memory: 2Gb, vcpus: 1}}")
    assert config.environments["e"].memory == 2 * 10**9  # two-letter SI units are decimal


def test_yaml_clock_values_are_read_as_written():
    config = parse_config("queues: {q: {max_walltime: 1:30}}\ndefaults: {walltime: 10:00:00}")
    assert config.queues["q"].max_walltime == 90  # M:S, as PBS reads it (YAML 1.1 would agree here)
    assert config.defaults.walltime == 36000


def test_structural_mistakes():
    assert problems_of("- just\n- a list\n") == ["site.yaml:1: expected a mapping, got a list"]
    assert problems_of("routes: {a: 1}") == ["site.yaml:1: routes: expected a list of routes, got a mapping"]
    assert problems_of("routes:\n  - {name: r, queue: q, reject: nope}\nqueues: {q: {}}") == [
        "site.yaml:2: routes[0]: a route either rejects or names a queue and an environment, not both"]
    assert problems_of("routes:\n  - {name: r}") == [
        "site.yaml:2: routes[0]: missing 'queue' (or 'reject: \"reason\"')",
        "site.yaml:2: routes[0]: missing 'environment' (or 'reject: \"reason\"')",
    ]
    assert problems_of("vo_mapping: [{user: '^cms'}]") == [
        "site.yaml:1: vo_mapping[0].user: the regular expression needs a named group (?P<vo>...)"]
    assert problems_of("queues: {q: {}}\nqueues: {r: {}}") == ["site.yaml:2: queues: given twice; the first one "
                                                               "would count"]
    assert problems_of("routes: [{reject: nope, when: {vo: no}}]") == [
        "site.yaml:1: routes[0].when.vo: expected a non-empty string, got false (a yes/no value); quote it"]
    assert "yes" in parse_config("environments: {yes: {image: /i, flavour: kvm, memory: 1G, vcpus: 1}}").environments


def test_environments_must_fit_the_host():
    assert problems_of("host: {memory: 1GiB, vcpus: 2}\n"
                       "environments: {big: {image: /i, flavour: kvm, memory: 2GiB, vcpus: 4}}") == [
        "site.yaml:2: environments.big.memory: 2GiB is more than the host offers (1GiB)",
        "site.yaml:2: environments.big.vcpus: 4 is more than the host offers (2)",
    ]


def test_unreadable_and_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the config: No such file or directory"):
        load_config(str(tmp_path / "missing.yaml"))
    assert problems_of("a: [1, 2\n") [0].startswith("site.yaml:2: not valid YAML")
    assert problems_of(b"\xff\xfe") == ["site.yaml: not UTF-8 text (byte 0)"]
    assert problems_of("x: !!python/object:os.system {}") == [
        "site.yaml:1: unsupported tag 'tag:yaml.org,2002:python/object:os.system'"]
    assert problems_of("x: !!python/name:os.system ''") == [
        "site.yaml:1: unsupported tag 'tag:yaml.org,2002:python/name:os.system'"]


def test_alias_bombs_are_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefg", "bcdefgh"))
    assert problems_of(bomb) == ["site.yaml: more than 100000 values (aliases expanded); refusing to read it"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(site_configs())
def test_dump_then_load_round_trips(config):
    assert parse_config(dump_config(config)) == config


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["10h", "< 2GiB", "kvm"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["hypervisor", "host", "routes", "queues", "environments", "when", "name", "queue",
                         "memory", "vcpus", "image", "flavour", "reject", "vo", "walltime", "x"]),
        children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_any_document_gives_a_config_or_a_config_error(document):
    try:
        parse_config(yaml.safe_dump(document))
    except ConfigError as error:
        assert error.problems and all(str(p) for p in error.problems)


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_garbage_gives_a_clean_error(raw):
    try:
        parse_config(raw)
    except ConfigError as error:
        assert "\n" not in str(error.problems[0])
