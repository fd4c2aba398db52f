"""The two init programs of the demo guest (busybox sh scripts), rendered at build time.

Stage one, in the initramfs, loads the block-device modules, waits for /dev/vda, mounts it and hands
over to stage two, ``/sbin/init`` on the root disk, which sets the guest up, mounts the job's
directory and runs the agent. Module names come from the kernel package, the hostname and the job's
directory from the kernel command line: none of them is ever evaluated by the shell.

The job's directory travels as ``blahvm.workdir=<hex of its UTF-8 path>`` (``workdir_argument``):
hex has no spaces, quotes or other characters that could split the command line or mean something
to a shell. The guest decodes it with ``WORKDIR_DECODER`` (python3, the path passed as an argument,
never as code) and mounts the virtiofs tag ``WORKDIR_TAG`` there.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

READY_LINE = "blahvm-guest: init ready"
AGENT_PATH = "/usr/lib/blahvm/agent.py"
AGENT_PORTS = "org.blahvm.agent.*"  # every agent port the guest has: one per task that may run at once
HOSTNAME_ARGUMENT = "blahvm.hostname"  # kernel command line: blahvm.hostname=NAME
WORKDIR_ARGUMENT = "blahvm.workdir"  # kernel command line: blahvm.workdir=<hex of the UTF-8 path>
WORKDIR_TAG = "blahvm-workdir"  # the virtiofs tag of the job's directory
WORKDIR_MOUNT_OPTIONS = "nosuid,nodev"  # how stage two mounts it
MAX_WORKDIR_BYTES = 768  # hex doubles it; a kernel command line holds 2047 bytes in all

# Run in the guest as ``python3 -c WORKDIR_DECODER HEX``: prints the path (raw bytes, no newline)
# or refuses with a line on stderr and status 2. The same rules as ``check_workdir`` on the host.
WORKDIR_DECODER = r"""
import os, re, sys
def refuse(why):
    sys.stderr.write("blahvm-guest: bad job directory on the kernel command line: " + why + "\n")
    sys.exit(2)
text = sys.argv[1] if len(sys.argv) == 2 else ""
if not re.fullmatch("(?:[0-9a-f]{2})+", text) or len(text) > 2 * %d:
    refuse("not lower-case hex of at most %d bytes")
raw = bytes.fromhex(text)
try:
    path = raw.decode("utf-8")
except UnicodeDecodeError:
    refuse("not UTF-8")
if re.search("[\x00-\x1f\x7f]", path):
    refuse("control characters")
if not path.startswith("/") or path.startswith("//") or path == "/" or os.path.normpath(path) != path:
    refuse("not a normalised absolute path other than /")
sys.stdout.buffer.write(raw)
""" % (MAX_WORKDIR_BYTES, MAX_WORKDIR_BYTES)

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _is_plain_absolute(path: str) -> bool:
    return path.startswith("/") and not path.startswith("//") and path != "/" and os.path.normpath(path) == path


def check_workdir(path: str) -> None:
    """A ``ValueError`` unless the guest can mount ``path``: what ``WORKDIR_DECODER`` accepts."""
    if not isinstance(path, str) or not _is_plain_absolute(path):
        raise ValueError(f"{path!r} is not a normalised absolute path other than /")
    if re.search("[\x00-\x1f\x7f]", path):
        raise ValueError(f"{path!r} contains control characters")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{path!r} is not valid UTF-8") from None
    if size > MAX_WORKDIR_BYTES:
        raise ValueError(f"the path is {size} bytes long, more than the {MAX_WORKDIR_BYTES} a guest takes")


def workdir_argument(path: str) -> str:
    """``blahvm.workdir=<hex>``: the kernel argument that tells stage two where to mount ``path``."""
    check_workdir(path)
    return f"{WORKDIR_ARGUMENT}={path.encode('utf-8').hex()}"


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


def _quoted_decoder() -> str:
    if "'" in WORKDIR_DECODER:
        raise ValueError("the job directory decoder must fit in single quotes")
    return "'" + WORKDIR_DECODER + "'"


def root_init(modules: Sequence[str]) -> str:
    """``/sbin/init`` of the root disk: ``modules`` (in load order) live in /lib/modules/blahvm/."""
    return f"""#!/bin/sh
# blahvm demo guest, stage two: set the guest up, mount the job's directory, run the agent,
# power off when it exits.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
fail() {{ echo "blahvm-guest: $*"; sync; poweroff -f; exit 1; }}
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
workdir_hex=
set -f  # the command line is split into words below, never globbed
for argument in $(cat /proc/cmdline); do
    case "$argument" in
        {HOSTNAME_ARGUMENT}=[A-Za-z0-9]*) hostname "${{argument#*=}}" ;;
        {WORKDIR_ARGUMENT}=*) workdir_hex="${{argument#*=}}" ;;
    esac
done
ip link set lo up 2>/dev/null
if [ -n "$workdir_hex" ]; then  # a job without its files must not run: stop the guest instead
    workdir=$(python3 -c {_quoted_decoder()} "$workdir_hex") || fail "cannot decode the job's directory"
    mkdir -p -- "$workdir" || fail "cannot create the job's directory"
    # nosuid,nodev: a set-id file or device node in the job's files means nothing in its guest either
    mount -t virtiofs -o {WORKDIR_MOUNT_OPTIONS} {WORKDIR_TAG} "$workdir" \
        || fail "cannot mount the job's directory ({WORKDIR_TAG})"
fi
echo "{READY_LINE}"
if [ -f {AGENT_PATH} ]; then
    python3 {AGENT_PATH} --port '{AGENT_PORTS}'
    echo "blahvm-guest: agent exited with status $?"
else
    echo "blahvm-guest: no agent in this image"
fi
sync
poweroff -f
"""
