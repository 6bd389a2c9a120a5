"""haina's entry point in the ``haina.plugins`` group: importing it registers every built-in plugin."""

from haina.plugins.algorithms import dpo, ppo, pretrain, reward_model, sft  # noqa: F401
from haina.plugins.losses import terms  # noqa: F401
from haina.plugins.model import attention, attention_auto, attention_gpu, head, mlp, norm, position  # noqa: F401
