"""A ``SiteConfig`` back to YAML: canonical spelling, loads back to an equal config."""

from __future__ import annotations

from typing import Any, Dict

import attrs
import yaml

from blahvm.config.cloud_config import additions
from blahvm.model import Environment, Predicate, SiteConfig
from blahvm.quantities import Duration, Size


def _plain(value: Any) -> Any:
    if isinstance(value, (Duration, Size)):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _fields(instance: Any, skip: tuple = ()) -> Dict[str, Any]:
    """The attributes that differ from their defaults, as plain YAML values."""
    out = {}
    for field in attrs.fields(type(instance)):
        value = getattr(instance, field.name)
        if field.name in skip:
            continue
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        if value != default:
            out[field.name] = _plain(value)
    return out


def _predicate(predicate: Predicate) -> Any:
    if predicate.kind == "any":
        values = [_plain(v) for v in predicate.values]
        return values[0] if len(values) == 1 else values
    return predicate.describe()


def _environment(environment: Environment) -> Dict[str, Any]:
    fields = _fields(environment, ("name",))
    if "user_data" in fields:  # kept as canonical JSON text, written as the mapping it was read from
        fields["user_data"] = additions(environment.user_data)
    return fields


def dump_config(config: SiteConfig) -> str:
    document: Dict[str, Any] = {}
    for section in ("hypervisor", "host", "defaults"):
        fields = _fields(getattr(config, section))
        if fields:
            document[section] = fields
    if config.vo_mapping:
        document["vo_mapping"] = [{rule.field: rule.pattern} for rule in config.vo_mapping]
    document["environments"] = {name: _environment(env) for name, env in config.environments.items()}
    document["queues"] = {name: _fields(queue, ("name",)) for name, queue in config.queues.items()}
    routes = []
    for route in config.routes:
        entry = {"name": route.name}
        if route.when:
            entry["when"] = {p.field: _predicate(p) for p in route.when}
        entry.update(_fields(route, ("name", "when")))
        routes.append(entry)
    document["routes"] = routes
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)
