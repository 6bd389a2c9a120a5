"""The plugin registry: every swappable component is found here by kind and name.

Every plugin, built-in or third-party, arrives through the entry-point group ``haina.plugins``: the entry
point is loaded, whatever it imports registers itself, and a loaded callable is called once so a package
may also register from a function. haina's own plugins are one such entry point (``haina.plugins``), so
the built-ins take the third-party path every day.

A registration carries the plugin's metadata:

- ``settings``: a pydantic model of the plugin's own settings. They live in the config section of the
  plugin's kind (:data:`SECTION_OF_KIND`) under the plugin's name: ``ppo:`` at the top level for
  ``algorithm: ppo``, ``model.rope:`` for ``model.position: rope``, ``loss.max_z:`` for a loss term;
- ``tp_plan``: ``fn(module, sequence_parallel) -> plan`` for a class that cannot carry a ``tp_plan``
  method (see :mod:`haina.core.parallel.tensor_parallel`);
- ``requirements``: what an attention kernel needs to run (:class:`haina.core.attention.KernelSpec`);
- ``legacy``: old config keys this plugin's settings took over, ``{"align.beta": "beta"}`` (a migration).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

from haina.core.errors import PluginError

ENTRY_POINT_GROUP = "haina.plugins"
# kind -> the config section its plugins' settings live in ("" = the top level)
SECTION_OF_KIND: dict[str, str] = {
    "position": "model",
    "attention": "model",
    "norm": "model",
    "mlp": "model",
    "head": "model",
    "loss": "loss",
    "reward": "reward",  # settings given per term in an algorithm's reward list (haina.plugins.rewards.base)
    "algorithm": "",
}

T = TypeVar("T")

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginEntry",
    "PluginError",
    "SECTION_OF_KIND",
    "add_kind",
    "entries",
    "entry",
    "get",
    "kinds",
    "load_entry_points",
    "names",
    "register",
    "settings_owner",
]


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    obj: Any
    package: str
    settings: type | None = None  # a pydantic BaseModel subclass
    tp_plan: Callable[..., Any] | None = None
    requirements: Any = None
    legacy: Mapping[str, str] = field(default_factory=dict)

    @property
    def section(self) -> str:
        """Where this plugin's settings live in a config: ``ppo``, ``model.rope``, ``loss.max_z``."""
        home = SECTION_OF_KIND.get(self.kind, "")
        return f"{home}.{self.name}" if home else self.name


_registry: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in SECTION_OF_KIND}
_current_package: contextvars.ContextVar[str] = contextvars.ContextVar("haina_plugin_package", default="haina")
_entry_points_loaded = False
_loading = False


def add_kind(kind: str, section: str = "") -> None:
    """Let a plugin package introduce a new kind of component; its settings go under ``section``."""
    _registry.setdefault(kind, {})
    SECTION_OF_KIND.setdefault(kind, section)


def kinds() -> list[str]:
    load_entry_points()
    return sorted(_registry)


def register(
    kind: str,
    name: str,
    *,
    settings: type | None = None,
    tp_plan: Callable[..., Any] | None = None,
    requirements: Any = None,
    legacy: Mapping[str, str] | None = None,
) -> Callable[[T], T]:
    """Class or function decorator: ``@register("position", "rope", settings=RopeSettings)``."""
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(sorted(_registry))}")
    if settings is not None and not callable(getattr(settings, "model_validate", None)):
        raise PluginError(f"{kind} plugin {name!r}: settings must be a pydantic model class, got {settings!r}")

    def decorator(obj: T) -> T:
        existing = _registry[kind].get(name)
        package = _current_package.get()
        if existing is not None and existing.obj is not obj and existing.package != package:
            raise PluginError(
                f"{kind} plugin {name!r} from {package} clashes with the one from {existing.package}"
            )
        _registry[kind][name] = PluginEntry(
            kind, name, obj, package, settings, tp_plan, requirements, dict(legacy or {})
        )
        return obj

    return decorator


def entry(kind: str, name: str) -> PluginEntry:
    """The registration of ``kind`` plugin ``name``, or a one-line error listing what exists."""
    load_entry_points()
    if kind not in _registry:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(sorted(_registry))}")
    try:
        return _registry[kind][name]
    except KeyError:
        raise PluginError(
            f"unknown {kind} plugin {name!r}; registered: {', '.join(names(kind)) or '(none)'}"
        ) from None


def get(kind: str, name: str) -> Any:
    """The registered object (class or function)."""
    return entry(kind, name).obj


def names(kind: str) -> list[str]:
    load_entry_points()
    return sorted(_registry.get(kind, {}))


def entries(kind: str | None = None) -> list[PluginEntry]:
    load_entry_points()
    chosen = sorted(_registry) if kind is None else [kind]
    return [e for k in chosen for e in sorted(_registry.get(k, {}).values(), key=lambda e: e.name)]


def settings_owner(section: str, name: str) -> PluginEntry | None:
    """The plugin with settings whose home is config section ``section`` ("" = top level) and whose name
    is ``name``; None when no such plugin is registered."""
    for e in entries():
        if e.settings is not None and e.name == name and SECTION_OF_KIND.get(e.kind, "") == section:
            return e
    return None


@contextlib.contextmanager
def _registering_as(package: str) -> Iterator[None]:
    token = _current_package.set(package)
    try:
        yield
    finally:
        _current_package.reset(token)


def load_entry_points(force: bool = False) -> None:
    """Import every plugin package once (haina's own included); a broken one fails loudly with its name."""
    global _entry_points_loaded, _loading
    if (_entry_points_loaded and not force) or _loading:
        return
    _loading = True
    try:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.value != "haina.plugins.builtins"):
            package = ep.dist.name if ep.dist is not None else ep.value.split(":")[0].split(".")[0]
            with _registering_as(package):
                try:
                    loaded = ep.load()
                    if callable(loaded) and not isinstance(loaded, type):
                        loaded()
                except PluginError:
                    raise
                except Exception as exc:  # a plugin package must not fail silently
                    raise PluginError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        _entry_points_loaded = True
    finally:
        _loading = False
