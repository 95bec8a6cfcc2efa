"""Binary classification metrics: the paper's four, and what a small imbalanced set also needs.

The paper reports precision, recall and F1 of the positive class and accuracy. On small or
imbalanced sets those hide a model that predicts the majority class, so ``Metrics`` also carries
macro-F1, the majority-class rate of the evaluated labels, and the ROC AUC of the positive-class
probability (which shows whether a collapsed model still ranks its inputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vsotools.core.errors import VsoError
from vsotools.core.schema import LABEL_NAMES, POSITIVE


class ScoreError(VsoError):
    """Scores that are not numbers (NaN): they have no rank and no side of a threshold."""


@dataclass(frozen=True)
class Metrics:
    n: int
    accuracy: float
    precision: float
    """Of the positive class; 0 when nothing is predicted positive."""
    recall: float
    f1: float
    macro_f1: float
    """Mean of the F1 of each class."""
    majority_rate: float
    """Share of the most frequent true label: the accuracy of always predicting it."""
    roc_auc: float | None
    """Area under the ROC curve of the positive-class probability; None with one class only."""
    loss: float | None
    """Mean cross-entropy (unweighted), when the caller had logits."""
    confusion: list[list[int]]
    """``confusion[true][predicted]``, classes in ``schema.LABEL_NAMES`` order."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "labels": list(LABEL_NAMES)}


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int]) -> list[list[int]]:
    """2x2 counts, ``[true][predicted]``."""
    matrix = [[0, 0], [0, 0]]
    for truth, guess in zip(labels, predictions, strict=True):
        matrix[truth][guess] += 1
    return matrix


def compute_metrics(
    labels: Sequence[int], probabilities: Sequence[float], loss: float | None = None
) -> Metrics:
    """Metrics of positive-class ``probabilities`` against 0/1 ``labels`` (predicted: p > 0.5).

    NaN probabilities (a model whose weights or inputs are not numbers) are refused with
    ``ScoreError``: they would count as negative predictions and have no rank.
    """
    _refuse_nan(probabilities)
    predictions = [int(p > 0.5) for p in probabilities]
    matrix = confusion_matrix(labels, predictions)
    n = len(labels)
    (tn, fp), (fn, tp) = matrix
    f1_per_class = [_f1(tp=tn, fp=fn, fn=fp), _f1(tp=tp, fp=fp, fn=fn)]
    positives = tp + fn
    return Metrics(
        n=n,
        accuracy=_ratio(tp + tn, n),
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
        f1=f1_per_class[POSITIVE],
        macro_f1=sum(f1_per_class) / 2,
        majority_rate=_ratio(max(positives, n - positives), n),
        roc_auc=roc_auc(labels, probabilities),
        loss=loss,
        confusion=matrix,
    )


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half).

    A NaN score is refused with ``ScoreError`` (it is equal to nothing, not even itself, so it
    could not be grouped with its ties).
    """
    _refuse_nan(scores)
    pairs = sorted(zip(scores, labels, strict=True))
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    # Mann-Whitney U: sum of the ranks of the positives, ties given their average rank.
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2
        rank_sum += average_rank * sum(label for _, label in pairs[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def table_row(method: str, metrics: Metrics) -> str:
    """One row of the paper's Table 1: ``| method | Prec. | Rec. | F1 | Acc. |``."""
    values = (metrics.precision, metrics.recall, metrics.f1, metrics.accuracy)
    return f"| {method} | " + " | ".join(f"{v:.3f}" for v in values) + " |"


TABLE_HEADER = "| Method | Prec. | Rec. | F1 | Acc. |\n| --- | --- | --- | --- | --- |"


def format_confusion(matrix: list[list[int]]) -> str:
    """The confusion matrix as aligned text, true labels down, predictions across."""
    width = max(len(name) for name in LABEL_NAMES)
    width = max(width, *(len(str(v)) for row in matrix for v in row))
    header = " " * (width + 6) + "  ".join(f"{name:>{width}}" for name in LABEL_NAMES)
    lines = ["predicted ->", header]
    for name, row in zip(LABEL_NAMES, matrix, strict=True):
        lines.append(f"true {name:>{width}} " + "  ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def _refuse_nan(scores: Sequence[float]) -> None:
    nan = sum(1 for score in scores if math.isnan(score))
    if nan:
        raise ScoreError(
            f"{nan:,} of {len(scores):,} scores are NaN: the model's weights or inputs are not"
            " numbers"
        )


def _f1(tp: int, fp: int, fn: int) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
