"""The plugin registry and every built-in plugin.

Importing this package registers the built-ins; third-party plugins arrive through the
``haina.plugins`` entry-point group the first time the registry is queried.
"""

from haina.plugins import (  # noqa: F401  (register built-ins)
    attention,
    attention_gpu,
    attention_select,
    dpo,
    head,
    loss,
    mlp,
    norm,
    position,
    ppo,
    pretrain,
    reward,
    sft,
)
from haina.plugins.registry import (
    KINDS,
    PluginEntry,
    PluginError,
    entries,
    get,
    load_entry_points,
    names,
    register,
)

__all__ = ["KINDS", "PluginEntry", "PluginError", "entries", "get", "load_entry_points", "names", "register"]
