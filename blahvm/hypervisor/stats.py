"""What a running guest has used so far, from libvirt's domain statistics (``virConnectGetAllDomainStats``).

Read while the guest still runs: libvirt keeps no statistics of a domain once it is destroyed.
``usage_of`` is pure (the statistics dict in, a ``DomainUsage`` out); ``domain_usage`` asks libvirt.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

from blahvm.hypervisor import process
from blahvm.hypervisor.connection import Connection, libvirt
from blahvm.hypervisor.errors import NotFound
from blahvm.hypervisor.naming import check_safe_name

_NS = 1e-9
_ACTIVE = (1, 2, 3, 4, 7)  # virDomainState: running, blocked, paused, shutting down, pm-suspended


@attrs.frozen
class DomainUsage:
    """A running guest's consumption since it started (or, restored from a saved state, since the restore).

    ``cpu_seconds`` is every thread of the guest's QEMU (vcpus, emulator, I/O): what the host spent on
    the job (from /proc where QEMU is this host's process, else libvirt's ``cpu.time``).
    ``vcpu_seconds`` is the guest's vcpus alone. ``memory_bytes`` is QEMU's resident set now:
    without a balloon QEMU never hands back a page the guest touched, so it is the high-water mark of
    the guest's memory plus QEMU's own. Disk bytes are summed over every disk of the guest.
    """

    cpu_seconds: float
    vcpu_seconds: Optional[float]
    memory_bytes: Optional[int]
    disk_read_bytes: int
    disk_write_bytes: int


def usage_of(stats: Mapping[str, Any], process_cpu: Optional[float] = None) -> Optional[DomainUsage]:
    """The usage in one domain's statistics; None unless the domain is active (has a QEMU) and gives its CPU time.

    ``process_cpu``: QEMU's own CPU seconds from /proc, when known. It replaces libvirt's ``cpu.time``,
    which reads libvirt's cgroup of the guest and misses every thread moved into a batch job's cgroup."""
    # libvirt 9.0 answers cpu.time for a shut-off domain too, with libvirtd's own CPU time (the /proc of pid 0)
    if stats.get("state.state") not in _ACTIVE or "cpu.time" not in stats:
        return None
    vcpus = [value for key, value in stats.items() if key.startswith("vcpu.") and key.endswith(".time")]
    rss = stats.get("balloon.rss")  # KiB
    blocks = int(stats.get("block.count", 0))
    return DomainUsage(
        cpu_seconds=int(stats["cpu.time"]) * _NS if process_cpu is None else process_cpu,
        vcpu_seconds=sum(int(value) for value in vcpus) * _NS if vcpus else None,
        memory_bytes=None if rss is None else int(rss) * 1024,
        disk_read_bytes=sum(int(stats.get(f"block.{i}.rd.bytes", 0)) for i in range(blocks)),
        disk_write_bytes=sum(int(stats.get(f"block.{i}.wr.bytes", 0)) for i in range(blocks)),
    )


def domain_usage(conn: Connection, name: str) -> Optional[DomainUsage]:
    """The named guest's usage so far; None when it is gone or not running."""
    check_safe_name(name)
    module = libvirt()
    groups = (module.VIR_DOMAIN_STATS_STATE | module.VIR_DOMAIN_STATS_CPU_TOTAL | module.VIR_DOMAIN_STATS_BALLOON
              | module.VIR_DOMAIN_STATS_VCPU | module.VIR_DOMAIN_STATS_BLOCK)

    def read() -> Optional[dict]:
        domain = conn.raw.lookupByName(name)
        found = conn.raw.domainListGetStats([domain], groups, 0)
        return found[0][1] if found else None

    try:
        stats = conn.call(f"statistics of {name}", read)
    except NotFound:
        return None
    pid = process.qemu_pid(conn, name)
    return None if stats is None else usage_of(stats, None if pid is None else process.cpu_seconds_of(pid))
