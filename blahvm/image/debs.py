"""Debian packages for an image: resolved with apt-cache, fetched once into a cache, unpacked with dpkg -x.

Packages come from the host's configured Debian archive and are checked against the SHA256 that the
archive's signed index gives for them before they are unpacked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Dict, Iterable, List, Sequence

import attrs

from blahvm.image.commands import run
from blahvm.image.errors import ImageBuildError

_APT_HINT = "run `apt-get update` (scripts/install-system-packages does) and check the Debian archive is reachable"


@attrs.frozen
class Package:
    name: str
    version: str
    filename: str  # the .deb's name in the archive pool, without directories
    sha256: str
    size: int


def parse_apt_show(text: str) -> List[Package]:
    """Packages described by ``apt-cache show --no-all-versions`` output, in order."""
    packages = []
    for stanza in text.split("\n\n"):
        fields: Dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace():
                key, sep, value = line.partition(":")
                if sep:
                    fields[key] = value.strip()
        if not fields:
            continue
        try:
            packages.append(
                Package(
                    name=fields["Package"],
                    version=fields["Version"],
                    filename=os.path.basename(fields["Filename"]),
                    sha256=fields["SHA256"].lower(),
                    size=int(fields["Size"]),
                )
            )
        except (KeyError, ValueError) as missing:
            raise ImageBuildError(f"apt-cache show gave a stanza without a usable {missing}") from None
    return packages


def parse_first_dependency(text: str) -> str:
    """The first ``Depends:`` of ``apt-cache depends`` output: what a metapackage stands for."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.lstrip("|") == "Depends" and value.strip():
            return value.strip()
    raise ImageBuildError("apt-cache depends listed no dependency")


def resolve(names: Sequence[str]) -> List[Package]:
    """The candidate version of each named package, in the order given."""
    try:
        found = parse_apt_show(run(["apt-cache", "show", "--no-all-versions", *names]))
    except ImageBuildError as error:
        raise ImageBuildError(f"{error}: {_APT_HINT}") from None
    by_name = {package.name: package for package in found}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ImageBuildError(f"Debian packages not found: {', '.join(missing)}: {_APT_HINT}")
    return [by_name[name] for name in names]


def resolve_metapackage(name: str) -> str:
    """``linux-image-cloud-amd64`` → ``linux-image-6.1.0-NN-cloud-amd64``, the current kernel."""
    try:
        return parse_first_dependency(run(["apt-cache", "depends", "--important", name]))
    except ImageBuildError as error:
        raise ImageBuildError(f"cannot resolve {name}: {error}: {_APT_HINT}") from None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(packages: Iterable[Package], cache_dir: str) -> List[str]:
    """Paths of the packages' .debs in ``cache_dir``, downloading (in one apt call) those not yet there."""
    packages = list(packages)
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    paths = [os.path.join(cache_dir, package.filename) for package in packages]
    missing = [
        package
        for package, path in zip(packages, paths)
        if not (os.path.exists(path) and sha256_of(path) == package.sha256)
    ]
    if missing:
        _download(missing, cache_dir)
    for package, path in zip(packages, paths):
        if not os.path.exists(path):
            raise ImageBuildError(f"apt-get download left no {package.filename}: {_APT_HINT}")
        actual = sha256_of(path)
        if actual != package.sha256:
            os.unlink(path)
            raise ImageBuildError(
                f"{package.filename} failed its sha256 check (expected {package.sha256}, got {actual}): "
                "removed it; build again to download it anew"
            )
    return paths


def _download(packages: Sequence[Package], cache_dir: str) -> None:
    """One ``apt-get download`` for all of them, each saved under its archive pool name."""
    incoming = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
    try:
        # Root's apt drops to the _apt user to download, which cannot write our cache: say root is fine.
        run(
            ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download"]
            + [f"{package.name}={package.version}" for package in packages],
            cwd=incoming,
        )
        downloaded = os.listdir(incoming)
        for package in packages:
            # apt names the file NAME_VERSION_ARCH.deb with the epoch's ':' written %3a
            for filename in downloaded:
                if filename.startswith(package.name + "_") and filename.endswith(".deb"):
                    os.replace(os.path.join(incoming, filename), os.path.join(cache_dir, package.filename))
                    break
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def extract(deb: str, into: str) -> None:
    """Unpack a .deb's files (not its maintainer scripts) under ``into``."""
    run(["dpkg-deb", "-x", deb, into])
