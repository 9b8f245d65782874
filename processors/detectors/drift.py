"""Slow drift: a sensor walking away from its peers (the same metric in the same district),
found by a two-sided CUSUM of its standardised offset from them."""

from __future__ import annotations

import zlib

import numpy as np
from numpy.typing import NDArray

from config import DetectorSettings
from processors.batch import DetectorResult, ReadingBatch
from processors.detectors import SeriesState, register_detector
from processors.series import GrowableArray, SeriesIndex

__all__ = ["Drift"]

REASONS = ("", "drift_up", "drift_down")
# A deviation adds at most this many sigmas to the sums: one spike must not look like drift.
_MAX_STEP_Z = 4.0
# Weight of the newest step in the noise scale (the scale itself needs no tuning).
_STEP_WEIGHT = 0.05
# Mean absolute difference of consecutive independent normal values, in sigmas (2 / sqrt(pi)).
_STEP_TO_SIGMA = 1.128
_NEVER = np.iinfo(np.int64).min


@register_detector("drift")
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
    offset, two sums, count, last time, latest reading, peer group key: 72 bytes."""

    applies_to: tuple[str, ...] = ()
    name = "drift"

    def __init__(self, settings: DetectorSettings) -> None:
        self.alpha = settings.alpha
        self.slack = settings.slack
        self.limit = settings.cusum_limit
        self.warmup = settings.warmup
        self.include = list(settings.metrics)
        self.exclude = list(settings.exclude_metrics)
        self.baseline = GrowableArray(np.float64)
        self.step = GrowableArray(np.float64)
        self.last_offset = GrowableArray(np.float64, fill=np.nan)
        self.upper = GrowableArray(np.float64)
        self.lower = GrowableArray(np.float64)
        self.count = GrowableArray(np.int64)
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
        self._group = GrowableArray(np.int64, fill=-1)

    def _grow(self, series_count: int) -> None:
        super()._grow(series_count)
        self._member.resize(series_count)
        self._group.resize(series_count)

    def _group_of(self, keys: NDArray[np.int64]) -> NDArray[np.int64]:
        dense = self._groups.lookup(keys)
        self._group_sum.resize(len(self._groups))
        self._group_members.resize(len(self._groups))
        return dense

    def _join(self, series: NDArray[np.int64]) -> None:
        """Count these series' latest readings in their groups' sums (once per process)."""
        joining = series[~self._member.view[series] & np.isfinite(self.latest.view[series])]
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
        self._grow(series_count)
        baseline, step, last_offset = self.baseline.view, self.step.view, self.last_offset.view
        upper, lower, count, last_time = self.upper.view, self.lower.view, self.count.view, self.last_time_us.view
        latest, member = self.latest.view, self._member.view
        size = len(batch)
        score = np.zeros(size, np.float32)
        flagged = np.zeros(size, np.bool_)
        reason = np.zeros(size, np.uint8)
        applies = np.isfinite(batch.value) & ~batch.metric_mask(self.exclude)
        if self.include:
            applies &= batch.metric_mask(self.include)
        if not applies.any():
            return DetectorResult(self.name, score, flagged, reason, REASONS)
        # A series' group never changes: only series new to this process need theirs looked up.
        unknown = np.flatnonzero(applies & (self._group.view[batch.series] < 0))
        if len(unknown):
            keys = self._keys(batch.take(unknown))
            self.group_key.view[batch.series[unknown]] = keys
            self._group.view[batch.series[unknown]] = self._group_of(keys)
        group_sum, group_members = self._group_sum.view, self._group_members.view
        for rows in batch.rounds():
            rows = rows[applies[rows]]
            series, time_us, value = batch.series[rows], batch.time_us[rows], batch.value[rows]
            # A late reading gets the score its series has now; it changes nothing.
            fresh = time_us > last_time[series]
            # A drifting sensor is no one's peer until it is back.
            drifting = np.maximum(upper[series], lower[series]) >= self.limit
            leaving = series[drifting & member[series]]
            np.add.at(group_sum, self._group.view[leaving], -latest[leaving])
            np.add.at(group_members, self._group.view[leaving], -1)
            member[leaving] = False
            self._join(series[fresh & ~drifting])
            # The round's fresh readings replace their series' latest in the groups' sums.
            updating = series[fresh & ~drifting]
            change = value[fresh & ~drifting] - np.where(member[updating], latest[updating], 0.0)
            np.add.at(group_sum, self._group.view[updating], change)
            np.add.at(group_members, self._group.view[updating], (~member[updating]).astype(np.int64))
            member[updating] = True
            latest[series[fresh]] = value[fresh]

            group = self._group.view[series]
            peers = group_members[group] - member[series]
            own = np.where(member[series], latest[series], 0.0)
            has_peers = peers >= 1
            offset = value - np.where(has_peers, (group_sum[group] - own) / np.maximum(peers, 1), value)
            fresh &= has_peers
            seen = count[series]
            warm = seen >= self.warmup
            sigma = step[series] / _STEP_TO_SIGMA + 1e-9 + 1e-4 * np.abs(baseline[series])
            z = np.clip((offset - baseline[series]) / sigma, -_MAX_STEP_Z, _MAX_STEP_Z)
            new_upper = np.where(warm, np.maximum(upper[series] + z - self.slack, 0.0), 0.0)
            new_lower = np.where(warm, np.maximum(lower[series] - z - self.slack, 0.0), 0.0)
            worst = np.maximum(new_upper, new_lower)
            score[rows] = np.where(has_peers, np.minimum(worst / (2 * self.limit), 1.0), 0.0)
            # Flagged when a sum first reaches the limit: one anomaly per drift.
            hit = warm & fresh & (worst >= self.limit) & ~drifting
            flagged[rows] = hit
            reason[rows] = np.where(hit, np.where(new_upper >= new_lower, 1, 2), 0)

            series, offset, seen = series[fresh], offset[fresh], seen[fresh]
            new_upper, new_lower, worst = new_upper[fresh], new_lower[fresh], worst[fresh]
            previous = last_offset[series]
            has_previous = np.isfinite(previous)
            # The step scale: a running mean while warming up, then exponential forgetting.
            weight = np.maximum(_STEP_WEIGHT, 1.0 / np.maximum(seen, 1))
            step_size = np.abs(offset - np.where(has_previous, previous, offset))
            step[series] = np.where(has_previous, step[series] + weight * (step_size - step[series]), 0.0)
            level_weight = np.where(
                seen < self.warmup, 1.0 / (seen + 1), np.where(worst >= self.limit, 0.0, self.alpha / 10)
            )
            baseline[series] += level_weight * (offset - baseline[series])
            upper[series] = np.minimum(new_upper, 2 * self.limit)
            lower[series] = np.minimum(new_lower, 2 * self.limit)
            last_offset[series] = offset
            count[series] = seen + 1
            last_time[series] = batch.time_us[rows][fresh]
        return DetectorResult(self.name, score, flagged, reason, REASONS)

    def import_state(self, dense: NDArray[np.int64], arrays: dict[str, NDArray[np.generic]], series_count: int) -> None:
        super().import_state(dense, arrays, series_count)
        self._grow(series_count)
        # Restored series join their peer groups at once: the groups are whole again before the
        # next reading, as if this process had seen them all along.
        known = dense[self.group_key.view[dense] >= 0]
        self._member.view[known] = False
        self._group.view[known] = self._group_of(self.group_key.view[known])
        self._join(known)
