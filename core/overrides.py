"""Dotted ``a.b.c=value`` overrides of a config's data, shared by the training and data-job configs.

Apart from :mod:`haina.core.config` so that the data job's config, and with it every Spark worker that
unpickles a stage, does not import torch (0.9 s and some 300 MB per Python worker).
"""

from __future__ import annotations

from typing import Any

import yaml

from haina.core.errors import ConfigError


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is read as YAML (so 2, 1e-4, true, [1,2])."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
