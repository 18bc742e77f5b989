"""Private federated evaluation, the pure parts (issue 14): confusion matrices, their
noise (a statistical test of its scale), their exact encoding in the secure sum, and
the scores, checked against independent computations from the raw rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from common.config import RunConfig
from common.evaluation import (
    add_noise,
    confusion,
    decode_counts,
    encode_counts,
    eval_rounds,
    evaluation_modes,
    scores,
)
from common.secure_random import SecureRandom
from common.task import Task

LABELS = ("a", "b", "c")


def test_a_confusion_matrix_counts_each_row_once_by_true_and_predicted_label() -> None:
    y = np.array([0, 0, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 2, 0, 2])
    c = confusion(y, p, 3)
    expected = np.zeros((3, 3), dtype=np.int64)
    for t, q in zip(y, p, strict=True):
        expected[t, q] += 1
    assert (c == expected).all() and c.sum() == len(y)


def test_scores_match_a_direct_computation_from_the_rows() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    s = scores(confusion(y, p, 3), LABELS)
    assert s.accuracy == pytest.approx(float((y == p).mean()))
    f1s = []
    for k in range(3):
        tp = int(((p == k) & (y == k)).sum())
        prec = tp / max(1, int((p == k).sum()))
        rec = tp / max(1, int((y == k).sum()))
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        assert s.classes[k].precision == pytest.approx(prec)
        assert s.classes[k].recall == pytest.approx(rec)
        assert s.classes[k].support == int((y == k).sum())
    assert s.macro_f1 == pytest.approx(float(np.mean(f1s)))
    major = int(np.bincount(y).argmax())
    share = float((y == major).mean())  # always `major`: precision share, recall 1
    assert s.majority_macro_f1 == pytest.approx(2 * share / (1 + share) / 3)


def test_noisy_counts_are_the_true_counts_plus_gaussian_noise_of_the_declared_scale() -> None:
    """Thousands of cells from the site's own noise source: the residuals' mean is 0
    and their variance sigma^2 (chi-square bounds at 1e-6), and they look normal."""
    counts = np.arange(64, dtype=np.int64).reshape(8, 8) * 3
    sigma = 3.77
    rng = SecureRandom.fresh()
    residuals = np.concatenate(
        [
            (
                add_noise(counts, sigma, rng.normal(counts.shape, 1.0, dtype=torch.float64).numpy())
                - counts
            ).ravel()
            for _ in range(200)
        ]
    ).astype(np.float64)
    n = residuals.size
    # Rounding adds about a uniform(-1/2, 1/2) error: variance about sigma^2 + 1/12.
    var = sigma**2 + 1 / 12
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], n - 1) / (n - 1) * var
    assert low < residuals.var(ddof=1) < high
    assert abs(residuals.mean()) < 5.5 * np.sqrt(var / n)
    # The rounded Gaussian's law, cell by cell: P(k) = Phi((k + 1/2)/sigma) - Phi((k - 1/2)/sigma)
    ks = np.arange(-12, 13)
    edges = np.concatenate([[-np.inf], (ks[1:] - 0.5), [np.inf]])
    expected = np.diff(stats.norm.cdf(edges / sigma)) * n
    observed = np.histogram(residuals, bins=edges)[0]
    assert stats.chisquare(observed, expected).pvalue > 1e-6
    assert (np.rint(residuals) == residuals).all()  # whole counts


def test_counts_survive_the_ring_exactly_including_negative_noisy_ones() -> None:
    sites = [np.array([[5, -3], [0, 7]]), np.array([[-9, 2], [4, 1]]), np.array([[1, 1], [-1, 0]])]
    total = sum(encode_counts(c) for c in sites) & np.uint64(2**32 - 1)
    assert (decode_counts(total).reshape(2, 2) == sum(sites)).all()
    with pytest.raises(ValueError, match="32-bit"):
        encode_counts(np.array([2**31]))


def test_evaluation_rounds_are_fixed_by_the_plan() -> None:
    assert eval_rounds(RunConfig(num_server_rounds=5)) == (5,)
    assert eval_rounds(RunConfig(num_server_rounds=5, eval_every=2)) == (2, 4, 5)


def test_auto_evaluates_centrally_only_where_the_task_has_a_public_test_set(tmp_path) -> None:
    own = Task(name="own", labels=("x", "y"))
    data = str(tmp_path / "d.csv")
    assert evaluation_modes(RunConfig(), Task(name="rt", labels=("rotten", "fresh"))) == (
        True,
        False,
    )
    assert evaluation_modes(RunConfig(dataset=data, task="t.toml"), own) == (False, True)
    with pytest.raises(ValueError, match="public test set"):
        evaluation_modes(RunConfig(dataset=data, evaluation="central"), own)
    with_test = Task(name="own", labels=("x", "y"), test_file="test.csv")
    assert evaluation_modes(RunConfig(dataset=data, evaluation="both"), with_test) == (True, True)
