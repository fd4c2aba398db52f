"""What can go wrong in the hypervisor layer, each with the ``Outcome`` it means for the job.

Every message is one line and says what to do. The lifecycle layer can answer
``except HypervisorError as error: return error.outcome``.
"""

from __future__ import annotations

from blahvm.model import Outcome


class HypervisorError(Exception):
    """Base of every hypervisor-layer error. By default the host is at fault: try another one."""

    outcome = Outcome.RETRY_ELSEWHERE

    def __init__(self, message: str) -> None:
        # One line, whatever libvirt or the OS put in the text.
        super().__init__(" ".join(str(message).split()))


class HypervisorUnavailable(HypervisorError):
    """libvirt cannot be reached, refused us, or lost the connection."""


class HypervisorTimeout(HypervisorUnavailable):
    """A libvirt call did not answer within the configured bound (a wedged libvirtd)."""


class LibvirtCallFailed(HypervisorError):
    """libvirt answered with an error this host may not repeat elsewhere (e.g. out of space)."""


class NotFound(LibvirtCallFailed):
    """The domain, volume or pool named does not exist (callers that tear down treat it as done)."""


class DefinitionRejected(HypervisorError):
    """libvirt refused the guest or volume definition: the environment cannot run as configured."""

    outcome = Outcome.FAIL_JOB


class SpecError(HypervisorError, ValueError):
    """A guest description that cannot be turned into a domain (bad name, path or value)."""

    outcome = Outcome.FAIL_JOB


class MetadataError(HypervisorError, ValueError):
    """A domain's blahvm metadata is present but unreadable."""


class ImageError(HypervisorError):
    """A golden image is unsafe or damaged: no host can run the job with it until it is fixed."""

    outcome = Outcome.FAIL_JOB


class StorageError(HypervisorError):
    """The clone pool or a volume is in a state blahvm cannot use (retry elsewhere)."""


class VolumeExists(StorageError):
    """A clone of that name already exists; delete it first if a fresh one is wanted."""


class ImageMissing(HypervisorError):
    """The golden image is not on this host (another host may have it): retry elsewhere."""
