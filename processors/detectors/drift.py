"""Slow drift: a sensor walking away from its peers (the same metric in the same district),
found by a two-sided CUSUM of its standardised offset from them."""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import msgspec
import numpy as np
from numpy.typing import NDArray

from citytel.config import Positive, Rate, Strict
from citytel.processors.batch import DetectorResult, ReadingBatch
from citytel.processors.detectors import SeriesState, blank_verdicts, readings, register_detector
from citytel.processors.kernels import (
    AHEAD,
    Readings,
    Verdicts,
    compiled,
    fetch_ahead,
    out_of_step,
    prefetch_row,
    slot_of,
)
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
        self.params = DriftParams(
            alpha=settings.alpha, slack=settings.slack, limit=settings.cusum_limit, warmup=settings.warmup
        )
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
        pairs, inverse = np.unique((batch.district << 16) | batch.metric, return_inverse=True)
        keys = []
        for pair in pairs.tolist():
            district_name, metric_name = batch.district_names[pair >> 16], batch.metric_names[pair & 0xFFFF]
            keys.append(zlib.crc32(f"{district_name}/{metric_name}".encode()))
        result: NDArray[np.int64] = np.array(keys, np.int64)[inverse.reshape(-1)]
        return result

    def process(self, batch: ReadingBatch, series_count: int) -> DetectorResult:
        rows = self._walk(batch, series_count, self.include, self.exclude)
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
        verdicts = blank_verdicts(len(rows))
        peers = DriftPeers(
            group=self._group.view,
            member=self._member.view,
            rank=self._rank.view,
            group_sum=self._group_sum.view,
            group_members=self._group_members.view,
        )
        state = DriftState(**self.views())
        by_round, ungrouped = _drift_kernel(
            rows, batch.repeats(), readings(batch), self.block_slot, state, peers, self.params, verdicts
        )
        if len(ungrouped):
            self._group_rows(batch, ungrouped)
        return DetectorResult(self.name, len(batch), by_round, *verdicts, REASONS)

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


class DriftState(NamedTuple):
    """``Drift.state``'s arrays, one element per series slot."""

    baseline: NDArray[np.float32]
    step: NDArray[np.float32]
    last_offset: NDArray[np.float32]
    upper: NDArray[np.float32]
    lower: NDArray[np.float32]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    last_time_us: NDArray[np.int64]
    latest: NDArray[np.float64]
    group_key: NDArray[np.int64]


class DriftPeers(NamedTuple):
    """Per series slot: its peer group (-1: none yet), whether its latest reading is counted in
    the group's sum, and scratch for numbering its readings; per peer group: that sum and how
    many readings it holds. Not saved: rebuilt from the state on restore."""

    group: NDArray[np.int32]
    member: NDArray[np.bool_]
    rank: NDArray[np.int32]
    group_sum: NDArray[np.float64]
    group_members: NDArray[np.int64]


class DriftParams(NamedTuple):
    alpha: float
    slack: float
    limit: float
    warmup: int


@compiled
def _drift_kernel(
    rows: NDArray[np.int64],
    repeats: bool,
    readings: Readings,
    block_slot: NDArray[np.int64],
    state: DriftState,
    peers: DriftPeers,
    params: DriftParams,
    verdicts: Verdicts,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The detector, compiled (see processors/kernels.py). Readings go in rounds: round k holds
    the k-th reading (by time) of every series that has one, so a sensor is compared with its
    peers' readings of about the same moment, not with ones from later in the batch. Within a
    round, the groups' sums take in every reading first, then each reading is scored. Returns
    the rows in the order walked (by round), which the outputs follow; and the rows of series
    with no peer group yet, which it left alone (no verdict, nothing learned)."""
    series, time_us, value = readings
    baseline, step, last_offset, upper, lower, count, last_time, latest, _ = state
    group, member, rank, group_sum, group_members = peers
    alpha, slack, limit, warmup = params
    score, flagged, reason = verdicts
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
            _, ahead = fetch_ahead(by_round, k, readings, block_slot)
            if out_of_step(ahead, s):
                prefetch_row((group, last_time, upper, lower, member, latest), ahead)
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
                prefetch_row((count, step, baseline, last_offset), ahead)
            g = group[s]
            if g < 0:
                continue  # no peer group yet (see pass 1)
            others = group_members[g] - (1 if member[s] else 0)
            if others < 1:
                continue  # no peer reporting: not scored, not learned
            own = latest[s] if member[s] else 0.0
            offset = value[i] - (group_sum[g] - own) / others
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
