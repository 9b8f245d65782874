"""The NAB scorer on hand-made files: the rules of the corpus' README, number by number."""

from __future__ import annotations

import math

import numpy as np
import pytest

from citytel.devtools.nab import NabFile, Weights, score_corpus, score_file

STANDARD = Weights(true_positive=1.0, false_positive=0.11, false_negative=1.0)


def file_with(windows: tuple[tuple[int, int], ...], rows: int = 1000) -> NabFile:
    return NabFile("test.csv", np.arange(rows, dtype=np.int64), np.zeros(rows), windows)


def test_probation_is_15_percent_at_most_750_rows() -> None:
    assert file_with((), rows=1000).probation == 150
    assert file_with((), rows=10_000).probation == 750


def test_an_early_detection_earns_the_full_reward_and_a_late_one_little() -> None:
    window = file_with(((500, 599),))
    assert score_file(window, np.array([500]), STANDARD) == pytest.approx(1.0)
    late = score_file(window, np.array([599]), STANDARD)
    # y = -1/100 at the right edge: 2·sigmoid(0.05) − 1 = 0.025, over 0.987.
    assert late == pytest.approx(0.0253, abs=1e-4)
    # Only the first detection in a window counts.
    assert score_file(window, np.array([500, 550, 599]), STANDARD) == pytest.approx(1.0)


def test_misses_and_false_positives_cost_what_the_profile_says() -> None:
    window = file_with(((500, 599),))
    assert score_file(window, np.array([], np.int64), STANDARD) == -1.0
    # Before the first window a false positive costs the full A_FP; detections in probation nothing.
    assert score_file(window, np.array([100, 300]), STANDARD) == pytest.approx(-1.0 - 0.11)
    # Just after a window the penalty is small, far after it nearly the full A_FP.
    near = score_file(window, np.array([500, 601]), STANDARD) - 1.0
    far = score_file(window, np.array([500, 950]), STANDARD) - 1.0
    assert far < near < 0
    assert near == pytest.approx(-0.11 * 0.0504, rel=0.01)  # y = 2/99: 2·sigmoid(-0.101) − 1
    assert far == pytest.approx(-0.11, rel=0.01)


def test_normalised_score_is_100_for_perfect_and_0_for_null() -> None:
    corpus = [file_with(((500, 599),)), file_with(((300, 349), (700, 749)))]
    perfect = [np.zeros(1000, np.float32) for _ in corpus]
    for scores, file in zip(perfect, corpus, strict=True):
        for left, _ in file.windows:
            scores[left] = 1.0
    assert score_corpus(corpus, perfect, STANDARD)[0] == pytest.approx(100.0)
    null = [np.zeros(1000, np.float32) for _ in corpus]
    normalised, threshold, raw = score_corpus(corpus, null, STANDARD)
    assert normalised == pytest.approx(0.0)
    assert raw == -3.0
    assert not math.isnan(threshold)
