"""Reusable training pieces for every recipe (pretrain, SFT, GRPO): losses (pure functions), the optimizer and
schedules, aux-loss-free load balancing, run configs with their CLI, metrics/plots, and loop helpers.

Kept empty on purpose: import the submodule you need.
"""
