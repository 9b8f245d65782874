"""Slow drift: a sensor walking away from its peers (the same metric in the same district),
found by a two-sided CUSUM of its standardised offset from them."""

from __future__ import annotations

import math
import zlib

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, register_detector
from citytel.processors.kernels import AHEAD, compiled, fetch_ahead, out_of_step, prefetch, slot_of
from citytel.processors.series import GrowableArray, SeriesIndex

__all__ = ["Drift"]

REASONS = ("", "drift_up", "drift_down")
# A deviation adds at most this many sigmas to the sums: one spike must not look like drift.
_MAX_STEP_Z = 4.0
# Weight of the newest step in the noise scale (the scale itself needs no tuning).
_STEP_WEIGHT = 0.05
# From this many steps on, 1 / steps is at most _STEP_WEIGHT.
_STEP_SETTLED = math.ceil(1 / _STEP_WEIGHT)
# Mean absolute difference of consecutive independent normal values, in sigmas (2 / sqrt(pi)).
_STEP_TO_SIGMA = 1.128
_NEVER = np.iinfo(np.int64).min


class DriftSettings(Strict, frozen=True):
    """[detectors.drift]"""

    alpha: Rate = 0.05
    """The weight of an offset in the sensor's usual offset is alpha / 10."""
    slack: float = 1.0
    """CUSUM slack, in noise sigmas."""
    cusum_limit: Positive = 40.0
    """Summed excess sigmas that count as drift."""
    warmup: int = 30
    metrics: list[str] = msgspec.field(default_factory=list)
    """Only these metrics (empty: every metric not excluded)."""
    exclude_metrics: list[str] = msgspec.field(default_factory=list)
    """Metrics left alone (constant or binary by nature, like a lot's capacity)."""


@register_detector("drift", DriftSettings)
class Drift(SeriesState):
    """A sensor that slowly walks away from its level (a fouled optical PM sensor, a heating
    temperature probe). Daily cycles and pollution episodes move a whole district together, so
    the detector follows each sensor's offset from its peers: the mean of the latest readings of
    the same metric from the district's other devices (leave-one-out, so a drifting sensor does
    not drag its own reference; and a sensor flagged as drifting leaves its peers' reference
    until it is back). The offset's noise scale comes from consecutive steps, which
    drift barely changes, so a slow walk shows up as a run of same-signed deviations from the
    sensor's usual offset: the CUSUM sums them (minus ``slack`` sigmas each) and flags once a
    sum reaches ``cusum_limit``. The usual offset is the mean of the first ``warmup`` offsets,
    then follows with weight ``alpha / 10`` (slow, so a drift outruns it); it holds still while
    a drift is flagged, so the drift is not learned as the new normal. One anomaly per drift:
    sums are capped at twice the limit and a flag needs a sum to come up from below it. A sensor
    with no peer reporting is not scored. State per series: usual offset, step scale, last
    offset, two sums, count, last time, latest reading, peer group key: 48 bytes (and 9 more,
    not saved: peer group number, whether counted in it, round scratch)."""

    applies_to: tuple[str, ...] = ()
    name = "drift"

    def __init__(self, settings: DriftSettings) -> None:
        super().__init__()
        self.alpha = settings.alpha
        self.slack = settings.slack
        self.limit = settings.cusum_limit
        self.warmup = settings.warmup
        self.include = list(settings.metrics)
        self.exclude = list(settings.exclude_metrics)
        # Offsets, their scale and the sums in float32: they are compared with sigmas, not
        # added up for long. The latest reading stays float64: the groups' sums add and take
        # it away again, and must get back exactly what they added.
        self.baseline = GrowableArray(np.float32)
        self.step = GrowableArray(np.float32)
        self.last_offset = GrowableArray(np.float32, fill=np.nan)
        self.upper = GrowableArray(np.float32)
        self.lower = GrowableArray(np.float32)
        self.count = GrowableArray(np.int32)
        self.last_time_us = GrowableArray(np.int64, fill=_NEVER)
        self.latest = GrowableArray(np.float64, fill=np.nan)
        # crc32 of "district/metric": the same number in every process, unlike its codes.
        self.group_key = GrowableArray(np.int64, fill=-1)
        self.state = {
            "baseline": self.baseline,
            "step": self.step,
            "last_offset": self.last_offset,
            "upper": self.upper,
            "lower": self.lower,
            "count": self.count,
            "last_time_us": self.last_time_us,
            "latest": self.latest,
            "group_key": self.group_key,
        }
        # Per peer group (dense numbering of this process): the sum and number of the latest
        # readings of its member series, and which series are counted in them.
        self._groups = SeriesIndex(1 << 24)
        self._group_sum = GrowableArray(np.float64)
        self._group_members = GrowableArray(np.int64)
        self._member = GrowableArray(np.bool_)
        self._group = GrowableArray(np.int32, fill=-1)
        # Scratch for the kernel's round numbering: zero between batches.
        self._rank = GrowableArray(np.int32)
        # The series index's extent when every series of the rows walked had a group (-1: never).
        self._grouped_extent = -1

    def _grow(self, slots: int) -> None:
        super()._grow(slots)
        self._member.resize(slots)
        self._group.resize(slots)
        self._rank.resize(slots)

    def _group_of(self, keys: NDArray[np.int64]) -> NDArray[np.int64]:
        dense = self._groups.lookup(keys)
        self._group_sum.resize(len(self._groups))
        self._group_members.resize(len(self._groups))
        return dense

    def _join(self, slots: NDArray[np.int64]) -> None:
        """Count these slots' latest readings in their groups' sums (once per process)."""
        joining = slots[~self._member.view[slots] & np.isfinite(self.latest.view[slots])]
        if len(joining):
            joining = np.unique(joining)
            groups = self._group.view[joining]
            np.add.at(self._group_sum.view, groups, self.latest.view[joining])
            np.add.at(self._group_members.view, groups, 1)
            self._member.view[joining] = True

    @staticmethod
    def _keys(batch: ReadingBatch) -> NDArray[np.int64]:
        size = len(batch)
        metric = np.zeros(size, np.int64) if batch.metric is None else batch.metric
        pairs, inverse = np.unique((batch.districts() << 16) | metric, return_inverse=True)
        keys = []
        for pair in pairs.tolist():
            district_code, metric_code = pair >> 16, pair & 0xFFFF
            district_name = batch.district_names[district_code] if batch.district_names else str(district_code)
            metric_name = batch.metric_names[metric_code] if batch.metric_names else str(metric_code)
            keys.append(zlib.crc32(f"{district_name}/{metric_name}".encode()))
        result: NDArray[np.int64] = np.array(keys, np.int64)[inverse.reshape(-1)]
        return result

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.include, self.exclude)
        baseline, step, last_offset = self.baseline.view, self.step.view, self.last_offset.view
        upper, lower, count, last_time = self.upper.view, self.lower.view, self.count.view, self.last_time_us.view
        latest, member = self.latest.view, self._member.view
        if not len(rows):
            return DetectorResult.none(self.name, len(batch), REASONS)
        # A series' group never changes: only series new to this detector need theirs looked up.
        # Series new to the index (it grew since the last batch) are looked up before the
        # kernel. Once the index stops growing that pass over the rows is skipped, and the
        # kernel passes over the rare series the index knew but this detector did not (one
        # whose every reading so far was not a number, or one restored without drift state):
        # it leaves their rows alone, and they join their groups for the next batch.
        if series_count != self._grouped_extent:
            self._group_rows(batch, _ungrouped(rows, batch.series, self.block_slot, self._group.view))
            self._grouped_extent = series_count
        score, flagged, reason = blank_verdicts(len(rows))
        by_round, ungrouped = _drift_kernel(
            rows, batch.repeats(), batch.series, self.block_slot, batch.time_us, batch.value, self._group.view,
            self._group_sum.view, self._group_members.view, member, latest, self._rank.view,
            baseline, step, last_offset, upper, lower, count, last_time,
            self.alpha, self.slack, self.limit, self.warmup, score, flagged, reason,
        )  # fmt: skip
        if len(ungrouped):
            self._group_rows(batch, ungrouped)
        return DetectorResult(self.name, len(batch), by_round, score, flagged, reason, REASONS)

    def _group_rows(self, batch: ReadingBatch, rows: NDArray[np.int64]) -> None:
        """Look up the peer groups of these rows' series (which have none yet)."""
        if len(rows):
            keys = self._keys(batch.take(rows))
            slots, _ = self.slots(batch.series[rows])
            self.group_key.view[slots] = keys
            self._group.view[slots] = self._group_of(keys)

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        super().import_state(dense, arrays, series_count)
        # Restored series join their peer groups at once: the groups are whole again before the
        # next reading, as if this process had seen them all along.
        slots, present = self.slots(dense)
        known = slots[present][self.group_key.view[slots[present]] >= 0]
        self._member.view[known] = False
        self._group.view[known] = self._group_of(self.group_key.view[known])
        self._join(known)


@compiled
def _ungrouped(
    rows: NDArray[np.int64], series: NDArray[np.int64], block_slot: NDArray[np.int64], group: NDArray[np.int32]
) -> NDArray[np.int64]:
    """The rows whose series has no peer group yet."""
    found = np.empty(rows.shape[0], np.int64)
    count = 0
    for k in range(rows.shape[0]):
        if group[slot_of(block_slot, series[rows[k]])] < 0:
            found[count] = rows[k]
            count += 1
    return found[:count]


@compiled
def _drift_kernel(
    rows: NDArray[np.int64],
    repeats: bool,
    series: NDArray[np.int64],
    block_slot: NDArray[np.int64],
    time_us: NDArray[np.int64],
    value: NDArray[np.float64],
    group: NDArray[np.int32],
    group_sum: NDArray[np.float64],
    group_members: NDArray[np.int64],
    member: NDArray[np.bool_],
    latest: NDArray[np.float64],
    rank: NDArray[np.int32],
    baseline: NDArray[np.float32],
    step: NDArray[np.float32],
    last_offset: NDArray[np.float32],
    upper: NDArray[np.float32],
    lower: NDArray[np.float32],
    count: NDArray[np.int32],
    last_time: NDArray[np.int64],
    alpha: float,
    slack: float,
    limit: float,
    warmup: int,
    score: NDArray[np.float32],
    flagged: NDArray[np.bool_],
    reason: NDArray[np.uint8],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The detector, compiled (see processors/kernels.py). Readings go in rounds: round k holds
    the k-th reading (by time) of every series that has one, so a sensor is compared with its
    peers' readings of about the same moment, not with ones from later in the batch. Within a
    round, the groups' sums take in every reading first, then each reading is scored. Returns
    the rows in the order walked (by round), which the outputs follow; and the rows of series
    with no peer group yet, which it left alone (no verdict, nothing learned)."""
    size = rows.shape[0]
    # The usual case, no series twice in the batch: one round.
    rounds = 1
    starts = np.array([0, size], np.int64)
    by_round = rows
    if repeats:
        # Number the readings of each series (rank) and sort the rows by it: the rounds.
        row_rank = np.empty(size, np.int64)
        for k in range(size):
            s = slot_of(block_slot, series[rows[k]])
            row_rank[k] = rank[s]
            rank[s] += 1
            rounds = max(rounds, rank[s])
        starts = np.zeros(rounds + 1, np.int64)
        for k in range(size):
            rank[slot_of(block_slot, series[rows[k]])] = 0  # the scratch is left as found
            starts[row_rank[k] + 1] += 1
        for r in range(rounds):
            starts[r + 1] += starts[r]
        by_round = np.empty(size, np.int64)
        fill = starts[:-1].copy()
        for k in range(size):
            by_round[fill[row_rank[k]]] = rows[k]
            fill[row_rank[k]] += 1
    # Per position in by_round: the row's slot, found once in pass 1.
    slot = np.empty(size, np.uint64)
    ungrouped = np.empty(0, np.int64)
    skipped = 0
    for r in range(rounds):
        # Pass 1: the groups' sums of latest readings.
        for k in range(starts[r], starts[r + 1]):
            i = np.uint64(by_round[k])
            s = slot[k] = slot_of(block_slot, series[i])
            # Fetch ahead (see processors/kernels.py).
            _, ahead = fetch_ahead(by_round, k, series, block_slot, time_us, value)
            if out_of_step(ahead, s):
                prefetch(group, ahead)
                prefetch(last_time, ahead)
                prefetch(upper, ahead)
                prefetch(lower, ahead)
                prefetch(member, ahead)
                prefetch(latest, ahead)
            g = group[s]
            if g < 0:
                if skipped == ungrouped.shape[0]:
                    ungrouped = np.concatenate((ungrouped, np.empty(max(16, 2 * skipped), np.int64)))
                ungrouped[skipped] = i
                skipped += 1
                continue
            # A late reading gets the score its series has now; it changes nothing. (Pass 2
            # works both out again: nothing they depend on changes in between, as a series has
            # one reading per round.)
            fresh = time_us[i] > last_time[s]
            drifting = max(upper[s], lower[s]) >= limit
            # A drifting sensor is no one's peer until it is back.
            if drifting and member[s]:
                group_sum[g] -= latest[s]
                group_members[g] -= 1
                member[s] = False
            if fresh and not drifting:
                if member[s]:
                    group_sum[g] += value[i] - latest[s]
                else:
                    group_sum[g] += value[i]
                    group_members[g] += 1
                    member[s] = True
            if fresh:
                latest[s] = value[i]
        # Pass 2: each reading's offset from its peers, the CUSUM, and learning.
        for k in range(starts[r], starts[r + 1]):
            i = np.uint64(by_round[k])
            s = slot[k]
            ahead = slot[min(k + AHEAD, size - 1)]
            if out_of_step(ahead, s):
                prefetch(count, ahead)
                prefetch(step, ahead)
                prefetch(baseline, ahead)
                prefetch(last_offset, ahead)
            g = group[s]
            if g < 0:
                continue  # no peer group yet (see pass 1)
            peers = group_members[g] - (1 if member[s] else 0)
            if peers < 1:
                continue  # no peer reporting: not scored, not learned
            own = latest[s] if member[s] else 0.0
            offset = value[i] - (group_sum[g] - own) / peers
            seen = count[s]
            warm = seen >= warmup
            sigma = step[s] / _STEP_TO_SIGMA + 1e-9 + 1e-4 * abs(baseline[s])
            z = min(max((offset - baseline[s]) / sigma, -_MAX_STEP_Z), _MAX_STEP_Z)
            new_upper = max(upper[s] + z - slack, 0.0) if warm else 0.0
            new_lower = max(lower[s] - z - slack, 0.0) if warm else 0.0
            worst = max(new_upper, new_lower)
            score[k] = min(worst / (2 * limit), 1.0)
            if time_us[i] <= last_time[s]:
                continue  # late: scored only
            # Flagged when a sum first reaches the limit: one anomaly per drift.
            if warm and worst >= limit and max(upper[s], lower[s]) < limit:
                flagged[k] = True
                reason[k] = 1 if new_upper >= new_lower else 2
            # The step scale: a running mean while warming up, then exponential forgetting.
            previous = last_offset[s]
            if np.isfinite(previous):
                # max(_STEP_WEIGHT, 1 / seen), without a division once 1 / seen is the smaller.
                weight = _STEP_WEIGHT if seen >= _STEP_SETTLED else max(_STEP_WEIGHT, 1.0 / max(seen, 1))
                step[s] += weight * (abs(offset - previous) - step[s])
            else:
                step[s] = 0.0
            # The usual offset: a mean while warming up, then slow; still while drifting.
            level_weight = 1.0 / (seen + 1) if seen < warmup else (0.0 if worst >= limit else alpha / 10)
            baseline[s] += level_weight * (offset - baseline[s])
            upper[s] = min(new_upper, 2 * limit)
            lower[s] = min(new_lower, 2 * limit)
            last_offset[s] = offset
            count[s] = seen + 1
            last_time[s] = time_us[i]
    return by_round, ungrouped[:skipped]
