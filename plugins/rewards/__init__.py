"""Reward plugins (kind ``reward``): a learned reward model, a verifier function, rules, weighted sums."""
