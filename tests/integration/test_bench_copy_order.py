from __future__ import annotations

from citytel.devtools.bench import bench_copy_order


def test_the_copy_order_bench_stores_every_row_in_each_variant_and_times_each_sample() -> None:
    # Small: this checks the bench works (every row stored, a figure per sample), not the figures.
    result = bench_copy_order(rows=200_000, series=1_000, batch=25_000, runs=1, sample_rows=50_000)
    samples = result["postgres_cpu_us_per_row_each_sample"]
    assert isinstance(samples, dict)
    assert set(samples) == {"arrival", "key_order", "key_order_time_btree"}
    assert all(len(values) == 4 and all(value > 0 for value in values) for values in samples.values())
    assert 0 < float(str(result["key_order_vs_arrival"])) < 10
    assert 0 < float(str(result["time_brin_vs_btree"])) < 10
