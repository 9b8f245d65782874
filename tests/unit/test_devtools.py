"""The development tools' command wrapper: what happens around every bench, chaos and run."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from citytel.config import default_config_path as config_path
from citytel.devtools.bench_e2e import _bucket_quantile_ms, _median_run, _wait_cpu_quiet, targets
from citytel.devtools.commands import _reporting_stack_errors
from citytel.devtools.stack import PostgresCpu, StackError, postgres_cpu_by_kind, postgres_kind


def test_sigterm_unwinds_a_tool_so_that_its_finally_stops_its_servers() -> None:
    stopped: list[str] = []

    @_reporting_stack_errors
    def tool(_arguments: argparse.Namespace) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted at once by the handler's exception
            return 0
        finally:
            stopped.append("private servers")

    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        tool(argparse.Namespace())
    assert stopped == ["private servers"]
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is before, "the caller's handler is put back"


def test_a_stack_error_is_one_line_and_exit_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    @_reporting_stack_errors
    def tool(_arguments: argparse.Namespace) -> int:
        raise StackError("kafka did not start: port 9092 in use")

    assert tool(argparse.Namespace()) == 1
    assert capsys.readouterr().err == "citytel: kafka did not start: port 9092 in use\n"


def test_a_quantile_of_the_readings_written_between_two_histogram_samples() -> None:
    before = {0.01: 5.0, 0.05: 10.0, 0.25: 10.0, float("inf"): 10.0}
    # 100 readings written since: 60 within 10 ms, 39 more within 50 ms, 1 within 250 ms.
    after = {0.01: 65.0, 0.05: 109.0, 0.25: 110.0, float("inf"): 110.0}
    assert _bucket_quantile_ms(before, after, 0.5) == 10.0
    assert _bucket_quantile_ms(before, after, 0.99) == 50.0
    assert _bucket_quantile_ms(before, after, 1.0) == 250.0
    assert _bucket_quantile_ms(after, after, 0.5) is None, "nothing written: no quantile"


def test_a_part_run_several_times_reports_its_median_run_and_every_runs_rate() -> None:
    runs = [
        {"readings_per_s": 210, "processes": {"bridge": 1.0}},
        {"readings_per_s": 180, "processes": {"bridge": 2.0}},
        {"readings_per_s": 250, "processes": {"bridge": 3.0}},
    ]
    median = _median_run(runs)
    # The median run's own figures, not a mix of runs.
    assert median["readings_per_s"] == 210
    assert median["processes"] == {"bridge": 1.0}
    assert median["readings_per_s_runs"] == [210, 180, 250], "in run order"
    # Of two, the slower: the figure never rounds up.
    assert _median_run(runs[:1] + runs[2:])["readings_per_s"] == 210
    assert _median_run(runs[1:2]) == {**runs[1], "readings_per_s_runs": [180]}


def _run_figures(p99_by_share: dict[float, float], processor_vs_copy: float) -> dict[str, Any]:
    drain = 20_000
    return {
        "citytel_qos1": {"msg_per_s": drain},
        "offered_load": [
            {"offered_msg_per_s": round(share * drain), "latency_ms": {"p50": 12.0, "p99": p99}}
            for share, p99 in p99_by_share.items()
        ],
        "ratios": {
            "bridge_cpu_vs_bare_paho": 0.4,
            "pipeline_cpu_us_per_message": 80.0,
            "e2e_qos1_vs_telegraf": 1.2,
            "e2e_readings_per_s_largest_packs_vs_telegraf": None,  # no Telegraf in this run
            "e2e_readings_per_s_largest_packs_vs_processor_alone": 0.9,
            "processor_alone_vs_raw_copy": processor_vs_copy,
        },
    }


def test_a_run_s_targets_say_which_figures_are_within_their_limits() -> None:
    result = targets(_run_figures({0.01: 20.0, 0.1: 30.0, 0.25: 99.0, 0.5: 101.0, 0.8: 250.0, 1.0: 3000.0}, 0.8))
    missed = {target["name"] for target in result if not target["met"]}
    assert missed == {"p99 publish → row ms at 50% load", "largest packs' readings/s / Telegraf's"}
    by_name = {target["name"]: target for target in result}
    # Every step up to half load has the 100 ms limit, 80 % the 250 ms one, full load none.
    assert [name for name in by_name if name.startswith("p99")] == [
        f"p99 publish → row ms at {share} load" for share in ("1%", "10%", "25%", "50%", "80%")
    ]
    assert by_name["p99 publish → row ms at 80% load"]["limit"] == 250.0
    assert by_name["p50 publish → row ms at 1% load"] == {
        "name": "p50 publish → row ms at 1% load",
        "value": 12.0,
        "limit": 30.0,
        "bound": "max",
        "met": True,
    }
    # A figure at its limit meets it, from either side; just past it does not.
    assert by_name["the processor alone / the run's first raw COPY"]["met"]
    slower = targets(_run_figures({0.01: 20.0, 0.8: 250.1}, 0.799))
    assert {target["name"] for target in slower if not target["met"]} == {
        "p99 publish → row ms at 80% load",
        "largest packs' readings/s / Telegraf's",
        "the processor alone / the run's first raw COPY",
    }


def test_the_warm_up_waits_while_a_process_is_busy_and_no_longer() -> None:
    # A child that spins for about 3 s, then sleeps: the wait ends once it sleeps.
    spin = "import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        waited = _wait_cpu_quiet(child.pid, timeout=20)
        assert 1.0 <= waited <= 10.0, "waited while it spun, and stopped once it slept"
        assert _wait_cpu_quiet(child.pid, timeout=20) <= 3.0, "quiet at once"
        assert _wait_cpu_quiet(child.pid, below_cores=-1.0, timeout=2) >= 2.0, "gives up"
    finally:
        child.kill()
        child.wait()


def test_the_load_generators_connect_packet_carries_its_login() -> None:
    from citytel.devtools.bench_e2e import _connect_packet, _remaining_length
    from citytel.devtools.stack import MqttClientAuth

    assert _remaining_length(127) == b"\x7f"
    assert _remaining_length(128) == b"\x80\x01"
    assert _remaining_length(16_383) == b"\xff\x7f"
    anonymous = _connect_packet(b"load", None)
    assert anonymous == b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04load"
    packet = _connect_packet(b"load", MqttClientAuth("gw", "s" * 200))
    assert packet[0] == 0x10
    # Remaining length in two bytes (over 127), flags: user name, password, clean session.
    length = (packet[1] & 0x7F) + (packet[2] << 7)
    assert length == len(packet) - 3
    assert packet[3 + 7] == 0xC2
    assert packet.endswith(b"\x00\x02gw\x00\xc8" + b"s" * 200)


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    import socket

    from citytel.devtools import stack

    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(stack._LOWEST_PORT <= port < stack._ephemeral_start() for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", ports[0]))


def test_a_scratch_dir_is_removed_after_a_run_and_kept_after_a_failure() -> None:
    from citytel.devtools import stack

    for failed in (False, True):
        run_dir = stack.scratch_dir("citytel-unit-")
        (run_dir / "server.log").write_text("the server's log\n")
        assert run_dir.stat().st_mode & 0o777 == 0o755
        stack.discard_scratch_dir(run_dir, failed=failed)
        assert run_dir.exists() == failed
        if failed:
            (run_dir / "server.log").unlink()
            run_dir.rmdir()


def test_kafka_records_of_a_gateways_pack_carry_every_reading_its_payload_does() -> None:
    import itertools

    from citytel.core.envelope import decode_envelope
    from citytel.devtools.evaluate import kafka_records
    from citytel.devtools.simulate import City, pack
    from citytel.ingest.codecs import get_codec

    city = City(2, seed=5)
    packs = list(itertools.islice(pack(city.messages(1_795_000_000.0, 1.0), 20), 30))
    codec = get_codec("json")
    for message, record in zip(packs, kafka_records(packs, 6), strict=True):
        envelope = decode_envelope(record.value)
        from_payload = [
            (reading.time_us, metric, value)
            for reading in codec.decode(message.payload).readings
            for metric, value in reading.values.items()
        ]
        assert message.readings == 20
        assert list(zip(envelope.times_us, envelope.metrics, envelope.values, strict=True)) == from_payload
        assert envelope.received_us == max(envelope.times_us)


def test_a_bench_given_config_reads_its_settings_from_that_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    from citytel.config import load_settings
    from citytel.devtools import bench_e2e
    from citytel.devtools.commands import _bench

    shipped = load_settings()
    config = tmp_path / "one-writer.toml"
    text = config_path().read_text()
    assert "writes_in_flight = 2 " in text
    config.write_text(text.replace("writes_in_flight = 2 ", "writes_in_flight = 1 "))
    seen: list[int] = []
    # Set here first so that the test restores it: _bench sets it for the rest of the process.
    monkeypatch.setenv("CITYTEL_CONFIG", str(config_path()))

    def main_e2e(*_: object) -> int:
        seen.append(load_settings().processor.writes_in_flight)
        return 0

    monkeypatch.setattr(bench_e2e, "main_e2e", main_e2e)
    arguments = argparse.Namespace(
        scenario="e2e",
        cluster=False,
        config=str(config),
        messages=10,
        output=None,
        plot=None,
        step_seconds=1.0,
        secure=False,
        readings_per_message="",
    )
    assert _bench(arguments) == 0
    assert seen == [1]
    assert shipped.processor.writes_in_flight == 2


def test_postgres_processes_are_told_apart_by_the_titles_they_set() -> None:
    assert postgres_kind("/usr/lib/postgresql/15/bin/postgres -D /tmp/x/data -p 25419") == "postmaster"
    assert postgres_kind("postgres: walwriter") == "walwriter"
    assert postgres_kind("postgres: autovacuum worker citytel") == "autovacuum"
    assert postgres_kind("postgres: autovacuum launcher") == "autovacuum"
    assert postgres_kind("postgres: TimescaleDB Background Worker Scheduler") == "TimescaleDB"
    assert postgres_kind("postgres: citytel citytel 127.0.0.1(51234) idle") == "client backends"
    assert postgres_kind("postgres: citytel citytel [local] COPY") == "client backends"
    # A client whose login is named like a worker is still a client.
    assert postgres_kind("postgres: walwriter citytel 127.0.0.1(5) COPY") == "client backends"
    assert postgres_kind("postgres: logical replication launcher") == "other server processes"


def test_postgres_cpu_by_kind_counts_what_each_kind_used_between_two_moments() -> None:
    before = PostgresCpu({1: ("postmaster", 1.0), 10: ("client backends", 5.0), 11: ("autovacuum", 2.0)}, 3.0)
    # Backend 10 used 1.5 s more; the autovacuum worker 11 ended (its 2.0 s, plus 0.5 s since,
    # went to the postmaster's reaped time); a new backend 12 used 0.25 s.
    after = PostgresCpu({1: ("postmaster", 1.0), 10: ("client backends", 6.5), 12: ("client backends", 0.25)}, 5.5)
    assert postgres_cpu_by_kind(before, after) == {"postmaster": 0.0, "client backends": 1.75, "ended": 0.5}
