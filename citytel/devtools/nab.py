"""Scoring detectors on NAB-format data (Numenta Anomaly Benchmark), following the rules in the
corpus' README: labelled windows, a probation period, scaled-sigmoid rewards for early
detection and penalties for false positives, one threshold per detector and profile chosen to
maximise the corpus total, and a score normalised between the null and the perfect detector.

Each CSV is run as one series through a detector exactly as the processor runs it (batches of
``ReadingBatch``), so the figure describes the detector citytel ships.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.processors.batch import ReadingBatch
from citytel.processors.detectors import build_detector, detector_settings

__all__ = ["NabFile", "Weights", "load_corpus", "run_detector", "score_corpus"]

_BATCH_ROWS = 1000
_PROBATION_SHARE = 0.15
_PROBATION_MAX_ROWS = 750


@dataclass(frozen=True, slots=True)
class Weights:
    true_positive: float
    false_positive: float
    false_negative: float


@dataclass(frozen=True, slots=True)
class NabFile:
    name: str
    time_us: NDArray[np.int64]
    value: NDArray[np.float64]
    windows: tuple[tuple[int, int], ...]  # (first row, last row) of each labelled window

    @property
    def probation(self) -> int:
        return min(math.floor(_PROBATION_SHARE * len(self.value)), _PROBATION_MAX_ROWS)


def _stamp_us(text: str) -> int:
    return round(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1e6)


def load_corpus(root: Path) -> list[NabFile]:
    windows = json.loads((root / "combined_windows.json").read_text())
    corpus = []
    for name in sorted(windows):
        with (root / "data" / name).open(newline="") as file:
            rows = list(csv.DictReader(file))
        time_us = np.array([_stamp_us(row["timestamp"]) for row in rows], np.int64)
        value = np.array([float(row["value"]) for row in rows], np.float64)
        spans = []
        for start, end in windows[name]:
            first = int(np.searchsorted(time_us, _stamp_us(start), side="left"))
            last = int(np.searchsorted(time_us, _stamp_us(end), side="right")) - 1
            spans.append((first, last))
        corpus.append(NabFile(name, time_us, value, tuple(spans)))
    return corpus


def load_weights(root: Path, profile: str) -> Weights:
    matrix = json.loads((root / "profiles.json").read_text())[profile]["CostMatrix"]
    return Weights(matrix["tpWeight"], matrix["fpWeight"], matrix["fnWeight"])


def run_detector(name: str, table: Mapping[str, Any] | None, file: NabFile) -> NDArray[np.float32]:
    """The detector's score for every row of the file (one series named "value"), with the
    settings of its ``[detectors.<name>]`` table."""
    # One series called "value": metric filters from the city's configuration do not apply.
    settings = msgspec.to_builtins(detector_settings(name, table))
    if settings.get("metrics"):
        settings["metrics"] = ["value"]
    if "exclude_metrics" in settings:
        settings["exclude_metrics"] = []
    detector = build_detector(name, settings)
    scores = np.zeros(len(file.value), np.float32)
    for start in range(0, len(file.value), _BATCH_ROWS):
        rows = slice(start, start + _BATCH_ROWS)
        count = len(file.value[rows])
        batch = ReadingBatch(
            file.time_us[rows],
            np.zeros(count, np.int64),
            file.value[rows],
            file.time_us[rows],
            {},
            metric=np.zeros(count, np.int64),
            metric_names=("value",),
        )
        scores[rows] = detector.process(batch, 1).score
    return scores


def _scaled_sigmoid(y: NDArray[np.float64]) -> NDArray[np.float64]:
    result: NDArray[np.float64] = np.where(y > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0)
    return result


def score_file(file: NabFile, detections: NDArray[np.int64], weights: Weights) -> float:
    """Raw NAB score of detections (row indices, ascending) on one file."""
    detections = detections[detections >= file.probation]
    lefts = np.array([left for left, _ in file.windows], np.int64)
    rights = np.array([right for _, right in file.windows], np.int64)
    total = 0.0
    if len(lefts):
        position = np.searchsorted(lefts, detections, side="right") - 1
        inside = (position >= 0) & (detections <= rights[np.maximum(position, 0)])
    else:
        position = np.full(len(detections), -1)
        inside = np.zeros(len(detections), np.bool_)
    # True positives: the earliest detection in each window.
    hit_windows, first = np.unique(position[inside], return_index=True)
    if len(hit_windows):
        rows = detections[inside][first]
        width = rights[hit_windows] - lefts[hit_windows] + 1
        y = -(rights[hit_windows] - rows + 1) / width
        total += float(np.sum(weights.true_positive * _scaled_sigmoid(y) / _scaled_sigmoid(np.array(-1.0))))
    total -= weights.false_negative * (len(lefts) - len(hit_windows))
    # False positives: penalised less just after a window, fully before the first or far away.
    outside = detections[~inside]
    previous = np.searchsorted(rights, outside, side="left") - 1 if len(rights) else np.full(len(outside), -1)
    after = previous >= 0
    penalty = np.full(len(outside), -1.0)
    if after.any():
        prev_right = rights[previous[after]]
        prev_width = rights[previous[after]] - lefts[previous[after]] + 1
        penalty[after] = _scaled_sigmoid(np.abs(outside[after] - prev_right) / np.maximum(prev_width - 1, 1))
    total += float(np.sum(weights.false_positive * penalty))
    return total


def score_corpus(
    corpus: list[NabFile], scores: list[NDArray[np.float32]], weights: Weights
) -> tuple[float, float, float]:
    """(normalised score, threshold, raw total) at the threshold that maximises the raw total."""
    pooled = np.concatenate(scores)
    candidates = np.unique(
        np.concatenate([np.quantile(pooled, np.linspace(0.5, 1.0, 501)), np.linspace(0.05, 1.0, 96)])
    )
    best = (-math.inf, 1.0)
    for threshold in candidates:
        raw = sum(
            score_file(file, np.flatnonzero(file_scores >= threshold), weights)
            for file, file_scores in zip(corpus, scores, strict=True)
        )
        if raw > best[0]:
            best = (raw, float(threshold))
    null = -weights.false_negative * sum(len(file.windows) for file in corpus)
    perfect = sum(
        score_file(file, np.array(sorted(left for left, _ in file.windows), np.int64), weights) for file in corpus
    )
    normalised = 100.0 * (best[0] - null) / (perfect - null)
    return normalised, best[1], best[0]
