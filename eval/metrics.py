"""Metric helpers shared by the tasks: the unbiased pass@k estimator and per-problem aggregation."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

    ``1 - C(n - c, k) / C(n, k)``: the probability that at least one of ``k`` samples drawn without replacement
    from ``n`` generated samples (``c`` of them correct) is correct. Computed as a numerically stable product.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Average pass@k over problems given ``(n, c)`` pairs (problems with fewer than ``k`` samples are an error)."""
    counts = list(counts)
    if not counts:
        return float("nan")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def summarize_correctness(per_doc: Sequence[Sequence[bool]], ks: Sequence[int] = (1,)) -> dict:
    """Accuracy (mean over problems of the fraction of correct samples = pass@1) and pass@k for each ``k``.

    ``per_doc`` holds, for each problem, the correctness of each of its samples.
    """
    counts = [(len(s), int(sum(bool(x) for x in s))) for s in per_doc if len(s) > 0]
    out: dict = {
        "num_docs": len(counts),
        "num_samples": int(sum(n for n, _ in counts)),
        "accuracy": float(np.mean([c / n for n, c in counts])) if counts else float("nan"),
    }
    min_n = min((n for n, _ in counts), default=0)
    for k in ks:
        if 1 <= k <= min_n:
            out[f"pass@{k}"] = mean_pass_at_k(counts, k)
    return out
