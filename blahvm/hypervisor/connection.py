"""A libvirt connection whose every call is bounded by a timeout, with libvirt errors mapped.

A wedged libvirtd must not hang a batch hook: each call runs in a daemon thread and the caller
stops waiting after ``timeout`` seconds with ``HypervisorTimeout`` (the thread is abandoned; it
dies with the process). libvirt is imported on first use only, so the pure modules of this package
(and anything that imports them on a submit host) never load it.

Use: ``with open_connection("qemu:///system", timeout=20) as conn: conn.call("list", conn.raw.listAllDomains)``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

from blahvm.hypervisor.errors import (
    DefinitionRejected,
    HypervisorError,
    HypervisorTimeout,
    HypervisorUnavailable,
    LibvirtCallFailed,
    NotFound,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 20.0
_libvirt_module: Any = None


def libvirt() -> Any:
    """The libvirt module, imported once, with its default handler (which prints to stderr) off."""
    global _libvirt_module
    if _libvirt_module is None:
        try:
            import libvirt as module
        except ImportError:
            raise HypervisorUnavailable(
                "the libvirt Python binding is not installed: pip install libvirt-python"
            ) from None
        # Hooks must not chatter on stderr/stdout; errors reach us as exceptions anyway.
        module.registerErrorHandler(lambda _context, _error: None, None)
        _libvirt_module = module
    return _libvirt_module


def bounded(what: str, uri: str, timeout: float, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` if it returns within ``timeout`` seconds, with libvirt errors mapped."""
    outcome: dict = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the waiting caller
            outcome["error"] = error
        finally:
            finished.set()

    threading.Thread(target=run, name=f"libvirt: {what}", daemon=True).start()
    if not finished.wait(timeout):
        raise HypervisorTimeout(
            f"libvirt at {uri} did not answer '{what}' within {timeout:g}s: "
            "libvirtd may be wedged; check it on this host"
        )
    # emptied before raising: the error's traceback holds ``run``'s frame, whose closure holds
    # ``outcome``; kept, that cycle (and the connection in the error's frames) would outlive the
    # call until the cyclic collector runs, and keep test:///default's state alive with it
    error = outcome.pop("error", None)
    if error is None:
        return outcome.pop("value")
    if isinstance(error, libvirt().libvirtError):
        raise map_libvirt_error(error, what, uri) from None
    raise error


def map_libvirt_error(error: Any, what: str, uri: str) -> HypervisorError:
    """The blahvm error for a ``libvirt.libvirtError`` raised by ``what``."""
    module = libvirt()
    code, domain = error.get_error_code(), error.get_error_domain()
    message = error.get_error_message() or str(error)
    if domain in (module.VIR_FROM_RPC, module.VIR_FROM_REMOTE) or code in _codes(
        "NO_CONNECT", "INVALID_CONN", "AUTH_FAILED", "AUTH_CANCELLED", "AUTH_UNAVAILABLE", "RPC"
    ):
        return HypervisorUnavailable(f"libvirt at {uri} is unavailable ({what}): {message}")
    if code in _codes("NO_DOMAIN", "NO_STORAGE_POOL", "NO_STORAGE_VOL", "NO_NETWORK"):
        return NotFound(f"{what} on {uri}: {message}")
    if code in _codes("XML_ERROR", "XML_DETAIL", "XML_INVALID_SCHEMA", "CONFIG_UNSUPPORTED"):
        return DefinitionRejected(f"{what} on {uri} was refused: {message}")
    return LibvirtCallFailed(f"{what} on {uri} failed: {message}")


def _codes(*names: str) -> tuple:
    module = libvirt()
    return tuple(getattr(module, "VIR_ERR_" + name) for name in names if hasattr(module, "VIR_ERR_" + name))


class Connection:
    """An open libvirt connection. ``raw`` is the ``virConnect``; use it only inside ``call``."""

    def __init__(self, uri: str, raw: Any, timeout: float) -> None:
        self.uri = uri
        self.raw = raw
        self.timeout = timeout

    def call(self, what: str, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` (libvirt calls, or a closure of several) within the timeout."""
        if self.raw is None:
            raise HypervisorUnavailable(f"the connection to {self.uri} is closed ({what})")
        return bounded(what, self.uri, self.timeout, function, *args)

    def close(self) -> None:
        """Close, never raising and never waiting longer than the timeout."""
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                bounded("close", self.uri, self.timeout, raw.close)
            except HypervisorError:
                pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Connection({self.uri!r}, timeout={self.timeout:g})"


def open_connection(uri: str, timeout: Optional[float] = None) -> Connection:
    """Connect to ``uri`` (``qemu:///system``, ``xen:///system``, ``test:///default``...)."""
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    module = libvirt()
    try:
        raw = bounded("connect", uri, timeout, module.open, uri)
    except HypervisorUnavailable:
        raise
    except HypervisorError as error:  # whatever libvirt says, this host cannot serve us now
        raise HypervisorUnavailable(str(error)) from None
    if raw is None:  # very old bindings returned None instead of raising
        raise HypervisorUnavailable(f"cannot connect to libvirt at {uri}")
    return Connection(uri, raw, timeout)
