"""The value types every layer speaks: frozen, comparable, free of side effects.

Quantities are ``Duration`` (seconds) and ``Size`` (bytes): ints that print with units.
Mappings inside a ``SiteConfig`` are read-only views.
"""

from __future__ import annotations

import enum
import types
from typing import Mapping, Optional, Tuple, Union

import attrs

from blahvm.quantities import Duration, Size


class Outcome(enum.Enum):
    """What a lifecycle step means for the batch system; each plugin maps it to its own codes."""

    OK = "ok"
    RETRY_ELSEWHERE = "retry-elsewhere"  # this host cannot now: no slot, hypervisor down
    FAIL_JOB = "fail-job"  # the job itself can never run here: unknown environment, bad image


FLAVOURS = ("kvm", "xen-pv", "xen-hvm")
CLONE_METHODS = ("overlay", "copy")
START_METHODS = ("auto", "boot")  # auto: from a saved post-boot state where one is usable, else boot
CONTEXTS = ("none", "cloud-init")  # cloud-init: a per-job NoCloud seed contextualises a stock image
DOMAIN_TYPES = ("auto", "kvm", "qemu")


# -- what the user asked for -------------------------------------------------------------------


@attrs.frozen
class Submission:
    """A job as submitted: everything here is user-controlled except what the batch system vouches for."""

    queue: Optional[str] = None
    vo: Optional[str] = None
    user: Optional[str] = None
    group: Optional[str] = None
    account: Optional[str] = None  # LSF project, PBS -A, Slurm --account
    walltime: Optional[Duration] = None
    memory: Optional[Size] = None
    cores: Optional[int] = None
    environment: Optional[str] = None  # the environment the user asked for, if any
    name: Optional[str] = None  # job name: shown and logged, never routed on


# -- what routing answers ----------------------------------------------------------------------


@attrs.frozen
class Decision:
    """Run the job in ``queue`` inside a guest of ``environment`` shaped ``memory`` × ``vcpus``."""

    queue: str
    environment: str
    rule: str
    vo: Optional[str]
    memory: Size
    vcpus: int
    walltime: Optional[Duration] = None
    resources: Optional[str] = None  # extra resource request for the batch system

    accepted = True


@attrs.frozen
class Rejection:
    """The job is refused; ``reason`` is shown to the user as is."""

    reason: str
    rule: Optional[str] = None  # the route that rejected, or None when no route matched

    accepted = False


RouteResult = Union[Decision, Rejection]


# -- the site's catalogue ------------------------------------------------------------------------


@attrs.frozen
class Environment:
    """A golden image and the guest shape it runs with (memory and vcpus are also the per-job maxima)."""

    name: str
    image: str
    flavour: str  # one of FLAVOURS
    memory: Size
    vcpus: int
    sha256: Optional[str] = None
    kernel: Optional[str] = None  # direct kernel boot
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    bootloader: Optional[str] = None  # xen-pv: e.g. /usr/bin/pygrub
    network: Optional[str] = None  # a libvirt network for the job's own traffic
    clone: str = "overlay"  # one of CLONE_METHODS
    scratch: Optional[Size] = None  # an extra empty disk of this size per job
    guests: Tuple[str, ...] = ()  # static environment: pre-defined guests to lease
    allow_root: bool = False  # the payload may ask to run as root in its guest (docs/security.md)
    start: str = "auto"  # one of START_METHODS; auto boots where the flavour cannot (templates.why_not)
    context: str = "none"  # one of CONTEXTS (docs/images.md, "Using a stock cloud image")
    # the site's cloud-config additions to every job's seed: canonical JSON (blahvm.config.cloud_config)
    user_data: Optional[str] = None
    ready_timeout: Optional[Duration] = None  # start to the agent's answer; None: the lifecycle's default


@attrs.frozen
class Queue:
    name: str
    max_walltime: Optional[Duration] = None
    slots_per_host: Optional[int] = None


Comparable = Union[Duration, Size, int]


@attrs.frozen
class Predicate:
    """One condition of a route's ``when``.

    kind ``any``: the fact equals one of ``values`` (names may be globs: ``cms*``);
    kind ``compare``: ``fact <op> values[0]`` with op in ``< <= > >= == !=``;
    kind ``range``: ``values[0] <= fact <= values[1]``.
    A fact the submission does not carry never matches.
    """

    field: str
    kind: str
    values: Tuple[Union[str, Comparable], ...]
    op: Optional[str] = None

    def describe(self) -> str:
        """The condition as a config would spell it: ``[cms, atlas]``, ``< 10h``, ``1h..10h``."""
        if self.kind == "compare":
            return f"{self.op} {self.values[0]}"
        if self.kind == "range":
            return f"{self.values[0]}..{self.values[1]}"
        if len(self.values) == 1:
            return str(self.values[0])
        return "[" + ", ".join(str(v) for v in self.values) + "]"


@attrs.frozen
class Route:
    name: str
    when: Tuple[Predicate, ...] = ()
    queue: Optional[str] = None
    environment: Optional[str] = None
    resources: Optional[str] = None
    reject: Optional[str] = None


@attrs.frozen
class VoRule:
    """Derive the VO from ``field`` (user, group or account) with a regex that has a ``vo`` group."""

    field: str
    pattern: str


@attrs.frozen
class HypervisorConfig:
    uri: str = "qemu:///system"
    pool: str = "blahvm"
    pool_path: str = "/var/lib/blahvm/clones"
    domain_type: str = "auto"  # kvm flavour: kvm, qemu (software emulation), or auto-detect
    timeout: Duration = Duration(20)  # bound on every libvirt call


@attrs.frozen
class HostConfig:
    max_guests: int = 1
    memory: Optional[Size] = None
    vcpus: Optional[int] = None
    state_dir: str = "/var/lib/blahvm"  # the ledger lives here
    run_dir: str = "/run/blahvm"  # per-job agent sockets
    log_file: Optional[str] = None  # hooks log here, one line per event; None: syslog


@attrs.frozen
class Defaults:
    """Applied to a submission that does not say, before routing."""

    walltime: Optional[Duration] = None
    memory: Optional[Size] = None
    cores: Optional[int] = None


def _frozen_mapping(value: Mapping) -> Mapping:
    return types.MappingProxyType(dict(value))


@attrs.frozen(eq=False)
class SiteConfig:
    """A whole, validated site configuration. Build it with ``blahvm.config.load_config``."""

    hypervisor: HypervisorConfig = HypervisorConfig()
    host: HostConfig = HostConfig()
    defaults: Defaults = Defaults()
    vo_mapping: Tuple[VoRule, ...] = ()
    environments: Mapping[str, Environment] = attrs.field(factory=dict, converter=_frozen_mapping)
    queues: Mapping[str, Queue] = attrs.field(factory=dict, converter=_frozen_mapping)
    routes: Tuple[Route, ...] = ()
    source: Optional[str] = None  # the file it was read from

    def _key(self) -> tuple:
        return (
            self.hypervisor,
            self.host,
            self.defaults,
            self.vo_mapping,
            tuple(self.environments.items()),
            tuple(self.queues.items()),
            self.routes,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SiteConfig):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


# -- a job on an execution host -----------------------------------------------------------------


@attrs.frozen
class Job:
    """A batch job the execution host is to run: its id, owner and the decision it runs under."""

    job_id: str
    user: str
    decision: Decision
    uid: Optional[int] = None
    gid: Optional[int] = None
    workdir: Optional[str] = None
    name: Optional[str] = None
