"""Where the real batch systems the LSF and PBS tests run come from: ``../shared/batch-systems`` beside
the checkout (sources, build scripts, drivers), built by ``scripts/setup-batch-systems``.

Without ``../shared`` (a user's own checkout) those tests skip with a reason that starts with
``NO_SHARED``; that one skip stays a skip under ``BLAHVM_STRICT=1`` (tests/conftest.py). Any other
reason (not built, not root) is a failure of the set-up there.
"""

from __future__ import annotations

import os
import subprocess
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BLAHVM_BATCH_SYSTEMS") or os.path.realpath(os.path.join(ROOT, "..", "shared",
                                                                                 "batch-systems"))
NO_SHARED = "no ../shared/batch-systems beside the checkout"
SUBMIT_USER = "rbuser"  # the drivers' submitting user; scripts/setup-batch-systems creates it


def unavailable(driver: str, built: str, what: str) -> Optional[str]:
    """None when ``driver`` (in SHARED) and the installed ``built`` file exist and we are root, else why not."""
    if not os.path.isfile(os.path.join(SHARED, driver)):
        return f"{NO_SHARED}: the real {what} tests need its sources and drivers"
    if os.geteuid() != 0:
        return f"a real {what} needs root"
    if not os.path.exists(built):
        return f"{what} is not built ({built} missing): run scripts/setup-batch-systems"
    return None


# -- the test site's libvirt leftovers ------------------------------------------------------------


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True)


def guests_of_pool(pool: str) -> List[str]:
    """The blahvm guests whose disks are in the test site's ``pool``: that site's, whatever made them."""
    return [name for name in virsh("list", "--all", "--name").stdout.split()
            if name.startswith("blahvm-") and pool in virsh("dumpxml", name).stdout]


def remove_pool_and_its_guests(pool: str) -> None:
    for name in guests_of_pool(pool):
        virsh("destroy", name)
        virsh("undefine", name)
    virsh("pool-destroy", pool)
    virsh("pool-undefine", pool)
