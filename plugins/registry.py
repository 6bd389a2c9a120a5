"""The plugin registry: every swappable component is found here by kind and name.

Built-in plugins register on import of :mod:`haina.plugins`; third-party packages register through the
entry-point group ``haina.plugins`` (the entry point is loaded, and whatever it imports registers itself;
a loaded callable is called once so a package may also register from a function).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

ENTRY_POINT_GROUP = "haina.plugins"
KINDS: tuple[str, ...] = ("position", "attention", "norm", "mlp", "head", "loss", "algorithm")

T = TypeVar("T")


class PluginError(ValueError):
    """A plugin lookup or registration that cannot succeed; the message is one line for the user."""


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    obj: Any
    package: str


_registry: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
_current_package: contextvars.ContextVar[str] = contextvars.ContextVar("haina_plugin_package", default="haina")
_entry_points_loaded = False


def add_kind(kind: str) -> None:
    """Let a plugin package introduce a new kind of component."""
    _registry.setdefault(kind, {})


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class or function decorator: ``@register("position", "rope")``."""
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(sorted(_registry))}")

    def decorator(obj: T) -> T:
        existing = _registry[kind].get(name)
        package = _current_package.get()
        if existing is not None and existing.obj is not obj and existing.package != package:
            raise PluginError(
                f"{kind} plugin {name!r} from {package} clashes with the one from {existing.package}"
            )
        _registry[kind][name] = PluginEntry(kind, name, obj, package)
        return obj

    return decorator


def get(kind: str, name: str) -> Any:
    """The registered object, or a one-line error listing what exists."""
    load_entry_points()
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(sorted(_registry))}")
    try:
        return _registry[kind][name].obj
    except KeyError:
        raise PluginError(
            f"unknown {kind} plugin {name!r}; registered: {', '.join(names(kind)) or '(none)'}"
        ) from None


def names(kind: str) -> list[str]:
    load_entry_points()
    return sorted(_registry.get(kind, {}))


def entries() -> list[PluginEntry]:
    load_entry_points()
    return [entry for kind in sorted(_registry) for entry in sorted(_registry[kind].values(), key=lambda e: e.name)]


@contextlib.contextmanager
def _registering_as(package: str) -> Iterator[None]:
    token = _current_package.set(package)
    try:
        yield
    finally:
        _current_package.reset(token)


def load_entry_points(force: bool = False) -> None:
    """Import every third-party plugin package once; a broken one fails loudly with its name."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0]
        with _registering_as(package):
            try:
                loaded = ep.load()
                if callable(loaded) and not isinstance(loaded, type):
                    loaded()
            except Exception as exc:  # a plugin package must not fail silently
                raise PluginError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
