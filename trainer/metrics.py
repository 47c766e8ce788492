"""Evaluation metrics for binary click models: AUC and log loss.

`auc` is the exact rank statistic (Mann-Whitney U): the probability that a
random positive scores above a random negative, ties counting one half. Tied
scores share their average rank, so the result never depends on input order.
"""

from __future__ import annotations

import numpy as np


def _check_labels(name: str, labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name}: labels must have shape ({n},), got {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name}: labels must be 0 or 1")
    return y.astype(bool)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels`, exact, O(N log N).

    Raises ValueError if the shapes differ, a label is not 0/1, a score is NaN,
    or only one class is present (AUC is undefined then).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"auc: scores must be 1-D, got shape {s.shape}")
    y = _check_labels("auc", labels, s.shape[0])
    if np.isnan(s).any():
        raise ValueError("auc: scores contain NaN")
    num_pos = int(y.sum())
    num_neg = y.shape[0] - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"auc: need both classes, got {num_pos} positives, {num_neg} negatives")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Tie groups in sorted order; every member of a group [lo, hi] (1-based
    # ranks) gets the average rank (lo + hi) / 2: doubled, it is an integer.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], sorted_s.shape[0]]
    doubled = np.repeat(starts + ends + 1, ends - starts)  # (lo + hi) with lo=start+1, hi=end
    rank_sum_x2 = int(doubled[y[order]].sum(dtype=np.int64))
    u_x2 = rank_sum_x2 - num_pos * (num_pos + 1)
    return u_x2 / (2 * num_pos * num_neg)


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of `probs` for `labels`, probabilities clipped to [eps, 1-eps]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"logloss: probs must be 1-D, got shape {p.shape}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"logloss: eps must be in (0, 0.5), got {eps}")
    y = _check_labels("logloss", labels, p.shape[0])
    if p.shape[0] == 0:
        raise ValueError("logloss: no examples")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))
