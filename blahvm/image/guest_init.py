"""The two init programs of the demo guest (busybox sh scripts), rendered at build time.

Stage one, in the initramfs, loads the block-device modules, waits for /dev/vda, mounts it and hands
over to stage two, ``/sbin/init`` on the root disk, which sets the guest up and runs the agent.
Module names come from the kernel package and the hostname from the kernel command line: neither is
ever evaluated by the shell.
"""

from __future__ import annotations

import re
from typing import Sequence

READY_LINE = "blahvm-guest: init ready"
AGENT_PATH = "/usr/lib/blahvm/agent.py"
AGENT_PORT = "org.blahvm.agent.0"
HOSTNAME_ARGUMENT = "blahvm.hostname"  # kernel command line: blahvm.hostname=NAME

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _module_list(modules: Sequence[str]) -> str:
    for name in modules:
        if not _MODULE_NAME.match(name):
            raise ValueError(f"kernel module name {name!r} is not a plain name")
    return " ".join(modules)


def initramfs_init(modules: Sequence[str], wait_seconds: int = 60) -> str:
    """``/init`` of the initramfs: ``modules`` (in load order) live in /lib/modules/NAME.ko."""
    return f"""#!/bin/busybox sh
# blahvm demo guest, stage one: find the root disk and switch to it.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "blahvm-guest: $*"; sync; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in {_module_list(modules)}; do
    insmod /lib/modules/$module.ko || fail "cannot load kernel module $module"
done
tries=0
while [ ! -b /dev/vda ]; do  # virtio disks appear asynchronously: poll
    tries=$((tries + 1))
    [ $tries -le {wait_seconds * 10} ] || fail "no root disk /dev/vda after {wait_seconds}s"
    sleep 0.1
done
mount -t ext4 /dev/vda /newroot || fail "cannot mount the root disk /dev/vda"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
"""


def root_init(modules: Sequence[str]) -> str:
    """``/sbin/init`` of the root disk: ``modules`` (in load order) live in /lib/modules/blahvm/."""
    return f"""#!/bin/sh
# blahvm demo guest, stage two: set the guest up, run the agent, power off when it exits.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
for module in {_module_list(modules)}; do
    insmod /lib/modules/blahvm/$module.ko || echo "blahvm-guest: cannot load kernel module $module"
done
hostname localhost
set -f  # the command line is split into words below, never globbed
for argument in $(cat /proc/cmdline); do
    case "$argument" in
        {HOSTNAME_ARGUMENT}=[A-Za-z0-9]*) hostname "${{argument#*=}}" ;;
    esac
done
ip link set lo up 2>/dev/null
echo "{READY_LINE}"
if [ -f {AGENT_PATH} ]; then
    python3 {AGENT_PATH} --port {AGENT_PORT}
    echo "blahvm-guest: agent exited with status $?"
else
    echo "blahvm-guest: no agent in this image"
fi
sync
poweroff -f
"""
