"""Whether this host runs kvm-flavour guests as ``type='kvm'`` or ``type='qemu'`` (TCG).

The rule for ``domain_type: auto``: ``kvm`` when ``/dev/kvm`` exists *and* a hardware KVM module
(``kvm_intel`` or ``kvm_amd``) is loaded, else ``qemu``. ``/dev/kvm`` alone is not enough: inside a
cloud VM without nested virtualisation a paravirtual KVM (e.g. ``kvm_pvm``) provides ``/dev/kvm``
and libvirt advertises ``kvm``, yet stock guest kernels hang or die with "emulation failure" on it.
Reading two sysfs paths is cheap and honest; a site can always force ``kvm`` or ``qemu`` in the
config (``hypervisor.domain_type``).
"""

from __future__ import annotations

import os

from blahvm.hypervisor.errors import SpecError
from blahvm.model import DOMAIN_TYPES

HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")


def hardware_kvm_usable(root: str = "/") -> bool:
    """``/dev/kvm`` is present and backed by hardware virtualisation (under ``root``)."""
    if not os.path.exists(os.path.join(root, "dev/kvm")):
        return False
    return any(os.path.isdir(os.path.join(root, "sys/module", name)) for name in HARDWARE_KVM_MODULES)


def resolve_domain_type(configured: str, root: str = "/") -> str:
    """``kvm`` or ``qemu`` for a configured ``auto``, ``kvm`` or ``qemu``."""
    if configured not in DOMAIN_TYPES:
        raise SpecError(f"domain_type {configured!r} is not one of {', '.join(DOMAIN_TYPES)}")
    if configured != "auto":
        return configured
    return "kvm" if hardware_kvm_usable(root) else "qemu"
