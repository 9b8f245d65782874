"""The NAB scorer: the corpus README's rules number by number, the columnar sweep against a plain
row-by-row one, every threshold against a brute-force scan, and NAB's own figures for its
windowed Gaussian baseline on the 25 files of ../shared/data/nab."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from citytel.devtools.nab import (
    NOTHING,
    PROFILES,
    NabFile,
    Sweep,
    Weights,
    load_corpus,
    read_result_scores,
    result_name,
    score_corpus,
    score_file,
    sweep,
    threshold_curve,
    windowed_gaussian,
    write_results,
)

STANDARD = PROFILES["standard"]
NAB_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "nab"


def file_with(windows: tuple[tuple[int, int], ...], rows: int = 1000) -> NabFile:
    stamps = tuple(f"2026-01-01 00:{i // 60 % 60:02d}:{i % 60:02d}" for i in range(rows))
    return NabFile("test/test.csv", stamps, np.arange(rows, dtype=np.int64), np.zeros(rows), windows)


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
    perfect = [np.zeros(1000) for _ in corpus]
    for scores, file in zip(perfect, corpus, strict=True):
        for left, _ in file.windows:
            scores[left] = 1.0
    assert score_corpus(corpus, perfect, STANDARD).normalised == pytest.approx(100.0)
    null = score_corpus(corpus, [np.zeros(1000) for _ in corpus], STANDARD)
    assert null.normalised == pytest.approx(0.0)
    assert null.raw == -3.0
    assert not math.isnan(null.threshold)


def test_a_detector_scoring_exactly_one_everywhere_may_detect_nothing() -> None:
    """NAB also tries a threshold above every score: a detector that only ever says 1.0 gets
    the null score (0), not the price of detecting everything."""
    corpus = [file_with(((500, 599),)), file_with(((300, 349), (700, 749)))]
    result = score_corpus(corpus, [np.ones(1000) for _ in corpus], STANDARD)
    assert result.normalised == 0.0
    assert result.threshold == NOTHING


def test_a_window_wholly_inside_probation_is_neither_hit_nor_missed() -> None:
    inside = file_with(((10, 40), (500, 599)))  # probation: the first 150 rows
    detected = np.zeros(1000)
    detected[500] = 1.0
    result = score_corpus([inside], [detected], STANDARD)
    # The hit earns 1.0; the window in probation costs nothing. Perfect counts both windows
    # (NAB normalises by every labelled window); null counts only the scorable one.
    assert result.raw == pytest.approx(1.0)
    assert result.normalised == pytest.approx(100.0 * (1.0 - -1.0) / (2.0 - -1.0))


def plain_sweep(file: NabFile, weights: Weights) -> Sweep:
    """NAB's sweeper transcribed row by row: the obviously right version."""

    def scaled(position: float) -> float:
        return -1.0 if position > 3.0 else 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0

    rows, rewards, windows = [], [], []
    current = previous = None
    pending = list(enumerate(file.windows))
    for i in range(len(file.value)):
        if pending and i == pending[0][1][0]:
            current = pending.pop(0)
        if current is not None:
            number, (left, right) = current
            reward = weights.true_positive * scaled(-(right - i + 1) / (right - left + 1)) / scaled(-1.0)
            window = number
        else:
            if previous is None:
                reward = -weights.false_positive
            else:
                left, right = previous
                reward = weights.false_positive * scaled(abs(right - i) / (right - left))
            window = -1
        if i >= file.probation:
            rows.append(i)
            rewards.append(reward)
            windows.append(window)
        if current is not None and i == current[1][1]:
            previous, current = current[1], None
    return Sweep(np.array(rows, np.int64), np.array(rewards), np.array(windows, np.int64), len(file.windows))


def plain_total(sweeps: list[Sweep], scores: list[NDArray[np.float64]], threshold: float, weights: Weights) -> float:
    total = 0.0
    for part, file_scores in zip(sweeps, scores, strict=True):
        best = {window: -weights.false_negative for window in set(part.window.tolist()) if window >= 0}
        for row, reward, window in zip(part.rows, part.reward, part.window, strict=True):
            if file_scores[row] < threshold:
                continue
            if window < 0:
                total += reward
            else:
                best[window] = max(best[window], reward)
        total += sum(best.values())
    return total


def random_file(generator: np.random.Generator) -> NabFile:
    rows = int(generator.integers(200, 1500))
    edges = np.sort(generator.choice(np.arange(5, rows - 5), size=2 * int(generator.integers(0, 4)), replace=False))
    windows = tuple((int(edges[k]), int(edges[k + 1])) for k in range(0, len(edges), 2))
    return file_with(windows, rows)


@pytest.mark.parametrize("seed", range(12))
def test_the_columnar_sweep_and_threshold_curve_equal_the_plain_ones(seed: int) -> None:
    generator = np.random.default_rng(seed)
    corpus = [random_file(generator) for _ in range(int(generator.integers(1, 5)))]
    # Scores with many ties, as rounded detector outputs have.
    scores = [np.round(generator.random(len(file.value)) ** 8, 2) for file in corpus]
    for weights in PROFILES.values():
        sweeps = [sweep(file, weights) for file in corpus]
        for fast, plain in zip(sweeps, [plain_sweep(file, weights) for file in corpus], strict=True):
            np.testing.assert_array_equal(fast.rows, plain.rows)
            np.testing.assert_array_equal(fast.window, plain.window)
            np.testing.assert_allclose(fast.reward, plain.reward, rtol=0, atol=1e-12)
        curve = threshold_curve(sweeps, scores, weights)
        # Rows of the probation period are dropped before thresholds are taken from the scores.
        scorable = {
            float(value) for part, file_scores in zip(sweeps, scores, strict=True) for value in file_scores[part.rows]
        }
        expected = sorted(scorable, reverse=True)
        assert curve.thresholds.tolist() == [NOTHING, *expected]
        for threshold, total in zip(curve.thresholds, curve.totals, strict=True):
            assert total == pytest.approx(plain_total(sweeps, scores, threshold, weights), abs=1e-9)


def test_nab_result_files_round_trip(tmp_path: Path) -> None:
    file = file_with(((500, 599),), rows=800)
    scores = np.random.default_rng(1).random(800)
    path = write_results(tmp_path, "ewma_zscore", file, scores)
    assert path == tmp_path / "ewmaZscore" / "test" / "ewmaZscore_test.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "timestamp,value,anomaly_score,label"
    assert lines[1] == "2026-01-01 00:00:00,0.0," + repr(float(scores[0])) + ",0"
    assert lines[501].endswith(",1")
    np.testing.assert_array_equal(read_result_scores(path), scores)
    assert result_name("traffic_profile") == "trafficProfile"
    assert "_" not in result_name("a_b_c")


def test_windowed_gaussian_scores_what_nab_publishes_for_it_on_the_25_files() -> None:
    """NAB's own scorer gives its windowed Gaussian 30.81 / 25.17 / 34.21 on these files."""
    corpus = load_corpus(NAB_DATA)
    assert len(corpus) == 25
    scores = [windowed_gaussian(file.value) for file in corpus]
    figures = [score_corpus(corpus, scores, PROFILES[profile]).normalised for profile in PROFILES]
    assert figures == pytest.approx([30.81, 25.17, 34.21], abs=0.01)
