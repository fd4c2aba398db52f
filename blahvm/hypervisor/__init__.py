"""The hypervisor layer: the only part of blahvm that talks to libvirt.

Modules, each with one job:

- ``spec``, ``metadata``, ``naming``, ``flavours``, ``domain``: pure domain-XML building and reading
  (no libvirt import; usable on a submit host or in tests without a daemon);
- ``images``: golden-image header and checksum checks before first use;
- ``connection``: a libvirt connection whose every call is bounded by a timeout;
- ``kvm``: whether this host can run ``type='kvm'`` guests or needs ``type='qemu'`` (TCG);
- ``storage``: clones (qcow2 overlays, full copies, scratch disks) through libvirt's storage API;
- ``guests``: define, start, stop, list and wait for blahvm's guests.

Every failure is a ``blahvm.hypervisor.errors.HypervisorError`` with a one-line message and the
``Outcome`` it means for the job.
"""
