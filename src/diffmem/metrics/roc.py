"""Detector evaluation: ROC curve, ROC AUC and TPR at a fixed FPR (positives = memorized, higher score =
more likely memorized), as reported by Wen et al. (ICLR 2024) and Carlini et al. 2022 ("Membership inference
attacks from first principles", which argues for TPR at low FPR)."""

from __future__ import annotations

import torch
from scipy.stats import rankdata


def check_scores(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten and validate (scores, labels); labels become bool and both classes must be present."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.numel()} scores but {labels.numel()} labels")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    if labels.dtype != torch.bool:
        if not torch.isin(labels, torch.tensor([0, 1], dtype=labels.dtype)).all():
            raise ValueError("labels must be 0/1 or bool")
        labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both positive (memorized) and negative examples")
    return scores, labels


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds) at every distinct score, flagging `score >= threshold`; starts at (0, 0) with
    threshold +inf (Fawcett 2006, "An introduction to ROC analysis", algorithm 1)."""
    scores, labels = check_scores(scores, labels)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last position of each run of equal scores: all tied examples flip together.
    last_of_run = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_run[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    true_pos = torch.cumsum(sorted_labels.double(), 0)[last_of_run]
    false_pos = torch.cumsum((~sorted_labels).double(), 0)[last_of_run]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, true_pos / labels.sum()])
    fpr = torch.cat([zero, false_pos / (~labels).sum()])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), sorted_scores[last_of_run]])
    return fpr, tpr, thresholds


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative, ties counting half
    (Mann-Whitney U / (n_pos n_neg); Hanley & McNeil 1982)."""
    scores, labels = check_scores(scores, labels)
    ranks = torch.from_numpy(rankdata(scores.numpy(), method="average"))
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    u_statistic = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u_statistic / (n_pos * n_neg))


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, max_fpr: float = 0.01) -> float:
    """Highest true-positive rate over thresholds whose false-positive rate is at most `max_fpr` (no
    interpolation between thresholds) (Carlini et al. 2022; Wen et al. 2024)."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(tpr[fpr <= max_fpr + 1e-12].max())
