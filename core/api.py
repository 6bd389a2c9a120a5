"""Everything a third-party plugin package needs, in one import line::

    from haina.core.api import Algorithm, Field, PluginSettings, register

Register with ``@register(kind, name, settings=MySettings)`` in a module your package names in the
``haina.plugins`` entry-point group; see docs/architecture.md for the contract of each kind.
"""

from pydantic import Field

from haina.core.algorithm import Algorithm
from haina.core.attention import AttentionInputs, Kernel, KernelSpec
from haina.core.config import HainaConfig, ModelConfig, PluginSettings
from haina.core.data import PretrainBatches
from haina.core.engine import Engine
from haina.core.errors import ConfigError, HainaError, InputFileError, PluginError
from haina.core.loss import LogitStats, LossOutput, LossTerm, RowGrad
from haina.core.registry import add_kind, register

__all__ = [
    "Algorithm",
    "AttentionInputs",
    "ConfigError",
    "Engine",
    "Field",
    "HainaConfig",
    "HainaError",
    "InputFileError",
    "Kernel",
    "KernelSpec",
    "LogitStats",
    "LossOutput",
    "LossTerm",
    "ModelConfig",
    "PluginError",
    "PluginSettings",
    "PretrainBatches",
    "RowGrad",
    "add_kind",
    "register",
]
