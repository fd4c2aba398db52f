"""The NoCloud seed: an ISO9660 image labelled ``cidata`` holding ``meta-data`` and ``user-data``,
made in memory with pycdlib (no external command). Rock Ridge and Joliet give the files their real
names (plain ISO9660 level 1 would turn ``meta-data`` into ``META_DAT.;1``)."""

from __future__ import annotations

import io
from typing import Dict, Mapping

import pycdlib

from blahvm.context.cloudinit import JobContext, meta_data, user_data

SEED_LABEL = "cidata"  # what cloud-init's NoCloud looks for (blkid LABEL)
SEED_FILES = ("meta-data", "user-data")


def seed_files(context: JobContext, site: "str | None" = None) -> Dict[str, bytes]:
    return {"meta-data": meta_data(context).encode("utf-8"), "user-data": user_data(context, site).encode("utf-8")}


def _iso_name(index: int) -> str:
    return f"/SEED{index}.;1"  # ISO9660's own name; readers see the Rock Ridge and Joliet names


def make_seed(files: Mapping[str, bytes]) -> bytes:
    """The ISO image holding ``files`` (plain names, at most 64 characters) at its root."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=SEED_LABEL, rock_ridge="1.09", joliet=3)
    try:
        for index, (name, data) in enumerate(sorted(files.items())):
            if not name or "/" in name or len(name) > 64 or not name.isprintable():
                raise ValueError(f"seed file name {name!r} is not a plain name")
            iso.add_fp(io.BytesIO(data), len(data), _iso_name(index), rr_name=name, joliet_path="/" + name)
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_seed(image: bytes) -> Dict[str, bytes]:
    """The files at the root of a seed image by their Rock Ridge names, and its label under ``""``."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        found: Dict[str, bytes] = {"": iso.pvd.volume_identifier.rstrip(b" ").decode("ascii")}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode("utf-8")
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path="/" + name)
            found[name] = out.getvalue()
        return found
    finally:
        iso.close()
