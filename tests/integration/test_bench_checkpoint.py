"""`citytel bench checkpoint`: a partition's detector state saved with each compression."""

from __future__ import annotations

from citytel.devtools.bench import bench_checkpoint


def test_the_checkpoint_benchmark_saves_a_citys_state_with_lz4_and_with_pglz() -> None:
    result = bench_checkpoint(devices_per_kind=20, days=1, saves=3)
    series, blob_bytes = result["series"], result["blob_bytes"]
    assert isinstance(series, int)
    assert isinstance(blob_bytes, int)
    assert series > 0
    assert result["saves"] == 6
    median = result["median_per_save"]
    assert isinstance(median, dict)
    assert set(median) == {"lz4", "pglz"}
    for figures in median.values():
        assert figures["ms"] > 0
        # Each save rewrites the whole state: its WAL is about the stored size, which is at most
        # the blob (compressed where it pays).
        assert 0 < figures["stored_bytes"] <= blob_bytes
        assert figures["wal_bytes"] >= figures["stored_bytes"]
