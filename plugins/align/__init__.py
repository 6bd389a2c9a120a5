"""What the alignment algorithms share: chat format, preference data and losses, RL maths, taxonomy."""
