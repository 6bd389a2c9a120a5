"""Algorithm plugins: pretrain, sft, rm, ppo and dpo on the same engine."""
