"""The job's working directory as its guest sees it: pinned on the host, served by a jailed virtiofsd.

- ``pinning``: the directory is opened component by component from ``/`` without following links, its
  owner checked on that descriptor, and that very directory bind-mounted (``nosuid,nodev``) onto a
  root-only mount point under the share root, which is what the guest's virtiofsd exports. Renaming
  a parent afterwards changes nothing. ``release`` undoes it; ``leftovers`` finds what a crash left.
- ``jail``: the program libvirt starts instead of virtiofsd (``<binary path=...>``). It runs
  virtiofsd as the job's uid in a user namespace that maps only the job's uid and gids, under a
  seccomp filter (``seccomp``) that refuses set-id mode bits. The kernel itself then refuses files
  owned by anyone else, chown to anyone else, and set-id bits, whatever uid asks in the guest.
- ``mounts``: mount(2)/umount2(2) and /proc/self/mountinfo.

stdlib and attrs only; no libvirt (docs/jobfiles.md says why each piece is there).
"""

from blahvm.jobshare.pinning import (
    Identity,
    ShareRefused,
    check_owned_dir,
    share_gids,
    leftovers,
    mount_point,
    pin,
    release,
    share_root,
    shared_mounts,
)

__all__ = [
    "Identity",
    "ShareRefused",
    "check_owned_dir",
    "share_gids",
    "leftovers",
    "mount_point",
    "pin",
    "release",
    "share_root",
    "shared_mounts",
]
