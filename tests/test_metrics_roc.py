"""ROC curve, AUC and TPR at fixed FPR against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from diffmem.metrics.roc import roc_auc, roc_curve, tpr_at_fpr


def test_auc_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.4, 0.4, 0.1])
    labels = torch.tensor([1, 0, 1, 0, 0])
    # positive pairs: (0.9 beats all 3 negatives) + (0.4 beats 0.1, ties 0.4, loses to 0.8) = 3 + 1.5 = 4.5 of 6
    assert roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 1, 0])) == 1.0
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, True, False])) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=300) + labels * 0.8, 1)  # rounding makes many ties
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr, thr = roc_curve(torch.tensor(scores), torch.tensor(labels))
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr)
    np.testing.assert_allclose(thr.numpy()[1:], sk_thr[1:])
    for max_fpr in (0.0, 0.01, 0.1, 0.5):
        expected = sk_tpr[sk_fpr <= max_fpr].max()
        assert tpr_at_fpr(torch.tensor(scores), torch.tensor(labels), max_fpr) == pytest.approx(expected)


def test_tpr_at_low_fpr_by_hand():
    # 100 negatives in [0, 1), positives at 0.995 (beaten by one negative at 0.999) and at 2.0.
    negatives = torch.cat([torch.arange(99) / 100.0, torch.tensor([0.999])])
    scores = torch.cat([negatives, torch.tensor([2.0, 0.995])])
    labels = torch.cat([torch.zeros(100), torch.ones(2)])
    assert tpr_at_fpr(scores, labels, 0.0) == 0.5  # only the 2.0 positive clears every negative
    assert tpr_at_fpr(scores, labels, 0.01) == 1.0  # allowing the one negative at 0.999 catches 0.995


def test_one_class_refused():
    with pytest.raises(ValueError, match="both positive"):
        roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([float("nan"), 2.0]), torch.tensor([1, 0]))
