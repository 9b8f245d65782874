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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.processors.batch import ReadingBatch
from citytel.processors.detectors import build_detector, detector_settings

__all__ = [
    "BASELINES",
    "PROFILES",
    "CorpusScore",
    "NabFile",
    "Report",
    "Run",
    "Weights",
    "evaluate",
    "load_corpus",
    "load_weights",
    "read_result_scores",
    "result_name",
    "run_detector",
    "score_corpus",
    "score_file",
    "sweep",
    "threshold_curve",
    "windowed_gaussian",
    "write_results",
]

_BATCH_ROWS = 1000
_PROBATION_SHARE = 0.15
_PROBATION_MAX_ROWS = 750


@dataclass(frozen=True, slots=True)
class Weights:
    true_positive: float
    false_positive: float
    false_negative: float


# NAB's three application profiles (its config/profiles.json), used when a corpus has none.
PROFILES = {
    "standard": Weights(1.0, 0.11, 1.0),
    "reward_low_FP_rate": Weights(1.0, 0.22, 1.0),
    "reward_low_FN_rate": Weights(1.0, 0.11, 2.0),
}


@dataclass(frozen=True, slots=True)
class NabFile:
    name: str  # its path under data/, as NAB names it: "realTraffic/speed_6005.csv"
    timestamps: tuple[str, ...]  # as the CSV spells them
    time_us: NDArray[np.int64]
    value: NDArray[np.float64]
    windows: tuple[tuple[int, int], ...]  # (first row, last row) of each labelled window

    @property
    def probation(self) -> int:
        return min(math.floor(_PROBATION_SHARE * len(self.value)), _PROBATION_MAX_ROWS)

    @property
    def labels(self) -> NDArray[np.int8]:
        """1 for a row inside a labelled window, as NAB's result files carry them."""
        flags = np.zeros(len(self.value), np.int8)
        for first, last in self.windows:
            flags[first : last + 1] = 1
        return flags


def _stamp_us(text: str) -> int:
    return round(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1e6)


def _first_existing(*paths: Path) -> Path:
    for path in paths:
        if path.exists():
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, paths))} exists")


def load_corpus(root: Path) -> list[NabFile]:
    """A corpus in NAB's layout: ``data/<category>/*.csv`` and ``labels/combined_windows.json``
    (or ``combined_windows.json`` beside ``data/``). Only labelled files are loaded."""
    windows = json.loads(
        _first_existing(root / "labels" / "combined_windows.json", root / "combined_windows.json").read_text()
    )
    corpus = []
    for name in sorted(windows):
        with (root / "data" / name).open(newline="") as file:
            rows = list(csv.DictReader(file))
        timestamps = tuple(row["timestamp"] for row in rows)
        time_us = np.array([_stamp_us(stamp) for stamp in timestamps], np.int64)
        value = np.array([float(row["value"]) for row in rows], np.float64)
        spans = []
        for start, end in windows[name]:
            first = int(np.searchsorted(time_us, _stamp_us(start), side="left"))
            last = int(np.searchsorted(time_us, _stamp_us(end), side="right")) - 1
            spans.append((first, last))
        corpus.append(NabFile(name, timestamps, time_us, value, tuple(spans)))
    return corpus


def load_weights(root: Path, profile: str) -> Weights:
    """A profile's weights from the corpus' ``profiles.json`` (or ``config/profiles.json``), else NAB's own."""
    for path in (root / "profiles.json", root / "config" / "profiles.json"):
        profiles = json.loads(path.read_text()) if path.exists() else {}
        if profile in profiles:
            matrix = profiles[profile]["CostMatrix"]
            return Weights(matrix["tpWeight"], matrix["fpWeight"], matrix["fnWeight"])
    return PROFILES[profile]


def result_name(detector: str) -> str:
    """NAB's scorer splits result file names at '_': ``ewma_zscore`` is written ``ewmaZscore``."""
    head, *rest = detector.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def write_results(results: Path, detector: str, file: NabFile, scores: NDArray[np.floating[Any]]) -> Path:
    """A NAB result file: ``<results>/<name>/<category>/<name>_<file>.csv`` with
    ``timestamp,value,anomaly_score,label``. Scores are written in full: rounded to three
    decimals, as NAB writes its own, a score just below 1 becomes 1.000 and ties with real ones."""
    name = result_name(detector)
    category, file_name = file.name.split("/", 1)
    path = results / name / category / f"{name}_{file_name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for stamp, value, score, label in zip(file.timestamps, file.value, scores, file.labels, strict=True):
            writer.writerow([stamp, repr(float(value)), repr(float(score)), int(label)])
    return path


def read_result_scores(path: Path) -> NDArray[np.float64]:
    with path.open(newline="") as file:
        return np.array([float(row["anomaly_score"]) for row in csv.DictReader(file)], np.float64)


def windowed_gaussian(values: NDArray[np.float64], window: int = 6400, step: int = 100) -> NDArray[np.float64]:
    """NAB's windowed Gaussian baseline, from its published description and source: a reading's
    score is 1 − Q(|z|), z its distance from the mean in standard deviations of the readings
    before it (0 for the first reading). The window grows reading by reading up to ``window``
    readings, then slides ``step`` readings at a time; a standard deviation of 0 counts as 1e-6.
    Written one reading at a time, as NAB's detector runs: a baseline to check the scorer
    against, not a product path. The readings held are always a contiguous run, so numpy
    reduces over a slice of the same values in the same order as NAB's list.
    """
    scores = np.zeros(len(values))
    first = held_until = waiting = 0
    mean, std = 0.0, 1.0
    for i, value in enumerate(values.tolist()):
        if held_until:
            scores[i] = 1.0 - 0.5 * math.erfc(abs(value - mean) / std / math.sqrt(2.0))
        if held_until - first < window:
            held_until += 1
        else:
            waiting += 1
            if waiting < step:
                continue
            first, held_until, waiting = first + step, held_until + step, 0
        held = values[first:held_until]
        mean, std = float(np.mean(held)), float(np.std(held))
        if std == 0.0:
            std = 0.000001
    return scores


def scaled_sigmoid(position: NDArray[np.float64]) -> NDArray[np.float64]:
    """NAB's reward curve: 2·sigmoid(−5·y) − 1, and −1 beyond y = 3."""
    result: NDArray[np.float64] = np.where(position > 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * position)) - 1.0)
    return result


@dataclass(frozen=True, slots=True)
class Sweep:
    """Every scorable row of a file (past probation): what a detection there would earn
    (``reward``) and the window it falls in (``window``, -1 outside every window)."""

    rows: NDArray[np.int64]
    reward: NDArray[np.float64]
    window: NDArray[np.int64]
    window_count: int


def sweep(file: NabFile, weights: Weights) -> Sweep:
    """NAB's sweeper, a column at a time. For row i:

    - inside a window [left, right] of width w = right − left + 1: A_TP × S(−(right − i + 1)/w) / S(−1);
    - after a window: A_FP × S(|i − prev_right| / (prev_w − 1)); before the first window: −A_FP;
    - rows of the probation period are not scored at all, and neither is a window lying wholly
      inside it (it is neither a hit nor a miss).

    The plain row-by-row version is ``plain_sweep`` in tests/unit/test_nab.py.
    """
    count = len(file.value)
    rows = np.arange(count, dtype=np.int64)
    lefts = np.array([left for left, _ in file.windows], np.int64)
    rights = np.array([right for _, right in file.windows], np.int64)
    widths = (rights - lefts + 1).astype(np.float64)
    # The window starting at or before each row, and whether the row is still inside it.
    last = np.searchsorted(lefts, rows, side="right") - 1
    inside = (last >= 0) & (rows <= rights[np.maximum(last, 0)]) if len(lefts) else np.zeros(count, np.bool_)
    window = np.where(inside, last, -1)
    reward = np.empty(count)
    tp_rows = rows[inside]
    tp_window = last[inside]
    reward[inside] = (
        weights.true_positive
        * scaled_sigmoid(-(rights[tp_window] - tp_rows + 1) / widths[tp_window])
        / scaled_sigmoid(np.array(-1.0))
    )
    outside = ~inside
    previous = last[outside]  # outside a window, the last one that started is the last that ended
    after = previous >= 0
    fp = np.full(int(outside.sum()), -1.0)
    if after.any():
        ended = previous[after]
        fp[after] = scaled_sigmoid(np.abs(rows[outside][after] - rights[ended]) / (widths[ended] - 1.0))
    reward[outside] = weights.false_positive * fp
    scorable = rows >= file.probation
    return Sweep(rows[scorable], reward[scorable], window[scorable], len(file.windows))


@dataclass(frozen=True, slots=True)
class Curve:
    """The corpus total at every threshold NAB tries, best first in NAB's order of preference:
    ``thresholds[0]`` detects nothing, then every distinct score from the highest down."""

    thresholds: NDArray[np.float64]
    totals: NDArray[np.float64]


NOTHING = 1.1  # NAB's threshold above every score: detect nothing


def threshold_curve(sweeps: list[Sweep], scores: Sequence[NDArray[np.floating[Any]]], weights: Weights) -> Curve:
    """NAB's ``calcScoreByThreshold`` over a whole corpus: the total if every row scoring at
    least t were a detection, for t = every distinct score (and nothing detected).

    A window counts its best (earliest) detection only, from −A_FN before any; a detection
    outside every window adds its (negative) reward. Rows are taken from the highest score down,
    and the total is read after the last row of each distinct score.
    """
    score = np.concatenate(
        [np.asarray(file_scores, np.float64)[part.rows] for part, file_scores in zip(sweeps, scores, strict=True)]
    )
    reward = np.concatenate([part.reward for part in sweeps])
    # Windows numbered across the corpus; -1 outside.
    offsets = np.cumsum([0] + [part.window_count for part in sweeps[:-1]])
    window = np.concatenate(
        [np.where(part.window >= 0, part.window + offset, -1) for part, offset in zip(sweeps, offsets, strict=True)]
    )
    scorable_windows = np.unique(window[window >= 0])
    null = -weights.false_negative * len(scorable_windows)
    order = np.argsort(-score, kind="stable")
    score, reward, window = score[order], reward[order], window[order]
    change = np.where(window < 0, reward, 0.0)
    # A window's part is the best reward among its rows detected so far (−A_FN before any):
    # each row changes it by how much it raises that running best.
    in_window = np.flatnonzero(window >= 0)
    grouped = in_window[np.argsort(window[in_window], kind="stable")]
    group = window[grouped]
    starts = np.r_[True, group[1:] != group[:-1]]
    # A running maximum within each group: lift each group above all before it, accumulate, drop.
    lift = np.cumsum(starts) * 10.0
    best = np.maximum(np.maximum.accumulate(reward[grouped] + lift) - lift, -weights.false_negative)
    before = np.where(starts, -weights.false_negative, np.r_[0.0, best[:-1]])
    change[grouped] = best - before
    totals = null + np.cumsum(change)
    last_of_score = np.r_[score[1:] != score[:-1], True]
    return Curve(np.r_[NOTHING, score[last_of_score]], np.r_[null, totals[last_of_score]])


@dataclass(frozen=True, slots=True)
class CorpusScore:
    normalised: float
    threshold: float
    raw: float


def normalise(corpus: list[NabFile], sweeps: list[Sweep], raw: float, weights: Weights) -> float:
    """100 × (raw − null) / (perfect − null): the null detector detects nothing (−A_FN for each
    window with a scorable row); perfect is A_TP for every labelled window."""
    perfect = weights.true_positive * sum(len(file.windows) for file in corpus)
    null = -weights.false_negative * sum(len(np.unique(part.window[part.window >= 0])) for part in sweeps)
    if perfect == null:
        return math.nan  # no labelled window: nothing to normalise against (a file of normal data)
    return 100.0 * (raw - null) / (perfect - null)


def score_corpus(
    corpus: list[NabFile], scores: Sequence[NDArray[np.floating[Any]]], weights: Weights, threshold: float | None = None
) -> CorpusScore:
    """NAB's score of a detector over a corpus: at the threshold that maximises the corpus total
    (as NAB's optimiser picks it: the highest of equally good thresholds), or at ``threshold``
    (as NAB scores it: every row scoring at least that much is a detection)."""
    sweeps = [sweep(file, weights) for file in corpus]
    curve = threshold_curve(sweeps, scores, weights)
    if threshold is None:
        best = int(np.argmax(curve.totals))
    else:
        # The lowest tried threshold still at or above the one asked for.
        at_or_above = np.flatnonzero(curve.thresholds >= threshold)
        best = int(at_or_above[-1]) if len(at_or_above) else 0
    raw = float(curve.totals[best])
    chosen = float(curve.thresholds[best]) if threshold is None else threshold
    return CorpusScore(normalise(corpus, sweeps, raw, weights), chosen, raw)


def score_file(file: NabFile, detections: NDArray[np.int64], weights: Weights) -> float:
    """Raw NAB score of one file when exactly ``detections`` (row indices) are detections."""
    flags = np.zeros(len(file.value), np.float64)
    flags[detections] = 1.0
    return score_corpus([file], [flags], weights, threshold=1.0).raw


@dataclass(frozen=True, slots=True)
class Run:
    """A detector over one file: its score for every row, and the rows it flagged itself (at
    the threshold shipped in its settings)."""

    scores: NDArray[np.float64]
    flagged: NDArray[np.bool_]


def run_detector(name: str, table: Mapping[str, Any] | None, file: NabFile) -> Run:
    """The detector over every row of the file (one series named "value"), with the settings of
    its ``[detectors.<name>]`` table, in batches of ``ReadingBatch`` as the processor runs it."""
    # One series called "value": metric filters from the city's configuration do not apply.
    settings = msgspec.to_builtins(detector_settings(name, table))
    if settings.get("metrics"):
        settings["metrics"] = ["value"]
    if "exclude_metrics" in settings:
        settings["exclude_metrics"] = []
    if "utc_offset_hours" in settings:
        settings["utc_offset_hours"] = 0.0  # NAB's timestamps are local times already
    detector = build_detector(name, settings)
    scores = np.zeros(len(file.value), np.float64)
    flagged = np.zeros(len(file.value), np.bool_)
    for start in range(0, len(file.value), _BATCH_ROWS):
        rows = slice(start, start + _BATCH_ROWS)
        batch = ReadingBatch.of(file.time_us[rows], np.zeros(len(file.value[rows]), np.int64), file.value[rows])
        result = detector.process(batch, 1)
        scores[rows] = result.score
        flagged[rows] = result.flagged
    return Run(scores, flagged)


# Baselines from NAB, run for comparison by name beside citytel's detectors.
BASELINES = {"windowed_gaussian": windowed_gaussian}


@dataclass(frozen=True, slots=True)
class Report:
    """One detector over a corpus: each profile at NAB's optimal threshold, and (for citytel's
    detectors) each profile with exactly the rows the detector flagged at its shipped threshold."""

    detector: str
    optimal: dict[str, CorpusScore]
    shipped: dict[str, CorpusScore] | None


def evaluate(
    detectors: list[str], tables: Mapping[str, Mapping[str, Any]], root: Path, results: Path | None = None
) -> list[Report]:
    corpus = load_corpus(root)
    weights = {profile: load_weights(root, profile) for profile in PROFILES}
    reports = []
    for name in detectors:
        if name in BASELINES:
            runs = [Run(BASELINES[name](file.value), np.zeros(0, np.bool_)) for file in corpus]
        else:
            runs = [run_detector(name, tables.get(name), file) for file in corpus]
        if results is not None:
            for file, run in zip(corpus, runs, strict=True):
                write_results(results, name, file, run.scores)
        scores = [run.scores for run in runs]
        optimal = {profile: score_corpus(corpus, scores, weights[profile]) for profile in PROFILES}
        shipped = None
        if name not in BASELINES:
            flags = [run.flagged.astype(np.float64) for run in runs]
            shipped = {profile: score_corpus(corpus, flags, weights[profile], threshold=1.0) for profile in PROFILES}
        reports.append(Report(name, optimal, shipped))
    return reports
