"""Per-reading loops of the generic detectors, compiled to machine code with numba.

A detector's state update is a recurrence per series (each reading depends on the one before),
which numpy can only vectorise across series, one "round" of readings at a time. These kernels
instead walk the batch once, series by series in time order, over the same numpy columns and
state arrays: no Python object per reading, and an order of magnitude fewer passes over memory.
Each kernel reproduces its detector's documented behaviour exactly (the conformance suite runs
them through the same checks as every detector).

Every kernel, here and in the detectors' modules, is compiled by ``compiled``:

- ``cache=True`` keeps the compiled code next to its module, so a process compiles each kernel
  once per machine, not once per start;
- ``nogil=True`` lets another thread run while a kernel does;
- ``error_model="numpy"`` makes a division one machine division (a zero divisor gives inf or
  NaN) instead of a test and a branch before each, which would raise ZeroDivisionError and stop
  the processor on one bad value. The config schema keeps the parameters kernels divide by
  positive; the other divisors are kept off zero where they are computed.

Kernels index arrays with unsigned integers (``np.uint64(rows[k])``, ``slot_of``): numba
handles a signed index that may be negative by counting from the end, a compare and a move at
every access; with unsigned ones that code goes, and the loops run faster (figures:
docs/bench/design-measurements.md). An unsigned index is only ever used to index: arithmetic mixing
it with signed integers would give floats in numba.

Kernels take their inputs as named bundles (NamedTuples): the batch's ``Readings``, a
detector's state arrays and its parameters, and the ``Verdicts`` it fills. numba compiles
a field access to the same load as a loose argument; the names keep two arrays or two floats
from being swapped unnoticed, which 30 positional arguments did not.

Kernels ask for the memory of the reading ``AHEAD`` rows on before they need it
(``fetch_ahead``, ``prefetch_row``). A detector's rows are a metric's readings in arrival order, so
they read the batch's columns a few rows apart, and the state of series in whatever order their
devices reported. Each read that misses the cache waits for memory, and the CPU finds too few
independent ones in a long loop body to overlap them; a fetch started 16 rows early has arrived
by then. The state is fetched only when the slots are not already in step (a state row 16 on
when its reading is 16 rows on: devices reporting in the order they first did, which the CPU's
own prefetcher streams). It matters most when each minute's messages arrive shuffled, as
devices' clocks drift in a real city (figures: docs/bench/design-measurements.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.typing.templates import Signature
from numba.extending import intrinsic
from numpy.typing import NDArray

from citytel.processors.series import SERIES_BLOCK, SERIES_BLOCK_BITS

__all__ = [
    "AHEAD",
    "CODE_BEYOND_TABLE",
    "EWMA_OFF",
    "FLATLINE_OFF",
    "EwmaParams",
    "EwmaPart",
    "EwmaState",
    "FlatlineParams",
    "FlatlinePart",
    "FlatlineState",
    "Readings",
    "Verdicts",
    "advance_clocks",
    "assign_slots",
    "compiled",
    "ewma_flatline_kernel",
    "fetch_ahead",
    "group_arrival_rows",
    "group_percentile",
    "group_rows",
    "ordered",
    "out_of_step",
    "period",
    "prefetch_row",
    "slot_of",
    "time_order",
]

compiled = njit(cache=True, nogil=True, error_model="numpy")

# What ``group_arrival_rows`` returns for a metric code beyond its table.
CODE_BEYOND_TABLE = 3

_NEVER = np.iinfo(np.int64).min
_BLOCK_MASK = np.uint64(SERIES_BLOCK - 1)
_BLOCK_BITS = np.uint64(SERIES_BLOCK_BITS)


@njit(inline="always")
def slot_of(block_slot: NDArray[np.int64], series: int) -> np.uint64:
    """A dense series index's state slot in a detector (see ``SeriesState``): its block's first
    slot plus its place in the block, unsigned (see above). Inlined into each kernel: a shift, a
    load from a small table and a mask per reading."""
    unsigned = np.uint64(series)
    return np.uint64(block_slot[unsigned >> _BLOCK_BITS]) | (unsigned & _BLOCK_MASK)


@njit(inline="always")
def period(time: int, length: int) -> tuple[int, int, int]:
    """The number of the period of ``length`` (an hour, a day) that holds ``time``, and its start
    and end. Kernels keep all three and call this again only for a time outside: a batch's
    readings nearly all fall in one or two hours, and the divisions were a large share of a loop.
    Scalars only, so inlining it costs nothing (arrays passed to a helper are counted)."""
    number = time // length
    start = number * length
    return number, start, start + length


# Rows ahead that kernels fetch the memory of (see the module's docstring).
AHEAD = 16
_AHEAD = np.uint64(AHEAD)


class Readings(NamedTuple):
    """The batch's columns every per-series kernel reads, by row (``ReadingBatch``'s)."""

    series: NDArray[np.int64]
    time_us: NDArray[np.int64]
    value: NDArray[np.float64]


class Verdicts(NamedTuple):
    """What a detector's kernel says of each row it walks, by position in its rows: a score in
    [0, 1], whether the row is anomalous, and the reason's code (0: none)."""

    score: NDArray[np.float32]
    flagged: NDArray[np.bool_]
    reason: NDArray[np.uint8]


def _prefetch_row(typingctx: object, arrays: types.Type, index: types.Type) -> tuple[Signature, object] | None:
    if not isinstance(arrays, types.BaseTuple) or not isinstance(index, types.Integer):
        return None
    if not all(isinstance(array, types.Array) for array in cast(Any, arrays).types):
        return None

    def codegen(context: Any, builder: Any, signature: Signature, args: tuple[Any, ...]) -> Any:
        tuple_type, index_type = signature.args
        position = context.cast(builder, args[1], index_type, types.intp)
        byte_pointer = ir.IntType(8).as_pointer()
        word = ir.IntType(32)
        function = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, word, word, word]), "llvm.prefetch.p0"
        )
        # One prefetch per array, unrolled here at compile time: no loop, no tuple at run time.
        for number, array_type in enumerate(tuple_type.types):
            array = context.make_array(array_type)(context, builder, builder.extract_value(args[0], number))
            address = builder.gep(array.data, [position])
            # (address, 0: for reading, 3: keep in every cache level, 1: data)
            builder.call(function, [builder.bitcast(address, byte_pointer), word(0), word(3), word(1)])
        return context.get_dummy_value()

    return types.void(arrays, index), codegen


# Start fetching the cache line of ``array[index]`` for every array of a tuple (a detector's
# state bundle, or a few columns), in a kernel: LLVM's prefetch. Only a hint: nothing is read,
# and an index out of range does no harm. (Typed for mypy by what it takes.)
prefetch_row = cast(Callable[[tuple[NDArray[Any], ...], "int | np.integer[Any]"], None], intrinsic(_prefetch_row))


@njit(inline="always")
def fetch_ahead(
    rows: NDArray[np.int64], k: int, readings: Readings, block_slot: NDArray[np.int64]
) -> tuple[np.uint64, np.uint64]:
    """For the loop at ``rows[k]``: fetches the series of the row ``2 * AHEAD`` on, and the time
    and value of the row ``AHEAD`` on, whose row and slot it returns (its series was fetched
    ``AHEAD`` rows ago). Past the last row, the last."""
    last = rows.shape[0] - 1
    series, time_us, value = readings
    prefetch_row((series,), np.uint64(rows[min(k + 2 * AHEAD, last)]))
    near = np.uint64(rows[min(k + AHEAD, last)])
    prefetch_row((time_us, value), near)
    return near, slot_of(block_slot, series[near])


@njit(inline="always")
def out_of_step(ahead: np.uint64, slot: np.uint64) -> bool:
    """Whether the slot ``AHEAD`` rows on is not ``AHEAD`` slots on: then fetch its state."""
    return bool(ahead - slot != _AHEAD)


@compiled
def assign_slots(
    rows: NDArray[np.int64],
    series: NDArray[np.int64],
    block_slot: NDArray[np.int64],
    block_series: NDArray[np.int64],
    blocks: int,
) -> int:
    """Hands the next block of slots to each block of ``series[rows]`` that has none (in order of
    first sight, recording each slot block's series block); returns how many are in use."""
    for k in range(rows.shape[0]):
        b = series[rows[k]] >> SERIES_BLOCK_BITS
        if block_slot[b] < 0:
            block_slot[b] = blocks << SERIES_BLOCK_BITS
            block_series[blocks] = b << SERIES_BLOCK_BITS
            blocks += 1
    return blocks


@compiled
def _counting_order(
    series: NDArray[np.int64], time_us: NDArray[np.int64], series_count: int
) -> tuple[NDArray[np.int64], bool]:
    """The time order by a counting sort on series, and whether some series has two rows."""
    size = series.shape[0]
    starts = np.zeros(series_count + 1, np.int64)
    repeats = False
    for i in range(size):
        starts[series[i] + 1] += 1
        repeats |= starts[series[i] + 1] > 1
    for s in range(series_count):
        starts[s + 1] += starts[s]
    order = np.empty(size, np.int64)
    fill = starts[:-1].copy()
    for i in range(size):
        s = series[i]
        order[fill[s]] = i
        fill[s] += 1
    # Each series' rows, in arrival order; put them in time order (stable insertion sort: a
    # series' readings almost always arrive in order already, which makes this linear).
    for s in range(series_count):
        for k in range(starts[s] + 1, starts[s + 1]):
            row = order[k]
            j = k - 1
            while j >= starts[s] and time_us[order[j]] > time_us[row]:
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = row
    return order, repeats


@compiled
def _in_order(series: NDArray[np.int64], time_us: NDArray[np.int64], series_count: int) -> int:
    """0 unless arrival order is already time order within every series (the usual case:
    Kafka keeps each device's records in order); then 1 if no series has two rows, else 2."""
    last = np.full(series_count, _NEVER, np.int64)
    repeats = False
    for i in range(series.shape[0]):
        s = series[i]
        if time_us[i] < last[s]:
            return 0
        repeats |= last[s] != _NEVER
        last[s] = time_us[i]
    return 2 if repeats else 1


def time_order(series: NDArray[np.int64], time_us: NDArray[np.int64]) -> NDArray[np.int64]:
    """Row indices such that each series' rows come in time order (ties: arrival order)."""
    return ordered(series, time_us)[0]


def ordered(series: NDArray[np.int64], time_us: NDArray[np.int64]) -> tuple[NDArray[np.int64], bool]:
    """``time_order``, and whether some series has more than one row."""
    size = len(series)
    if size == 0:
        return np.empty(0, np.int64), False
    series_count = int(series.max()) + 1
    order: NDArray[np.int64]
    if series_count > 16 * size:
        # Few rows over many series: sorting the rows beats a pass over every series.
        span = int(time_us.max() - time_us.min())
        if series_count < 1 << 22 and span < 1 << 41:
            order = np.argsort((series << 41) | (time_us - time_us.min()), kind="stable")
        else:
            order = np.lexsort((time_us, series))
    else:
        state = _in_order(series, time_us, series_count)
        if state:
            return np.arange(size, dtype=np.int64), state == 2
        counted: tuple[NDArray[np.int64], bool] = _counting_order(series, time_us, series_count)
        return counted
    grouped = series[order]
    return order, bool((grouped[1:] == grouped[:-1]).any())


class EwmaState(NamedTuple):
    """ewma_zscore's state arrays, one element per series slot."""

    mean: NDArray[np.float64]
    variance: NDArray[np.float64]
    slow_variance: NDArray[np.float64]
    count: NDArray[np.int32]  # type: ignore[assignment]  # hides tuple.count
    last_time_us: NDArray[np.int64]


class EwmaParams(NamedTuple):
    alpha: float
    threshold: float
    warmup: int
    long_run_share: float
    # Per count, the weights of the mean and variance and of the long-run variance
    # (``detectors.ewma.weight_tables``); beyond them, ``alpha`` and ``alpha / 10`` if
    # ``settled``, else worked out in the kernel.
    weights: NDArray[np.float64]
    slow_weights: NDArray[np.float64]
    settled: bool
    # A reading older than its series' last by more than this is not scored.
    late_horizon_us: int


class EwmaPart(NamedTuple):
    """ewma_zscore's part of ``ewma_flatline_kernel``; ``on`` False: the kernel leaves it alone."""

    on: bool
    block_slot: NDArray[np.int64]
    state: EwmaState
    params: EwmaParams
    verdicts: Verdicts


class FlatlineState(NamedTuple):
    """flatline's state arrays, one element per series slot."""

    last_value: NDArray[np.float64]
    run: NDArray[np.int32]
    last_time_us: NDArray[np.int64]


class FlatlineParams(NamedTuple):
    window: int
    tolerance: float


class FlatlinePart(NamedTuple):
    """flatline's part of ``ewma_flatline_kernel``; ``on`` False: the kernel leaves it alone."""

    on: bool
    block_slot: NDArray[np.int64]
    state: FlatlineState
    params: FlatlineParams


# Each part when it is off: empty arrays and zeros of its types (the kernel reads none of
# them), so that every call of the kernel has one signature.
EWMA_OFF = EwmaPart(
    False,
    np.empty(0, np.int64),
    EwmaState(np.empty(0), np.empty(0), np.empty(0), np.empty(0, np.int32), np.empty(0, np.int64)),
    EwmaParams(0.0, 0.0, 0, 0.0, np.empty(0), np.empty(0), True, 0),
    Verdicts(np.empty(0, np.float32), np.empty(0, np.bool_), np.empty(0, np.uint8)),
)
FLATLINE_OFF = FlatlinePart(
    False,
    np.empty(0, np.int64),
    FlatlineState(np.empty(0), np.empty(0, np.int32), np.empty(0, np.int64)),
    FlatlineParams(0, 0.0),
)


@compiled
def ewma_flatline_kernel(
    rows: NDArray[np.int64], readings: Readings, ewma: EwmaPart, flatline: FlatlinePart, same_slots: bool
) -> NDArray[np.int64]:
    """ewma_zscore and flatline (each if ``on``) in one walk over the rows, each with its own
    slots and state. The two walk the same rows in the usual configuration, and one walk reads
    and fetches each row, its series, time and value once for both, which costs less than two
    walks (``DetectionStage`` pairs them). One kernel for the pair and for each alone, so each
    detector's logic is written once (not a helper taking the state arrays: numba counts
    references to each array on every call, which made that far slower).

    ewma_zscore's verdicts go to its ``verdicts`` (by position in ``rows``). flatline returns
    the positions in ``rows`` of the readings that complete a stuck window (collected here, few
    as they are, rather than flagged in an array as long as the rows). Only that reading: one
    anomaly per stuck stretch. ``same_slots``: both run and their slot tables are equal (so are
    their slots, and flatline's need not be worked out)."""
    series, time_us, value = readings
    # Every array out of its bundle once, here, so the loop reads as the recurrence it computes.
    run_ewma, ewma_slots, ewma_state = ewma.on, ewma.block_slot, ewma.state
    mean, variance, slow_variance, count, last_time = ewma_state
    alpha, threshold, warmup, long_run_share, weights, slow_weights, settled, late_horizon = ewma.params
    score, flagged, reason = ewma.verdicts
    run_flatline, flatline_slots, flatline_state = flatline.on, flatline.block_slot, flatline.state
    last_value, run, flatline_last_time = flatline_state
    window, tolerance = flatline.params
    hits = np.empty(rows.shape[0] if run_flatline else 0, np.int64)
    found = 0
    # The slots of one or the other, to fetch ahead by (each hands out slots alike, a block at a
    # time as its metrics' series appear, so in a pair the two are in step).
    table = ewma_slots if run_ewma else flatline_slots
    for k in range(rows.shape[0]):
        i = np.uint64(rows[k])
        _, ahead = fetch_ahead(rows, k, readings, table)
        v = value[i]
        t = time_us[i]
        if run_ewma:
            s = slot_of(ewma_slots, series[i])
            if out_of_step(ahead, s):
                prefetch_row(ewma_state, ahead)
            m = mean[s]
            spread = max(variance[s], long_run_share * slow_variance[s])
            deviation = np.sqrt(spread) + 1e-6 + 1e-3 * abs(m)
            z = (v - m) / deviation
            absolute = abs(z)
            if not np.isfinite(absolute):
                absolute = 0.0  # a non-finite value is neither scored nor learned
            seen = count[s]
            # (Added to t, not taken from the last time: that starts at the lowest int64.)
            if seen >= warmup and t + late_horizon >= last_time[s]:
                score[k] = absolute / (absolute + threshold)
                if absolute >= threshold:
                    flagged[k] = True
                    reason[k] = 1 if z > 0 else 2
            # Late or repeated readings are scored above (if within the horizon) but leave the
            # state alone.
            if t > last_time[s] and np.isfinite(v):
                learned = v
                if seen >= warmup:
                    learned = min(max(v, m - threshold * deviation), m + threshold * deviation)
                if seen < weights.shape[0]:
                    weight, slow = weights[np.uint64(seen)], slow_weights[np.uint64(seen)]
                elif settled:
                    weight, slow = alpha, alpha / 10
                else:
                    weight = max(alpha, 1.0 / (seen + 1))
                    slow = max(weight / 10, 1.0 / seen)
                difference = learned - m
                increment = weight * difference
                mean[s] = m + increment
                variance[s] = 0.0 if seen == 0 else (1 - weight) * (variance[s] + difference * increment)
                if seen > 0:
                    slow_variance[s] += slow * (difference * difference - slow_variance[s])
                count[s] = seen + 1
                last_time[s] = t
        if run_flatline:
            f = s if same_slots else slot_of(flatline_slots, series[i])
            if out_of_step(ahead, f):
                prefetch_row(flatline_state, ahead)
            # Late or repeated readings neither extend nor break a run.
            if t > flatline_last_time[f]:
                run[f] = run[f] + 1 if abs(v - last_value[f]) <= tolerance else 1
                if run[f] == window:
                    hits[found] = k
                    found += 1
                last_value[f] = v
                flatline_last_time[f] = t
    return hits[:found]


@compiled
def group_percentile(
    group: NDArray[np.int32], value: NDArray[np.int64], percent: float
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """For each group (small integers, -1 allowed) present: the ``percent`` percentile of its
    values, as ``np.percentile`` gives it. One counting pass instead of a mask per group."""
    lowest, highest = group.min(), group.max()
    counts = np.zeros(highest - lowest + 2, np.int64)
    for i in range(group.shape[0]):
        counts[group[i] - lowest + 1] += 1
    starts = np.cumsum(counts)
    grouped = np.empty(group.shape[0], np.int64)
    fill = starts[:-1].copy()
    for i in range(group.shape[0]):
        g = group[i] - lowest
        grouped[fill[g]] = value[i]
        fill[g] += 1
    present = np.flatnonzero(counts[1:])
    result = np.empty(present.shape[0])
    for k in range(present.shape[0]):
        g = present[k]
        result[k] = np.percentile(grouped[starts[g] : starts[g + 1]], percent)
    return present + lowest, result


@compiled
def advance_clocks(
    partition: NDArray[np.int32],
    series: NDArray[np.int64],
    time_us: NDArray[np.int64],
    step: int,
    percent: float,
    clock: NDArray[np.int64],
) -> tuple[int, int]:
    """Moves each partition's clock (``clock``, by partition) up to the ``percent`` percentile
    of the times of its rows among every ``step``-th row, never back. Returns the latest clock
    and 0; or, if ``clock`` is too short for a partition of the sample, changes nothing and
    returns the length it needs second. Rows of series with no partition yet (-1) are left out."""
    size = (series.shape[0] + step - 1) // step
    group = np.empty(size, np.int32)
    value = np.empty(size, np.int64)
    needed = 0
    for j in range(size):
        group[j] = partition[series[j * step]]
        value[j] = time_us[j * step]
        needed = max(needed, group[j] + 1)
    if needed > clock.shape[0]:
        return _NEVER, needed
    if size:
        present, percentile = group_percentile(group, value, percent)
        for k in range(present.shape[0]):
            if present[k] >= 0:
                clock[present[k]] = max(clock[present[k]], np.int64(percentile[k]))
    return (clock.max() if clock.shape[0] else _NEVER), 0


@compiled
def group_rows(
    order: NDArray[np.int64],
    metric: NDArray[np.int64],
    value: NDArray[np.float64],
    rank: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The rows of ``order`` with a finite value, grouped by metric code and in ``order`` within
    a code (so each series' rows keep their order). Code c's rows are group ``rank[c]``:
    ``grouped[starts[rank[c]]:starts[rank[c] + 1]]``. A counting sort, one placement per row;
    any selection of metrics is then a few slices of it."""
    groups = rank.shape[0]
    starts = np.zeros(groups + 1, np.int64)
    for i in range(metric.shape[0]):
        if np.isfinite(value[i]):
            starts[rank[metric[i]] + 1] += 1
    for group in range(groups):
        starts[group + 1] += starts[group]
    grouped = np.empty(starts[groups], np.int64)
    fill = starts[:-1].copy()
    for k in range(order.shape[0]):
        row = np.uint64(order[k])
        if np.isfinite(value[row]):
            place = np.uint64(rank[np.uint64(metric[row])])
            grouped[np.uint64(fill[place])] = row
            fill[place] += 1
    return grouped, starts


@compiled
def group_arrival_rows(
    series: NDArray[np.int64],
    time_us: NDArray[np.int64],
    metric: NDArray[np.int64],
    value: NDArray[np.float64],
    rank: NDArray[np.int64],
    series_count: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64], int]:
    """``group_rows`` of the rows in arrival order, and in the same pass over the batch the
    check ``_in_order`` makes: 0 unless arrival order is time order within every series (then
    nothing is grouped), else 1 if no series has two rows, else 2; or ``CODE_BEYOND_TABLE`` if
    a metric code has no place in ``rank``. The usual batch is in order
    (Kafka keeps each device's records in order). The first pass notes each row's group, so
    the second reads one number per row instead of its metric and value again."""
    groups = rank.shape[0]
    size = series.shape[0]
    counts = np.zeros(groups + 1, np.int64)
    last = np.full(series_count, _NEVER, np.int64)
    # Per row: its group, or ``groups`` for a value that is not finite (left out). Two bytes a
    # row, read again by the second pass (callers keep ``groups`` below 2**15).
    row_group = np.empty(size, np.int16)
    repeats = False
    for i in range(size):
        s = np.uint64(series[i])
        t = time_us[i]
        if t < last[s]:
            return np.empty(0, np.int64), counts, 0
        repeats |= last[s] != _NEVER
        last[s] = t
        code = np.uint64(metric[i])
        if code >= groups:
            return np.empty(0, np.int64), counts, CODE_BEYOND_TABLE
        group = rank[code] if np.isfinite(value[i]) else groups
        row_group[i] = group
        counts[np.uint64(group)] += 1
    starts = np.zeros(groups + 1, np.int64)
    for group in range(groups):
        starts[group + 1] = starts[group] + counts[group]
    grouped = np.empty(starts[groups], np.int64)
    fill = starts.copy()
    for i in range(size):
        place = np.uint64(row_group[i])
        if place < groups:
            grouped[np.uint64(fill[place])] = i
            fill[place] += 1
    return grouped, starts, 2 if repeats else 1
