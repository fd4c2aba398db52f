"""The site configuration: ``load_config(path) -> SiteConfig``, strict and complete in its complaints."""

from __future__ import annotations

from blahvm.config.problems import ConfigError, Problem, Problems
from blahvm.config.source import SourceError, parse_yaml
from blahvm.config.schema import build_site_config
from blahvm.locations import DEFAULT_CONFIG as DEFAULT_PATH
from blahvm.locations import config_path
from blahvm.model import SiteConfig

__all__ = ["ConfigError", "Problem", "DEFAULT_PATH", "config_path", "load_config", "parse_config"]


def load_config(path: str = DEFAULT_PATH) -> SiteConfig:
    """Read and validate a site config; raises ConfigError with every problem found."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as error:
        raise ConfigError([Problem(path, None, (), f"cannot read the config: {error.strerror}")]) from None
    return parse_config(raw, path)


def parse_config(raw: bytes | str, filename: str = "<config>") -> SiteConfig:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError([Problem(filename, None, (), f"not UTF-8 text (byte {error.start})")]) from None
    else:
        text = raw
    try:
        document = parse_yaml(text)
    except SourceError as error:
        raise ConfigError([Problem(filename, error.line, (), error.message)]) from None
    return build_site_config(Problems(document, filename), document.data, filename)
