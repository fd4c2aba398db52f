"""Hypothesis strategies for site configs and submissions, small enough to collide often."""

from __future__ import annotations

from hypothesis import strategies as st

from blahvm.model import (
    Defaults,
    Environment,
    HostConfig,
    Predicate,
    Queue,
    Route,
    SiteConfig,
    Submission,
    VoRule,
)
from blahvm.quantities import Duration, Size

VOS = ["cms", "atlas", "lhcb", "alice"]
USERS = ["cms001", "atlas042", "lhcb7", "alice", "root"]
GROUPS = ["cms", "atlas", "users"]
QUEUES = ["grid", "short", "long", "q1"]
ENVIRONMENTS = ["slc3", "slc4", "el9"]

HOURS = [Duration(h * 3600) for h in (1, 2, 10, 24, 72)]
SIZES = [Size(s * 1024**3) for s in (1, 2, 4, 8)]
CORES = [1, 2, 4, 8]


def _name_predicate(field, pool):
    values = st.lists(st.sampled_from(pool + ["*", pool[0][:2] + "*"]), min_size=1, max_size=3, unique=True)
    return values.map(lambda vs: Predicate(field, "any", tuple(vs)))


def _quantity_predicate(field, pool):
    any_of = st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True).map(
        lambda vs: Predicate(field, "any", tuple(vs)))
    compare = st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), st.sampled_from(pool)).map(
        lambda t: Predicate(field, "compare", (t[1],), t[0]))
    ranged = st.lists(st.sampled_from(pool), min_size=2, max_size=2).map(
        lambda vs: Predicate(field, "range", tuple(sorted(vs))))
    return st.one_of(any_of, compare, ranged)


PREDICATES = {
    "queue": _name_predicate("queue", QUEUES),
    "vo": _name_predicate("vo", VOS),
    "user": _name_predicate("user", USERS),
    "group": _name_predicate("group", GROUPS),
    "environment": _name_predicate("environment", ENVIRONMENTS),
    "walltime": _quantity_predicate("walltime", HOURS),
    "memory": _quantity_predicate("memory", SIZES),
    "cores": _quantity_predicate("cores", CORES),
}


@st.composite
def whens(draw):
    fields = draw(st.lists(st.sampled_from(sorted(PREDICATES)), max_size=3, unique=True))
    return tuple(draw(PREDICATES[f]) for f in fields)


@st.composite
def site_configs(draw, max_routes=8):
    env_names = draw(st.lists(st.sampled_from(ENVIRONMENTS), min_size=1, unique=True))
    environments = {
        name: Environment(name=name, image=f"/images/{name}.qcow2", flavour=draw(st.sampled_from(["kvm", "xen-pv"])),
                          memory=draw(st.sampled_from(SIZES)), vcpus=draw(st.sampled_from(CORES)))
        for name in env_names
    }
    queue_names = draw(st.lists(st.sampled_from(QUEUES), min_size=1, unique=True))
    queues = {
        name: Queue(name=name, max_walltime=draw(st.none() | st.sampled_from(HOURS)),
                    slots_per_host=draw(st.none() | st.integers(1, 4)))
        for name in queue_names
    }
    routes = []
    for index in range(draw(st.integers(0, max_routes))):
        when = draw(whens())
        if draw(st.integers(0, 4)) == 0:
            routes.append(Route(name=f"r{index}", when=when, reject=f"no {index}"))
        else:
            routes.append(Route(name=f"r{index}", when=when, queue=draw(st.sampled_from(queue_names)),
                                environment=draw(st.sampled_from(env_names)),
                                resources=draw(st.none() | st.just("select[x]"))))
    vo_mapping = draw(st.lists(st.sampled_from([
        VoRule("user", r"^(?P<vo>[a-z]+)[0-9]{3}$"),
        VoRule("group", r"^(?P<vo>cms|atlas)$"),
        VoRule("user", r"^(?P<vo>lhcb)"),
    ]), max_size=2, unique=True))
    defaults = Defaults(walltime=draw(st.none() | st.sampled_from(HOURS)),
                        memory=draw(st.none() | st.sampled_from(SIZES)),
                        cores=draw(st.none() | st.sampled_from(CORES)))
    return SiteConfig(host=HostConfig(max_guests=draw(st.integers(1, 8))), defaults=defaults,
                      vo_mapping=tuple(vo_mapping), environments=environments, queues=queues, routes=tuple(routes))


submissions = st.builds(
    Submission,
    queue=st.none() | st.sampled_from(QUEUES + ["other"]),
    vo=st.none() | st.sampled_from(VOS),
    user=st.none() | st.sampled_from(USERS),
    group=st.none() | st.sampled_from(GROUPS),
    walltime=st.none() | st.sampled_from(HOURS) | st.integers(0, 400000).map(Duration),
    memory=st.none() | st.sampled_from(SIZES) | st.integers(0, 16 * 1024**3).map(Size),
    cores=st.none() | st.integers(1, 16),
    environment=st.none() | st.sampled_from(ENVIRONMENTS + ["sl5"]),
)
