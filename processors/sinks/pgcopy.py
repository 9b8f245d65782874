"""PostgreSQL's binary COPY format, built from numpy columns in one vectorized step.

Every row of a binary COPY is: field count (int16), then per field its byte length (int32) and
its bytes, all big-endian. When every field has a fixed width the whole body is one numpy
structured array, so a batch of any size is encoded without a Python loop per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["COPY_HEADER", "COPY_TRAILER", "Column", "copy_body"]

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
COPY_TRAILER = b"\xff\xff"
# timestamptz is microseconds since 2000-01-01 UTC; citytel keeps microseconds since 1970.
_POSTGRES_EPOCH_US = 946_684_800_000_000

_WIRE_TYPES = {"timestamptz": ">i8", "int2": ">i2", "int4": ">i4", "int8": ">i8", "float8": ">f8", "float4": ">f4"}


@dataclass(frozen=True, slots=True)
class Column:
    """One column: ``pg_type`` is a key of the table above."""

    pg_type: str
    values: NDArray[np.generic]


def copy_body(columns: Sequence[Column], rows: int) -> bytes:
    fields: list[tuple[str, str]] = [("field_count", ">i2")]
    for position, column in enumerate(columns):
        fields += [(f"length{position}", ">i4"), (f"value{position}", _WIRE_TYPES[column.pg_type])]
    body = np.empty(rows, dtype=np.dtype(fields))
    body["field_count"] = len(columns)
    for position, column in enumerate(columns):
        if len(column.values) != rows:
            raise ValueError(f"column {position} ({column.pg_type}) needs {rows} values")
        body[f"length{position}"] = np.dtype(_WIRE_TYPES[column.pg_type]).itemsize
        values = column.values
        if column.pg_type == "timestamptz":
            values = values.astype(np.int64) - _POSTGRES_EPOCH_US
        body[f"value{position}"] = values
    return body.tobytes()
