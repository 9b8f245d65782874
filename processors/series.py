"""Dense integer indices for series, so detector state lives in flat numpy arrays.

A series is (device, metric). Devices and metrics get small integer codes; a series key is
``device_code << 16 | metric_code`` (int64), and keys map to dense indices through a sorted key
array and ``searchsorted``: a whole batch is looked up at once, with no Python object per series.

Dense indices can be handed out in blocks of one metric (``metric_blocks``): then every aligned
run of ``SERIES_BLOCK`` indices holds series of a single metric (``block_metric``), and a
detector that watches a few metrics keeps state for their blocks only
(``processors.detectors.SeriesState``), with no map per series. A block's unused tail stays a
gap: ``extent`` is one past the highest index, ``len`` the number of series.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["SERIES_BLOCK", "SERIES_BLOCK_BITS", "GrowableArray", "SeriesIndex", "held_bytes"]

# Series of one metric per aligned block of dense indices, in the detection stage's index: small
# enough that a block's unused tail costs little, large enough that the per-block tables of the
# detectors stay tiny (8 bytes per block). A power of two: kernels shift rather than divide.
SERIES_BLOCK_BITS = 6
SERIES_BLOCK = 1 << SERIES_BLOCK_BITS
_DOUBLE_UNTIL = 1 << 12


class GrowableArray:
    """A numpy array that grows its capacity as needed; ``view`` is the used part.

    Capacity doubles up to ``_DOUBLE_UNTIL`` elements, then grows by an eighth: a city that adds
    devices week by week pays at most 12.5% of unused capacity on its large state arrays (with
    doubling, up to 100%), for a few more copies when it grows, which is rare."""

    def __init__(self, dtype: type[np.generic], fill: int | float = 0, capacity: int = 1024, rows: int = 0) -> None:
        # ``rows``: a table of that many rows that grows along its columns instead.
        self._fill = fill
        self._rows = rows
        self._data = np.full((rows, capacity) if rows else capacity, fill, dtype=dtype)
        self._size = 0
        # The used part, made once per resize rather than on every read: kernels take a dozen
        # views per detector and batch.
        self._view = self._data[..., :0]

    def resize(self, size: int) -> None:
        if size <= self._size:
            return
        current = self._data.shape[-1]
        # A table keeps a spare column: its view [:, :size] then never spans the whole array, so
        # it is never C-contiguous and compiled kernels always see one array layout (a full one
        # would compile a second signature of every kernel that takes it, mid-stream).
        if size + (1 if self._rows else 0) > current:
            step = current if current < _DOUBLE_UNTIL else current // 8
            capacity = max(size + (1 if self._rows else 0), current + step)
            grown = np.full((self._rows, capacity) if self._rows else capacity, self._fill, dtype=self._data.dtype)
            grown[..., : self._size] = self._data[..., : self._size]
            self._data = grown
        self._size = size
        self._view = self._data[..., :size]

    @property
    def view(self) -> NDArray[Any]:
        return self._view

    @property
    def rows(self) -> int:
        """0 for a plain array; for a table, its rows (one column per series slot)."""
        return self._rows

    @property
    def allocated_bytes(self) -> int:
        return int(self._data.nbytes)

    def blank(self, size: int) -> NDArray[Any]:
        """``size`` elements at the start value, of this array's type (for a table, ``size`` rows
        of its row count: one per series, as a checkpoint holds them)."""
        return np.full((size, self._rows) if self._rows else size, self._fill, dtype=self._data.dtype)

    def __len__(self) -> int:
        return self._size


class SeriesIndex:
    def __init__(self, max_series: int, metric_blocks: bool = False) -> None:
        self.max_series = max_series
        self.block = SERIES_BLOCK if metric_blocks else 1
        # With blocks: each block's metric code.
        self.block_metric = GrowableArray(np.int64, fill=-1)
        self._count = 0
        # Per metric code: the next free index of its open block, and that block's end.
        self._open: dict[int, tuple[int, int]] = {}
        self.device_codes: dict[str, int] = {}
        self.devices: list[tuple[str, str, str]] = []  # (device_id, kind, district) by device code
        self.district_codes: dict[str, int] = {}
        self.device_district = GrowableArray(np.int64)  # district code by device code
        self.metric_codes: dict[str, int] = {}
        self.metrics: list[str] = []
        self._sorted_keys = np.empty(0, np.int64)
        self._sorted_dense = np.empty(0, np.int32)  # dense indices stay below max_series
        self.series_key = GrowableArray(np.int64, fill=-1)  # -1: a gap at the end of a block
        self.partition = GrowableArray(np.int32, fill=-1)  # the Kafka partition the series arrives on

    def __len__(self) -> int:
        return self._count

    @property
    def extent(self) -> int:
        """One past the highest dense index: the length of arrays indexed by series."""
        return len(self.series_key)

    def device_code(self, device_id: str, kind: str, district: str) -> int:
        code = self.device_codes.get(device_id)
        if code is None:
            code = len(self.devices)
            self.device_codes[device_id] = code
            self.devices.append((device_id, kind, district))
            self.device_district.resize(code + 1)
            self.device_district.view[code] = self.district_codes.setdefault(district, len(self.district_codes))
        return code

    def add_metrics(self, names: set[str]) -> None:
        for name in sorted(names - self.metric_codes.keys()):
            if len(self.metrics) >= 1 << 16:
                raise OverflowError("more than 65536 distinct metric names")
            self.metric_codes[name] = len(self.metrics)
            self.metrics.append(name)

    @staticmethod
    def keys(device_code: NDArray[np.int64], metric_code: NDArray[np.int64]) -> NDArray[np.int64]:
        return (device_code << 16) | metric_code

    def lookup(self, keys: NDArray[np.int64]) -> NDArray[np.int64]:
        """Dense indices for series keys, adding the unseen ones."""
        unique, inverse = np.unique(keys, return_inverse=True)
        position = np.searchsorted(self._sorted_keys, unique)
        clipped = np.minimum(position, max(len(self._sorted_keys) - 1, 0))
        found = (
            (position < len(self._sorted_keys)) & (self._sorted_keys[clipped] == unique)
            if len(self._sorted_keys)
            else np.zeros(len(unique), bool)
        )
        dense = np.empty(len(unique), np.int64)
        dense[found] = self._sorted_dense[clipped[found]]
        new_keys = unique[~found]
        if len(new_keys):
            if self._count + len(new_keys) > self.max_series:
                raise OverflowError(f"more than processor.max_series={self.max_series} series")
            new_dense = self._place(new_keys)
            dense[~found] = new_dense
            self._count += len(new_keys)
            self.series_key.resize(self.extent)
            self.partition.resize(self.extent)
            self.series_key.view[new_dense] = new_keys
            merged_keys = np.concatenate([self._sorted_keys, new_keys])
            merged_dense = np.concatenate([self._sorted_dense, new_dense.astype(np.int32)])
            order = np.argsort(merged_keys, kind="stable")
            self._sorted_keys = merged_keys[order]
            self._sorted_dense = merged_dense[order]
        result: NDArray[np.int64] = dense[inverse.reshape(-1)]
        return result

    def _place(self, new_keys: NDArray[np.int64]) -> NDArray[np.int64]:
        """Dense indices for new series: the next ones, or with blocks, the free ones of their
        metric's open block, then whole new blocks (a loop per metric, not per series)."""
        start = self.extent
        if self.block == 1:
            self.series_key.resize(start + len(new_keys))
            return np.arange(start, start + len(new_keys), dtype=np.int64)
        metrics = new_keys & 0xFFFF
        order = np.argsort(metrics, kind="stable")
        codes, counts = np.unique(metrics[order], return_counts=True)
        placed = np.empty(len(new_keys), np.int64)
        taken = 0
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            free, end = self._open.get(code, (0, 0))
            in_open = min(end - free, count)
            rest = count - in_open
            blocks = -(-rest // self.block)
            first = self.extent
            self.series_key.resize(first + blocks * self.block)
            self.block_metric.resize(self.extent // self.block)
            self.block_metric.view[first // self.block :] = code
            indices = np.concatenate([np.arange(free, free + in_open), np.arange(first, first + rest)])
            placed[order[taken : taken + count]] = indices
            taken += count
            self._open[code] = (first + rest, self.extent) if blocks else (free + in_open, end)
        return placed

    def describe(self, dense: NDArray[np.int64]) -> list[tuple[str, str, str, str]]:
        """(device_id, kind, district, metric) of some series: for the rare new-series path only."""
        keys = self.series_key.view[dense].astype(np.int64)
        return [(*self.devices[int(key >> 16)], self.metrics[int(key & 0xFFFF)]) for key in keys]


def held_bytes(owner: object, allocated: bool = False) -> int:
    """The bytes of the numpy arrays an object holds (its growable arrays' used part, or with
    ``allocated`` their whole capacity), a series index's included: how much state it keeps."""
    total = 0
    seen: set[int] = set()
    # Arrays held directly or in a dict (a detector's ``state``), each counted once.
    values = list(vars(owner).values())
    values += [item for value in values if isinstance(value, dict) for item in value.values()]
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, GrowableArray):
            total += value.allocated_bytes if allocated else value.view.nbytes
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, SeriesIndex):
            total += held_bytes(value, allocated)
    return total
