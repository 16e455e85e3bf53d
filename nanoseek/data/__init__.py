"""Data for every stage: packed pretraining (`pretrain`), chat SFT (`sft`), verifiable tasks and rewards (`tasks`).

Kept empty on purpose: import the submodule you need, so loading one stage never pulls in another's dependencies.
"""
