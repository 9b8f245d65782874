"""Dense integer indices for series, so detector state lives in flat numpy arrays.

A series is (device, metric). Devices and metrics get small integer codes; a series key is
``device_code << 16 | metric_code`` (int64), and keys map to dense indices through a sorted key
array and ``searchsorted``: a whole batch is looked up at once, with no Python object per series.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["GrowableArray", "SeriesIndex"]


class GrowableArray:
    """A numpy array that doubles its capacity as it grows; ``view`` is the used part."""

    def __init__(self, dtype: type[np.generic], fill: int | float = 0, capacity: int = 1024) -> None:
        self._fill = fill
        self._data = np.full(capacity, fill, dtype=dtype)
        self._size = 0

    def resize(self, size: int) -> None:
        if size > len(self._data):
            capacity = max(size, 2 * len(self._data))
            grown = np.full(capacity, self._fill, dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._size = max(self._size, size)

    @property
    def view(self) -> NDArray[Any]:
        return self._data[: self._size]

    def __len__(self) -> int:
        return self._size


class SeriesIndex:
    def __init__(self, max_series: int) -> None:
        self.max_series = max_series
        self.device_codes: dict[str, int] = {}
        self.devices: list[tuple[str, str, str]] = []  # (device_id, kind, district) by device code
        self.district_codes: dict[str, int] = {}
        self.device_district = GrowableArray(np.int64)  # district code by device code
        self.metric_codes: dict[str, int] = {}
        self.metrics: list[str] = []
        self._sorted_keys = np.empty(0, np.int64)
        self._sorted_dense = np.empty(0, np.int64)
        self.series_key = GrowableArray(np.int64)
        self.db_id = GrowableArray(np.int32)  # 0 until the database has assigned an id
        self.partition = GrowableArray(np.int32, fill=-1)  # the Kafka partition the series arrives on

    def __len__(self) -> int:
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
            start = len(self)
            if start + len(new_keys) > self.max_series:
                raise OverflowError(f"more than processor.max_series={self.max_series} series")
            new_dense = np.arange(start, start + len(new_keys), dtype=np.int64)
            dense[~found] = new_dense
            self.series_key.resize(start + len(new_keys))
            self.db_id.resize(start + len(new_keys))
            self.partition.resize(start + len(new_keys))
            self.series_key.view[start:] = new_keys
            merged_keys = np.concatenate([self._sorted_keys, new_keys])
            merged_dense = np.concatenate([self._sorted_dense, new_dense])
            order = np.argsort(merged_keys, kind="stable")
            self._sorted_keys = merged_keys[order]
            self._sorted_dense = merged_dense[order]
        result: NDArray[np.int64] = dense[inverse.reshape(-1)]
        return result

    def describe(self, dense: NDArray[np.int64]) -> list[tuple[str, str, str, str]]:
        """(device_id, kind, district, metric) of some series: for the rare new-series path only."""
        keys = self.series_key.view[dense].astype(np.int64)
        return [(*self.devices[int(key >> 16)], self.metrics[int(key & 0xFFFF)]) for key in keys]
