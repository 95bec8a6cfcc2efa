"""Classification metrics on hand-made predictions."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

from vsotools.core.metrics import compute_metrics, format_confusion, roc_auc, table_row


def test_the_four_paper_metrics_and_the_confusion_matrix():
    labels = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    probabilities = [0.9, 0.8, 0.2, 0.7, 0.1, 0.6, 0.3, 0.4, 0.45, 0.05]
    m = compute_metrics(labels, probabilities, loss=0.5)
    assert m.confusion == [[5, 1], [1, 3]]  # [true][predicted]: tn fp / fn tp
    assert m.n == 10
    assert m.accuracy == pytest.approx(0.8)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(0.75)
    assert m.macro_f1 == pytest.approx((0.75 + 5 / 6) / 2)
    assert m.majority_rate == pytest.approx(0.6)
    assert m.loss == 0.5


def test_a_collapsed_model_shows_in_macro_f1_and_majority_rate_but_can_still_rank():
    labels = [1] * 7 + [0] * 3
    probabilities = [0.9, 0.8, 0.85, 0.7, 0.75, 0.8, 0.95, 0.6, 0.55, 0.65]
    m = compute_metrics(labels, probabilities)
    assert m.accuracy == m.majority_rate == pytest.approx(0.7)
    assert m.macro_f1 < m.f1
    assert m.roc_auc == 1.0


def test_no_positive_prediction_gives_zero_precision_not_an_error():
    m = compute_metrics([1, 0, 0], [0.1, 0.2, 0.3])
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    rng = random.Random(3)
    labels = [rng.randint(0, 1) for _ in range(60)]
    scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(60)]
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairs = list(itertools.product(positives, negatives))
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(labels, scores) == pytest.approx(expected)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_table_row_and_confusion_text():
    m = compute_metrics([1, 0], [0.9, 0.2])
    assert table_row("fusion", m) == "| fusion | 1.000 | 1.000 | 1.000 | 1.000 |"
    text = format_confusion(m.confusion)
    assert "true negative" in text and "true positive" in text


NAN_SCORES = """
from vsotools.core.metrics import ScoreError, compute_metrics, roc_auc
for call in (lambda: roc_auc([0, 1], [float("nan"), 0.5]),
             lambda: compute_metrics([0, 1, 1], [0.2, float("nan"), 0.9])):
    try:
        call()
    except ScoreError as exc:
        print(exc)
"""


def test_nan_scores_are_refused_in_one_line_never_looped_over():
    # In a subprocess with a time limit: grouping ties with == never ends on a NaN score.
    done = subprocess.run(
        [sys.executable, "-c", NAN_SCORES], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "1 of 2 scores are NaN: the model's weights or inputs are not numbers",
        "1 of 3 scores are NaN: the model's weights or inputs are not numbers",
    ]
