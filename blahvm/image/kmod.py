"""Kernel modules of an unpacked kernel package: what each depends on, and an order to load them.

A kernel .deb ships no modules.dep (depmod writes it at install time), so the dependencies are read
from each module's own ``.modinfo`` ELF section, as depmod and modinfo do.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, Iterable, List, Mapping, Tuple


class ModuleError(ValueError):
    """A module file that cannot be read, or a module that is not in the kernel package."""


def modinfo(elf: bytes) -> Dict[str, str]:
    """The ``key=value`` strings of an ELF64 little-endian module's ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not an ELF64 little-endian kernel module")
    try:
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

        def section(index: int) -> Tuple[int, int, int]:
            base = shoff + index * shentsize
            (name,) = struct.unpack_from("<I", elf, base)
            offset, size = struct.unpack_from("<QQ", elf, base + 24)
            return name, offset, size

        _, names_offset, _ = section(shstrndx)
        for index in range(shnum):
            name, offset, size = section(index)
            end = elf.index(b"\0", names_offset + name)
            if elf[names_offset + name : end] == b".modinfo":
                info = {}
                for item in elf[offset : offset + size].split(b"\0"):
                    key, sep, value = item.decode("utf-8", "replace").partition("=")
                    if sep:
                        info.setdefault(key, value)
                return info
    except (struct.error, ValueError):
        raise ModuleError("truncated or malformed ELF module") from None
    raise ModuleError("module has no .modinfo section")


def module_name(filename: str) -> str:
    """``virtio_pci.ko`` and ``virtio-pci.ko`` are both the module ``virtio_pci``."""
    return os.path.basename(filename).split(".ko")[0].replace("-", "_")


def index_modules(modules_dir: str) -> Dict[str, str]:
    """The path of every ``.ko`` under ``modules_dir``, by module name."""
    paths: Dict[str, str] = {}
    for directory, _, files in os.walk(modules_dir):
        for filename in files:
            if filename.endswith(".ko"):
                paths[module_name(filename)] = os.path.join(directory, filename)
    return paths


def dependencies(paths: Mapping[str, str], wanted: Iterable[str]) -> Dict[str, Tuple[str, ...]]:
    """The dependency map of ``wanted`` and everything they pull in, read from the module files."""
    depends: Dict[str, Tuple[str, ...]] = {}
    pending = list(wanted)
    while pending:
        name = pending.pop()
        if name in depends:
            continue
        if name not in paths:
            raise ModuleError(f"kernel module {name} is not in the kernel package")
        with open(paths[name], "rb") as module:
            listed = modinfo(module.read()).get("depends", "")
        depends[name] = tuple(module_name(dep) for dep in listed.split(",") if dep)
        pending.extend(depends[name])
    return depends


def load_order(
    wanted: Iterable[str], depends: Mapping[str, Iterable[str]], loaded: Iterable[str] = ()
) -> List[str]:
    """Modules to load, each after its dependencies, skipping ``loaded``; in the order first wanted."""
    order: List[str] = []
    done = set(loaded)
    visiting: set = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ModuleError(f"kernel module {name} depends on itself")
        if name not in depends:
            raise ModuleError(f"kernel module {name} has no known dependencies")
        visiting.add(name)
        for dep in depends[name]:
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
