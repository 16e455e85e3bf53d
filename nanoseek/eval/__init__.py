"""Evaluation: pass@1 over k samples, maj@k (cons@k) and pass@k on verifiable tasks, for a checkpoint run in
process or an OpenAI-compatible endpoint.

    from nanoseek.eval import evaluate, Endpoint
    res = evaluate("ckpt/", get_task("countdown").generate(300, seed=1), k=1)   # -> {"pass_at_1": ..., ...}

metrics.py holds the pure functions (pass_at_k, majority_vote, aggregate); run.py the loop and the backends;
cli.py the `nanoseek eval` command.
"""
from nanoseek.eval.metrics import aggregate, answer_key, majority_vote, pass_at_k
from nanoseek.eval.run import Endpoint, LocalBackend, completion_text, evaluate, request_seed

__all__ = ["evaluate", "Endpoint", "LocalBackend", "pass_at_k", "majority_vote", "aggregate", "answer_key",
           "completion_text", "request_seed"]
