"""Private federated evaluation, the pure parts: which rounds evaluate, a site's
confusion matrix and its noise, the counts' encoding in the secure sum, and the scores
the coordinator computes from the (noisy) sum.

A site's release is its confusion matrix on its held-out share (``counts[true, pred]``),
never a loss or an example. Adding or removing one example changes one cell by one, so
the matrix has L2 sensitivity 1 and Gaussian noise of standard deviation ``sigma`` per
cell is the Gaussian mechanism with noise multiplier ``sigma``: in the ledger, one
event with sample rate 1 and one step per release (common/privacy/events.py), which
the PRV accountant, the adaptive filter and the auditor's PLD accountant all read.
Noise is rounded to whole counts after it is drawn (post-processing), so the secure
sum of the counts is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.config import RunConfig
from common.task import Task

COUNTS_KEY = "counts"  # the array a plain evaluation reply carries
# The largest noise multiplier a site calibrates (common/privacy/accounting.py): a
# declared one above it is a false declaration, not a number to square.
MAX_DECLARED_SIGMA = 1000.0
# A site's counts may exceed its declared size by this many noise deviations per cell.
NOISE_SLACK = 6.0
COUNT_RING_BITS = 32  # counts travel in Z_(2^32): signed sums up to 2^31 - 1
SENSITIVITY = 1.0  # L2: one example moves one count by one (add/remove)
IntArray = npt.NDArray[np.int64]


def has_public_test_set(cfg: RunConfig, task: Task) -> bool:
    """The bundled data sets have their test splits; a task of one's own its test file."""
    return cfg.bundled or task.test_file is not None


def evaluation_modes(cfg: RunConfig, task: Task) -> tuple[bool, bool]:
    """(central, federated): whether the run evaluates on the public test set, and
    whether it evaluates privately at the sites. ``auto``: central when the task has a
    public test set, else federated."""
    public = has_public_test_set(cfg, task)
    if cfg.evaluation in ("central", "both") and not public:
        raise ValueError(
            f"evaluation {cfg.evaluation!r} needs a public test set, and task {task.name} "
            "has none (a task file's 'test-file'): use 'federated'"
        )
    if cfg.evaluation == "auto":
        return public, not public
    return cfg.evaluation in ("central", "both"), cfg.evaluation in ("federated", "both")


def eval_rounds(cfg: RunConfig) -> tuple[int, ...]:
    """The rounds after which a federated evaluation runs: every ``eval-every`` rounds
    and always after the last. Fixed by the plan, so a site knows how many releases it
    calibrates its noise for, and refuses any other."""
    last = cfg.num_server_rounds
    every = cfg.eval_every or last
    return tuple(sorted({*range(every, last + 1, every), last}))


def confusion(labels: IntArray, predictions: IntArray, num_classes: int) -> IntArray:
    """``counts[true, predicted]`` over the rows."""
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if y.shape != p.shape:
        raise ValueError(f"{y.shape} labels but {p.shape} predictions")
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def add_noise(counts: IntArray, sigma: float, normal: npt.NDArray[np.float64]) -> IntArray:
    """``counts`` plus ``sigma`` times the standard normals ``normal`` (one per cell,
    drawn by the caller from a cryptographic source), rounded to whole counts."""
    if normal.shape != counts.shape:
        raise ValueError(f"{normal.shape} noise draws for counts of shape {counts.shape}")
    return np.rint(counts + sigma * normal).astype(np.int64)


def encode_counts(counts: IntArray, ring_bits: int = COUNT_RING_BITS) -> npt.NDArray[np.uint64]:
    """Signed counts as ring elements (two's complement mod 2^ring_bits)."""
    bound = 1 << (ring_bits - 1)
    flat = np.asarray(counts, dtype=np.int64).ravel()
    if flat.size and (flat.min() < -bound or flat.max() >= bound):
        raise ValueError(f"a count does not fit {ring_bits}-bit signed integers")
    return (flat.astype(np.uint64)) & np.uint64((1 << ring_bits) - 1)


def decode_counts(total: npt.NDArray[np.uint64], ring_bits: int = COUNT_RING_BITS) -> IntArray:
    """The sum of encodings back to signed counts."""
    values = np.asarray(total, dtype=np.uint64).astype(np.int64)
    half = 1 << (ring_bits - 1)
    return np.where(values >= half, values - (1 << ring_bits), values)


@dataclass(frozen=True)
class ClassScores:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # the (noisy) number of held-out rows of this class


@dataclass(frozen=True)
class Scores:
    """Accuracy, per-class precision/recall/F1 and macro-F1 of a confusion matrix (a
    noisy one: negative counts are read as 0, which is post-processing)."""

    accuracy: float
    macro_f1: float
    classes: tuple[ClassScores, ...]
    total: int
    # The baseline that always predicts the most frequent class, on the same counts.
    majority_macro_f1: float


def scores(counts: IntArray, labels: tuple[str, ...]) -> Scores:
    c = np.clip(np.asarray(counts, dtype=np.int64), 0, None)
    k = len(labels)
    if c.shape != (k, k):
        raise ValueError(f"counts of shape {c.shape} for {k} labels")
    total = int(c.sum())
    right = np.diag(c)
    classes = []
    for i, label in enumerate(labels):
        predicted, actual = int(c[:, i].sum()), int(c[i, :].sum())
        precision = float(right[i] / predicted) if predicted else 0.0
        recall = float(right[i] / actual) if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        classes.append(ClassScores(label, precision, recall, f1, actual))
    share = max(c.support for c in classes) / total if total else 0.0
    return Scores(
        accuracy=float(right.sum() / total) if total else 0.0,
        macro_f1=float(np.mean([x.f1 for x in classes])),
        classes=tuple(classes),
        total=total,
        majority_macro_f1=2 * share / (1 + share) / k,
    )


def count_bound(num_examples: int, sigma: float, num_classes: int) -> float:
    """The largest total a site's (noisy) confusion matrix may have: its declared size,
    plus the noise of its k^2 cells (std sigma * k for their sum) with ample slack. It
    bounds one site's influence on the scores, as update-clip-norm bounds it in training."""
    return num_examples + NOISE_SLACK * sigma * num_classes + num_classes


def sum_noise_std(sigmas: list[float]) -> float:
    """The standard deviation per cell of a sum of independently noised matrices."""
    return math.sqrt(sum(s * s for s in sigmas))
