"""The one columnar batch type that flows through the processors, and what detectors add to it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from citytel.processors.series import SERIES_BLOCK_BITS

__all__ = ["AnomalyEvents", "DetectorResult", "Offsets", "ReadingBatch", "Selection"]

# (topic, partition) -> the next offset to commit once the batch is durable.
Offsets = dict[tuple[str, int], int]
# Which metrics a detector applies to: (include, exclude), each sorted; an empty include: any.
Selection = tuple[tuple[str, ...], tuple[str, ...]]
_NO_ROWS = np.empty(0, np.int64)
_NO_ROWS.flags.writeable = False


@dataclass(frozen=True, slots=True)
class ReadingBatch:
    """Readings as parallel numpy columns, with the Kafka offsets they cover.

    ``series`` is a dense index into the processor's ``SeriesIndex``; rows are in arrival order,
    not sorted: detectors order them per series themselves.
    """

    time_us: NDArray[np.int64]
    series: NDArray[np.int64]
    value: NDArray[np.float64]
    received_us: NDArray[np.int64]
    offsets: Offsets
    # Each reading's metric code, and the names those codes stand for (the series index's
    # table), so a detector can apply to some metrics only.
    metric: NDArray[np.int64]
    metric_names: tuple[str, ...]
    # Each reading's device code and district code (the series index's numbering), for
    # detectors that look across the metrics of one device or the devices of one district.
    device: NDArray[np.int64]
    district: NDArray[np.int64]
    district_names: tuple[str, ...]
    # Each reading's message (Kafka record) number in the batch; a message's rows are adjacent.
    message: NDArray[np.int64]
    # The metric code of each block of series indices when the index hands them out in blocks of
    # one metric (``SeriesIndex(metric_blocks=True)``). None: blocks may mix metrics.
    block_metric: NDArray[np.int64] | None = None
    # Work several detectors would repeat on the same batch, done once (``memoized``).
    # Not an init field: a copy made with dataclasses.replace must not inherit work done on
    # other columns.
    _memo: dict[str, NDArray[Any]] = field(default_factory=dict, init=False, compare=False, repr=False)
    # The rows of each metric selection asked for (``rows``), also worked out once per batch.
    _rows: dict[Selection, NDArray[np.int64]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def memoized(self, key: str, compute: Callable[[], NDArray[Any]]) -> NDArray[Any]:
        """``compute()``, done once per batch whichever detector asks first; read-only, since
        every later caller gets the same array."""
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = compute()
            found.flags.writeable = False
        return found

    def time_order(self) -> NDArray[np.int64]:
        """Row indices with each series' rows in time order (for the compiled kernels)."""
        if "time_order" not in self._memo:
            self._order()
        return self._memo["time_order"]

    def repeats(self) -> bool:
        """Whether some series has more than one reading in the batch (when none has, a
        detector that works in rounds of one reading per series needs a single round)."""
        if "repeats" not in self._memo:
            self._order()
        return bool(self._memo["repeats"])

    def _order(self) -> None:
        from citytel.processors.kernels import ordered

        order, repeats = ordered(self.series, self.time_us)
        self.memoized("time_order", lambda: order)
        self.memoized("repeats", lambda: np.array(repeats))

    def rows(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> NDArray[np.int64]:
        """The rows a detector applies to, grouped by metric and each series' in time order: a
        finite value, and a metric among ``include`` (any, if empty) and not among ``exclude``.
        A detector walks only these, so one that watches a single metric costs in proportion to
        that metric's rows, not the batch's. Once per batch for each selection (detectors often
        share one); read-only."""
        selection = (tuple(sorted(include)), tuple(sorted(exclude)))
        if selection not in self._rows:
            self.select_rows([selection])
        return self._rows[selection]

    def wanted_codes(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> NDArray[np.bool_]:
        """For each metric code, whether a selection (as in ``rows``) takes it (read-only)."""
        return wanted_codes(self.metric_names, (tuple(sorted(include)), tuple(sorted(exclude))))

    def select_rows(self, selections: Sequence[Selection]) -> None:
        """Work out the rows of several selections. The batch's finite rows are grouped by
        metric once (``kernels.group_rows``); a selection is then its metrics' groups, one
        after another. Grouped, a detector walks one metric's series after another: in the
        detection stage's index a metric's series sit in blocks of their own, so the state is
        read in long runs, not scattered. The selections asked for together with the first
        decide the order of the groups (``group_ranks``): most of them then take adjacent
        groups, a slice of the grouping rather than a copy of its rows."""
        new = [selection for selection in dict.fromkeys(selections) if selection not in self._rows]
        if not new:
            return
        if not len(self):
            for selection in new:
                self._rows[selection] = _NO_ROWS
            return
        if "grouped_rows" not in self._memo:
            self._group(tuple(new))
        grouped, starts, rank = (self._memo[key] for key in ("grouped_rows", "grouped_starts", "group_rank"))
        bounds = starts.tolist()
        for selection, runs in zip(new, selection_runs(self.metric_names, rank.tobytes(), tuple(new)), strict=True):
            pieces = [grouped[bounds[first] : bounds[last]] for first, last in runs if bounds[last] > bounds[first]]
            rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.empty(0, np.int64)])
            rows.flags.writeable = False
            self._rows[selection] = rows

    def selections(self) -> list[Selection]:
        """The selections asked for so far (``rows``, ``select_rows``)."""
        return list(self._rows)

    def _group(self, selections: tuple[Selection, ...]) -> None:
        from citytel.processors.kernels import CODE_BEYOND_TABLE, group_arrival_rows, group_rows

        rank = group_ranks(self.metric_names, len(self.metric_names), selections)
        # The index's blocks bound its series (and cost no pass over the batch to find).
        if self.block_metric is not None:
            series_count = len(self.block_metric) << SERIES_BLOCK_BITS
        else:
            series_count = int(self.series.max()) + 1 if len(self.series) else 0
        state = 0
        # With many more series than rows, a pass over every series costs more than sorting.
        # (And the single pass notes groups in int16.)
        if series_count <= 16 * len(self.series) and len(rank) < 1 << 15:
            grouped, starts, state = group_arrival_rows(
                self.series, self.time_us, self.metric, self.value, rank, series_count
            )
        if state == CODE_BEYOND_TABLE:
            # Codes beyond the names (not from the decoder, which names every code it gives):
            # a group each as well, rather than an index beyond the kernel's table.
            rank = group_ranks(self.metric_names, int(self.metric.max()) + 1, selections)
            state = 0
        if state:
            self.memoized("repeats", lambda: np.array(state == 2))
        else:
            grouped, starts = group_rows(self.time_order(), self.metric, self.value, rank)
        self.memoized("grouped_rows", lambda: grouped)
        self.memoized("grouped_starts", lambda: starts)
        self.memoized("group_rank", lambda: rank)

    def __len__(self) -> int:
        return len(self.value)

    def take(self, rows: NDArray[np.int64]) -> ReadingBatch:
        """The given rows only (same offsets): for isolating rows that cannot be written."""
        return ReadingBatch(
            self.time_us[rows],
            self.series[rows],
            self.value[rows],
            self.received_us[rows],
            self.offsets,
            self.metric[rows],
            self.metric_names,
            self.device[rows],
            self.district[rows],
            self.district_names,
            self.message[rows],
            self.block_metric,
        )

    @classmethod
    def empty(cls, offsets: Offsets | None = None) -> ReadingBatch:
        nothing = np.empty(0, np.int64)
        return cls(nothing, nothing, np.empty(0), nothing, offsets or {}, nothing, (), nothing, nothing, (), nothing)

    @classmethod
    def of(
        cls,
        time_us: Sequence[int] | NDArray[np.int64],
        series: Sequence[int] | NDArray[np.int64],
        value: Sequence[float] | NDArray[np.float64],
        *,
        metric: Sequence[int] | NDArray[np.int64] | None = None,
        metric_names: tuple[str, ...] = ("value",),
        device: Sequence[int] | NDArray[np.int64] | None = None,
        district: Sequence[int] | NDArray[np.int64] | None = None,
        district_names: tuple[str, ...] = ("district",),
        message: Sequence[int] | NDArray[np.int64] | None = None,
        received_us: Sequence[int] | NDArray[np.int64] | None = None,
    ) -> ReadingBatch:
        """A batch built by hand (tools, tests, replays of files), with what it leaves out filled
        in as the decoder would have it: every reading of metric code 0, each series its own
        device, every device in district 0, received when measured, and one message per device
        and time, numbered in order. A message's rows must be adjacent, as a decoded batch's
        are (detectors look for a reading's companions within its message)."""
        times = np.asarray(time_us, np.int64)
        series_column = np.asarray(series, np.int64)
        size = len(times)
        metric_column = np.zeros(size, np.int64) if metric is None else np.asarray(metric, np.int64)
        if len(metric_column) and int(metric_column.max()) >= len(metric_names):
            raise ValueError(f"metric codes go up to {int(metric_column.max())}, beyond the {len(metric_names)} names")
        devices = series_column if device is None else np.asarray(device, np.int64)
        if message is None:
            # A new message wherever the device or the time changes from the row before.
            changes = (devices[1:] != devices[:-1]) | (times[1:] != times[:-1])
            messages = np.concatenate(([0], np.cumsum(changes))).astype(np.int64) if size else np.empty(0, np.int64)
        else:
            messages = np.asarray(message, np.int64)
        if len(messages) > 1 and len(np.unique(messages)) != 1 + int((messages[1:] != messages[:-1]).sum()):
            raise ValueError("a message's rows must be adjacent")
        return cls(
            times,
            series_column,
            np.asarray(value, np.float64),
            times if received_us is None else np.asarray(received_us, np.int64),
            {},
            metric_column,
            metric_names,
            devices,
            np.zeros(size, np.int64) if district is None else np.asarray(district, np.int64),
            district_names,
            messages,
        )


@functools.lru_cache(maxsize=1024)
def wanted_codes(metric_names: tuple[str, ...], selection: Selection) -> NDArray[np.bool_]:
    """For each metric code, whether ``selection`` takes it (read-only; worked out once per
    metric table, which only grows)."""
    include, exclude = selection
    wanted = np.array([(not include or name in include) and name not in exclude for name in metric_names], np.bool_)
    wanted.flags.writeable = False
    return wanted


@functools.lru_cache(maxsize=256)
def group_ranks(metric_names: tuple[str, ...], codes: int, selections: tuple[Selection, ...]) -> NDArray[np.int64]:
    """An order of the ``codes`` metric codes' groups (each code's place in it) that keeps the
    codes of each selection adjacent where it can. Codes are sorted by which selections take
    them, the selection with the most codes first: that one, and each within it taking the most
    of the rest, come out adjacent. Read-only; once per metric table and set of selections."""
    wanted = sorted(
        (wanted_codes(metric_names, selection) for selection in selections), key=lambda taken: -int(taken.sum())
    )
    # Per code, per selection: taken or not (codes beyond the names are taken by none).
    membership = np.zeros((codes, len(wanted)), np.bool_)
    for column, taken in enumerate(wanted):
        membership[: len(taken), column] = taken[:codes]
    # np.lexsort's last key sorts first; taken (True) before not, then by code.
    order = np.lexsort((np.arange(codes), *(~membership[:, column] for column in reversed(range(len(wanted))))))
    order = _fewer_runs(membership, order)
    rank = np.empty(codes, np.int64)
    rank[order] = np.arange(codes)
    rank.flags.writeable = False
    return rank


# The most orders ``_fewer_runs`` tries: a fifth of a second at most, for a thousand metrics.
_MOVES_TRIED = 5_000


def _runs(membership: NDArray[np.bool_], order: NDArray[np.int64]) -> int:
    """How many runs of adjacent groups the selections (columns) take, codes in ``order``."""
    taken = membership[order]
    return int(taken[0].sum() + (taken[1:] & ~taken[:-1]).sum())


def _fewer_runs(membership: NDArray[np.bool_], order: NDArray[np.int64]) -> NDArray[np.int64]:
    """``order`` improved one move at a time: a code moved to wherever it makes the fewest runs,
    while some move lowers their number. The sort by membership keeps nested selections adjacent
    but can split overlapping ones, and a selection in pieces is copied out of the grouping on
    every batch: in the simulated city's stage three were, one remains. Once per metric table,
    within ``_MOVES_TRIED`` orders tried (a dozen milliseconds for the city's 16 metrics)."""
    best = _runs(membership, order)
    tried = 0
    moved = True
    while moved and tried < _MOVES_TRIED:
        moved = False
        for code in order.tolist():
            if tried >= _MOVES_TRIED:
                break
            rest = order[order != code]
            for place in range(min(len(order), _MOVES_TRIED - tried)):
                candidate = np.insert(rest, place, code)
                runs = _runs(membership, candidate)
                if runs < best:
                    best, order, moved = runs, candidate, True
            tried += len(order)
    return order


@functools.lru_cache(maxsize=256)
def selection_runs(
    metric_names: tuple[str, ...], rank: bytes, selections: tuple[Selection, ...]
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``group_runs`` of several selections: a batch looks the dozen selections of its stage up
    at once (hashing a key per selection cost more than slicing the rows)."""
    return tuple(group_runs(metric_names, rank, selection) for selection in selections)


@functools.lru_cache(maxsize=4096)
def group_runs(metric_names: tuple[str, ...], rank: bytes, selection: Selection) -> tuple[tuple[int, int], ...]:
    """The groups a selection takes, as runs of adjacent groups ``(first, end)`` in the order
    ``rank`` (its bytes, so it can be a key) gives them."""
    places = np.frombuffer(rank, np.int64)
    taken = np.zeros(len(places) + 2, np.bool_)
    taken[places[: len(metric_names)][wanted_codes(metric_names, selection)] + 1] = True
    # From each False -> True edge to the next True -> False one.
    edges = np.flatnonzero(taken[1:] != taken[:-1]).tolist()
    return tuple(zip(edges[::2], edges[1::2], strict=True))


@dataclass(frozen=True, slots=True)
class AnomalyEvents:
    """Anomalies that no reading carries, found by a sweep over the state (a silent series)."""

    detector: str
    series: NDArray[np.int64]
    time_us: NDArray[np.int64]
    score: NDArray[np.float32]
    reason: NDArray[np.uint8]
    reasons: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.series)


def _read_only(array: NDArray[Any]) -> NDArray[Any]:
    array.flags.writeable = False
    return array


# The columns of ``DetectorResult.none``: empty and shared (four allocations a batch otherwise).
_NO_VERDICTS = (
    _read_only(np.empty(0, np.int64)),
    _read_only(np.empty(0, np.float32)),
    _read_only(np.empty(0, np.bool_)),
    _read_only(np.empty(0, np.uint8)),
)


# Not frozen, though nothing changes one once made: a frozen dataclass sets each field through
# object.__setattr__, which makes each of the dozen results of a batch dearer to make in the
# detection stage (where it comes right after a kernel, from a cold cache).
@dataclass(slots=True)
class DetectorResult:
    """One detector's verdict on a batch of ``size`` rows.

    Only the rows the detector gave a verdict are listed, so a detector of one metric costs that
    metric's rows, not the batch's: ``rows`` (batch row numbers, each at most once, in any
    order) and, parallel to them, ``row_score`` in [0, 1], ``row_flagged`` (an anomaly) and
    ``row_reason`` (indexes ``reasons``; 0 means none). Every row not listed scores 0, is not
    flagged and has reason 0. ``score``, ``flagged`` and ``reason`` spell the verdicts out for
    every row of the batch, in its order (new arrays each time: for tests and reports, not for
    the hot path).
    """

    detector: str
    size: int
    rows: NDArray[np.int64]
    row_score: NDArray[np.float32]
    row_flagged: NDArray[np.bool_]
    row_reason: NDArray[np.uint8]
    reasons: tuple[str, ...]
    # Anomalies found by the detector's sweep while it handled this batch, written with it.
    events: AnomalyEvents | None = None

    @classmethod
    def none(
        cls, detector: str, size: int, reasons: tuple[str, ...], events: AnomalyEvents | None = None
    ) -> DetectorResult:
        """No verdict on any row (the sweep's events aside)."""
        rows, score, flagged, reason = _NO_VERDICTS
        return cls(detector, size, rows, score, flagged, reason, reasons, events)

    @property
    def score(self) -> NDArray[np.float32]:
        dense = np.zeros(self.size, np.float32)
        dense[self.rows] = self.row_score
        return dense

    @property
    def flagged(self) -> NDArray[np.bool_]:
        dense = np.zeros(self.size, np.bool_)
        dense[self.rows] = self.row_flagged
        return dense

    @property
    def reason(self) -> NDArray[np.uint8]:
        dense = np.zeros(self.size, np.uint8)
        dense[self.rows] = self.row_reason
        return dense

    def anomalies(self) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.uint8]]:
        """The flagged rows (batch row numbers), with their scores and reason codes."""
        hit = np.flatnonzero(self.row_flagged)
        return self.rows[hit], self.row_score[hit], self.row_reason[hit]

    def take(self, rows: NDArray[np.int64]) -> DetectorResult:
        """The verdicts on some rows only (ascending batch row numbers), renumbered as the
        batch's ``take(rows)`` numbers them. The sweep's events stay with the part that holds
        the first row, so a batch split to isolate unwritable rows writes them once."""
        events = self.events if len(rows) and rows[0] == 0 else None
        position = np.minimum(np.searchsorted(rows, self.rows), max(len(rows) - 1, 0))
        keep = np.flatnonzero(rows[position] == self.rows) if len(rows) else np.empty(0, np.int64)
        return DetectorResult(
            self.detector,
            len(rows),
            position[keep],
            self.row_score[keep],
            self.row_flagged[keep],
            self.row_reason[keep],
            self.reasons,
            events,
        )
