"""Evaluation metrics as pure functions: the unbiased pass@k estimator, majority voting (cons@k), and the
per-problem -> benchmark aggregation that `nanoseek eval` and the demo report.

    pass_at_k(n=10, c=3, k=1)            # 0.3: expected fraction of k-subsets of n samples with >= 1 correct
    majority_vote(["4", "4.0", "5"], answer_key)   # "4" (the first spelling of the winning value)
    aggregate([[1.0, 0.0], [0.0, 0.0]], [["4", "5"], [None, "7"]], k=2)

Definitions follow DeepSeek-R1 (arXiv 2501.12948, section 3.1): pass@1 is the mean correctness over the k
samples drawn per problem; cons@k (maj@k) scores the answer the majority of the k samples agree on; pass@k uses
Codex's unbiased estimator (Chen et al. 2021, arXiv 2107.03374, eq. 1) 1 - C(n-c, k) / C(n, k).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Hashable, Sequence

from nanoseek.data.tasks.base import parse_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Written as the product prod_{i=n-c+1}^{n} (1 - k/i) (Codex's numerically stable form): the binomials overflow
    floats for n in the hundreds."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:          # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def answer_key(answer: str) -> Hashable:
    """What two answers must share to count as the same vote: the exact value for numbers ("4", "4.0", "8/2"
    agree), else the text with whitespace collapsed."""
    value = parse_number(answer)
    return value if value is not None else " ".join(answer.split())


def majority_vote(answers: Sequence[str | None], key: Callable[[str], Hashable] = answer_key) -> int | None:
    """Index of the sample whose answer wins the vote (None when no sample has an answer).

    Missing answers (None) do not vote. Ties go to the value that appeared first, so the result is a function of
    the samples alone (no random tie-break) and the first sample carrying the winning value is returned."""
    keys = [None if a is None else key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    # keys in order of first appearance; the first with the top count wins
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return keys.index(winner)


def aggregate(scores: Sequence[Sequence[float]], answers: Sequence[Sequence[str | None]], k: int,
              key: Callable[[str], Hashable] = answer_key) -> dict[str, float]:
    """Benchmark metrics from per-problem sample scores (1.0 correct, 0.0 wrong) and extracted answers.

    scores[i][j], answers[i][j]: sample j of problem i (each problem has n_i >= k samples). Returns
    pass_at_1 (mean score over all samples, then over problems), maj_at_k (score of the majority answer among the
    first k samples; 0 when none answered), pass_at_k (the unbiased estimator over all n_i samples), and
    answered (fraction of samples with an extractable answer)."""
    if len(scores) != len(answers):
        raise ValueError(f"{len(scores)} score rows for {len(answers)} answer rows")
    if not scores:
        raise ValueError("no problems to aggregate")
    p1, maj, pk, answered, total = 0.0, 0.0, 0.0, 0, 0
    for row, ans in zip(scores, answers):
        if len(row) != len(ans) or len(row) < k:
            raise ValueError(f"each problem needs >= k={k} samples with one answer each, got {len(row)}/{len(ans)}")
        p1 += sum(row) / len(row)
        winner = majority_vote(ans[:k], key)
        maj += 0.0 if winner is None else row[winner]
        pk += pass_at_k(len(row), sum(1 for s in row if s >= 1.0), k)
        answered += sum(a is not None for a in ans)
        total += len(ans)
    m = len(scores)
    return {"pass_at_1": p1 / m, "maj_at_k": maj / m, "pass_at_k": pk / m, "answered": answered / total}
