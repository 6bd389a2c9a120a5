"""haina's entry point in the ``haina.plugins`` group: importing it registers every built-in plugin."""

from haina.plugins.algorithms import dpo, grpo, ppo, pretrain, reinforce_pp, reward_model, rloo, sft  # noqa: F401
from haina.plugins.losses import terms  # noqa: F401
from haina.plugins.model import attention, attention_auto, attention_gpu, head, mlp, norm, position  # noqa: F401
from haina.plugins.rewards import combine, model, rules, verifier  # noqa: F401
