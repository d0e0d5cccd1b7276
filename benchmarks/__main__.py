"""``python -m benchmarks``: measure the foundation's hot paths on this machine.

Each figure is a median over repeats. The broker figures use the embedded
broker on loopback, so they measure wattstream plus tansu on this machine,
not a production cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from benchmarks.backtest import bench_backtest
from benchmarks.detect import bench_detect
from benchmarks.e2e import bench_e2e, bench_scale_out
from benchmarks.memory import bench_memory
from benchmarks.ocpp import bench_ocpp
from benchmarks.peer import bench_peer
from benchmarks.scram import bench_scram_latency
from benchmarks.steps import bench_steps
from ingest.replay import Replay, read_telemetry, site_batches
from pipeline import codec, kafka, topics
from pipeline.detector_eval import HarnessConfig, evaluate
from pipeline.local import EmbeddedBroker, with_embedded_broker
from pipeline.schemas import BatteryReading, PriceTick
from pipeline.settings import BatteryConfig, ReplaySettings, SiteConfig, load_settings
from processors.arbitrage import SiteArbitrage, SiteState, battery_model, decide_threshold
from processors.optimal import RollingOptimizer
from sinks.columnar import encode_telemetry
from sinks.influx import InfluxSink
from sinks.lineprotocol import telemetry_lines
from tests.servers import InfluxDB1, VictoriaMetrics

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"


def median_seconds(function: Callable[[], object], repeats: int = 7) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def bench_rule() -> dict[str, float]:
    battery = BatteryConfig(
        device="b",
        capacity_kwh=10,
        max_charge_kw=5,
        max_discharge_kw=5,
        charge_below_price_per_kwh=0.05,
        discharge_above_price_per_kwh=0.15,
    )
    calls = 100_000
    elapsed = median_seconds(
        lambda: [decide_threshold(battery, 50.0, (i % 20) / 100, 1.0) for i in range(calls)]
    )
    site = SiteConfig(id="s", market="M", batteries=[battery])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    batches = [
        [
            BatteryReading(
                device="b", ts=start + timedelta(minutes=60 * h + m), power_kw=0.0, soc_pct=50
            )
            for m in range(60)
        ]
        for h in range(200)
    ]
    ticks = [
        PriceTick(
            market="M",
            start=start + timedelta(hours=h),
            end=start + timedelta(hours=h + 1),
            price_per_kwh=(h % 10) / 50,
        )
        for h in range(200)
    ]

    def run_batches() -> list[float]:
        engine, state = SiteArbitrage(site), SiteState()
        per_batch = []
        for tick, batch in zip(ticks, batches, strict=True):
            engine.on_price(state, tick)
            began = time.perf_counter()
            engine.on_readings(state, batch)
            SiteState.from_json(state.to_json())  # what the agent pays to read/write its table
            per_batch.append(time.perf_counter() - began)
        return per_batch

    per_batch = run_batches()
    return {
        "rule_decisions_per_s": calls / elapsed,
        "decision_time_per_batch_median_ms": statistics.median(per_batch) * 1000,
    }


def bench_replay_encode() -> dict[str, float]:
    path = SAMPLE / "telemetry.parquet"
    frame, _ = read_telemetry(path)

    def encode_all() -> int:
        return sum(
            batch.readings
            for batches in site_batches(frame, "bench", ReplaySettings())
            for batch, _ in batches
            if batch
        )

    readings = encode_all()
    elapsed = median_seconds(encode_all, repeats=3)
    return {"replay_encode_readings_per_s": readings / elapsed}


async def _replay_into_broker(settings_file: Path, broker: EmbeddedBroker) -> float:
    settings = with_embedded_broker(
        load_settings(settings_file, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}."), broker
    )
    await kafka.ensure_topics(settings)
    stats = await Replay(settings, SAMPLE / "telemetry.parquet", SAMPLE / "prices.csv").run()
    return stats.readings_sent / stats.elapsed_s


def bench_replay_broker() -> dict[str, float]:
    with EmbeddedBroker() as broker:
        rates = [
            asyncio.run(_replay_into_broker(SAMPLE / "wattstream.toml", broker)) for _ in range(3)
        ]
    return {"replay_into_broker_readings_per_s": statistics.median(rates)}


async def _modbus_poll_rate(
    broker: EmbeddedBroker, devices: int, window_s: float
) -> dict[str, float]:
    from ingest.modbus import ModbusConfig, ModbusConnector
    from ingest.simulators import sunspec_server as sim

    settings = with_embedded_broker(
        load_settings(topic_prefix=f"bench-{uuid.uuid4().hex[:8]}."), broker
    )
    await kafka.ensure_topics(settings)
    simulated = [
        [sim.inverter(1, 3000.0), sim.battery(2, 60.0, -500.0), sim.meter(3, 1200.0)]
        for _ in range(devices // 3)
    ]
    servers = [sim.SunSpecServer(group) for group in simulated]
    for server in servers:
        await server.start()
    kinds = {1: "solar", 2: "battery", 3: "meter"}
    config = ModbusConfig(
        devices=tuple(
            {
                "host": server.host,
                "port": server.port,
                "unit_id": unit_id,
                "site": f"site-{n}",
                "device": f"{kind}-1",
                "kind": kind,
                # As fast as the device answers: measures the poll path, not the schedule.
                "poll_interval_s": 0.001,
            }
            for n, server in enumerate(servers)
            for unit_id, kind in kinds.items()
        )
    )
    connector = ModbusConnector(settings, config)
    try:
        await connector.start()
        task = asyncio.create_task(connector.run())
        await asyncio.sleep(1.0)  # discovery of every device's model chain
        before = connector.stats.registers_read, connector.stats.polls_ok
        await asyncio.sleep(window_s)
        after = connector.stats.registers_read, connector.stats.polls_ok
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        await connector.stop()
        for server in servers:
            await server.stop()
    return {
        f"modbus_registers_per_s_{devices}_devices": (after[0] - before[0]) / window_s,
        f"modbus_polls_per_s_{devices}_devices": (after[1] - before[1]) / window_s,
    }


def bench_modbus() -> dict[str, float]:
    """Modbus TCP polls of simulated SunSpec devices, readings produced to the embedded broker."""
    with EmbeddedBroker() as broker:
        return asyncio.run(_modbus_poll_rate(broker, devices=3, window_s=3.0))


def bench_optimal() -> dict[str, float]:
    """One LP re-plan over 48 h at 15-minute steps, and the optimal strategy per batch."""
    battery = BatteryConfig(
        device="b", capacity_kwh=10, max_charge_kw=5, max_discharge_kw=5, strategy="optimal"
    )
    steps = 48 * 4
    rng = random.Random(1)  # noqa: S311 - reproducible test prices, not security
    prices = [0.12 + 0.08 * math.sin(i * math.pi / 48) + rng.gauss(0, 0.02) for i in range(steps)]
    optimizer = RollingOptimizer(battery_model(battery))
    replan_s = median_seconds(lambda: optimizer.plan(5.0, prices, [0.25] * steps), repeats=21)

    # The agent's path: 15-minute prices published a day ahead, one batch of readings a
    # quarter hour, a decision (an LP over the known prices) per batch.
    start = datetime(2025, 1, 1, tzinfo=UTC)
    site = SiteConfig(id="s", market="M", batteries=[battery])
    engine, state = SiteArbitrage(site), SiteState()
    for i in range(steps * 2):
        begins = start + timedelta(minutes=15 * i)
        engine.on_price(
            state,
            PriceTick(
                market="M",
                start=begins,
                end=begins + timedelta(minutes=15),
                price_per_kwh=prices[i % steps],
                published_at=start - timedelta(hours=12),
            ),
        )
    per_batch = []
    soc_pct = 50.0  # the battery follows the decisions, as a real one would
    for i in range(96):
        batch = [
            BatteryReading(
                device="b",
                ts=start + timedelta(minutes=15 * i, seconds=10 * r),
                power_kw=0.0,
                soc_pct=soc_pct,
            )
            for r in range(60)
        ]
        began = time.perf_counter()
        (decision,) = engine.on_readings(state, batch)
        state = SiteState.from_json(state.to_json())
        per_batch.append(time.perf_counter() - began)
        soc_pct = decision.expected_soc_pct
    return {
        "optimal_replan_48h_15min_median_ms": replan_s * 1000,
        "optimal_decision_time_per_batch_median_ms": statistics.median(per_batch) * 1000,
    }


def _sample_records(rounds: int) -> list[tuple[str, bytes]]:
    """The sample's telemetry records, ``rounds`` times, each round a week later."""
    frame, _ = read_telemetry(SAMPLE / "telemetry.parquet")
    week_ms = 7 * 24 * 3600 * 1000
    return [
        (batch.site, batch.value)
        for round_ in range(rounds)
        for batches in site_batches(
            frame, "bench", ReplaySettings(), round_=round_, shift_ms=round_ * week_ms
        )
        for batch, _ in batches
        if batch
    ]


def bench_sink_encode() -> dict[str, float]:
    """Telemetry records -> line protocol: the columnar path and the per-record one."""
    values = [value for _, value in _sample_records(1)]
    points = encode_telemetry(values).lines.len()
    columnar_s = median_seconds(lambda: encode_telemetry(values), repeats=5)

    def one_by_one() -> None:
        for value in values:
            batch, _ = codec.decode_telemetry(value)
            assert batch is not None
            telemetry_lines(batch)

    per_record_s = median_seconds(one_by_one, repeats=3)
    return {
        "sink_encode_columnar_points_per_s": points / columnar_s,
        "sink_encode_per_record_points_per_s": points / per_record_s,
    }


async def _sink_rate(broker: EmbeddedBroker, influx: Mapping[str, object], rounds: int) -> float:
    """Points/s of one sink from its first record to its last point written."""
    settings = with_embedded_broker(
        load_settings(
            SAMPLE / "wattstream.toml",
            topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.",
            influx={"batch_size_points": 20_000, **influx},
        ),
        broker,
    )
    await kafka.ensure_topics(settings)
    records = _sample_records(rounds)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for site, value in records:
            await producer.send(settings.topic(topics.TELEMETRY), value, key=site.encode())
        await producer.flush()
    finally:
        await producer.stop()
    sink = InfluxSink(settings, specs=(topics.TELEMETRY,))
    await sink.start()  # joins the group first: the figure is the writing, not the join
    task = asyncio.create_task(sink.run())
    expected = sum(len(orjson.loads(value)["readings"]) for _, value in records)
    first_record_s: float | None = None
    while sink.stats.points_written < expected:
        if first_record_s is None and sink.stats.records_consumed:
            first_record_s = time.perf_counter()
        await asyncio.sleep(0.005)
    elapsed_s = time.perf_counter() - (first_record_s or time.perf_counter())
    await sink.stop()
    await task
    return expected / elapsed_s


def bench_sink_influxdb() -> dict[str, float]:
    """Telemetry from the embedded broker into a real InfluxDB 1.6.7 (v1 API), one sink."""
    with EmbeddedBroker() as broker, InfluxDB1() as influxdb:
        influx = {"url": influxdb.url, "api": "v1", "database": "bench"}
        rates = [asyncio.run(_sink_rate(broker, influx, rounds=3)) for _ in range(3)]
    return {"sink_into_influxdb_v1_points_per_s": statistics.median(rates)}


def bench_sink_victoria_metrics() -> dict[str, float]:
    """The same into VictoriaMetrics through the v2 write API (influxdb-client).

    VictoriaMetrics ingests several times faster than InfluxDB 1.6 here, so this
    is closer to the sink's own ceiling on this machine.
    """
    with EmbeddedBroker() as broker, VictoriaMetrics() as victoria:
        influx = {"url": victoria.url, "api": "v2", "token": "unused"}
        rates = [asyncio.run(_sink_rate(broker, influx, rounds=3)) for _ in range(3)]
    return {"sink_into_victoria_metrics_v2_points_per_s": statistics.median(rates)}


def bench_detectors() -> dict[str, float]:
    """The accuracy harness (`wattstream evaluate-detectors`): F1 and delay per label,
    and the detectors' speed over its readings."""
    result = evaluate(HarnessConfig())
    out: dict[str, float] = {}
    for label, score in result.scores.items():
        out[f"detect {label} F1"] = score.f1
        delay_s = score.median_delay_s
        out[f"detect {label} median delay [min]"] = math.nan if delay_s is None else delay_s / 60
    out["detectors [readings/s]"] = result.readings / result.detect_s
    return out


def bench_carbon() -> dict[str, float]:
    """Scope 2 and certificates over the sample's depot week (meter, PV, battery at 1 min),
    in batches of 300 readings, with the table read and write the agent pays per batch."""
    from pydantic import TypeAdapter

    from ingest.carbon import parse_carbon
    from pipeline.schemas import Reading
    from processors.carbon import CarbonEngine, CarbonSettings, CarbonState, certify_with_ledger
    from processors.certificates import CertificateLedger, CertificateSettings

    adapter: TypeAdapter[Reading] = TypeAdapter(Reading)
    frame = read_telemetry(SAMPLE / "telemetry.parquet")[0]
    rows = frame.filter(frame["site"] == "moncalieri-depot").sort("_ts")
    readings = [
        adapter.validate_python(
            {"kind": r["kind"], "device": r["device"], "ts": r["_ts"], "power_kw": r["power_kw"]}
            | ({"soc_pct": r["soc_pct"]} if r["kind"] == "battery" else {})
        )
        for r in rows.iter_rows(named=True)
    ]
    intensities = parse_carbon((SAMPLE / "carbon.csv").read_bytes(), "csv").messages
    cfg = CarbonSettings(zone="IT-NO")
    certificates = CertificateSettings(unit_kwh=10.0)
    batch = 300

    def run() -> int:
        state_json = CarbonState().to_json()
        ledger_json = CertificateLedger("depot").to_json()
        records = 0
        for intensity in intensities:
            state = CarbonState.from_json(state_json)
            CarbonEngine("depot", cfg, state).add_intensity(intensity)
            state_json = state.to_json()
        for start in range(0, len(readings), batch):
            state = CarbonState.from_json(orjson.loads(orjson.dumps(state_json)))
            ledgers: list[CertificateLedger] = []

            def load(
                saved: dict[str, object] = ledger_json, into: list[CertificateLedger] = ledgers
            ) -> CertificateLedger:
                into.append(CertificateLedger.from_json(saved))
                return into[0]

            engine = CarbonEngine(
                "depot", cfg, state, certify_with_ledger(load, certificates, "depot", [])
            )
            records += len(engine.add_readings(readings[start : start + batch]))
            state_json = orjson.loads(orjson.dumps(state.to_json()))
            if ledgers:
                ledger_json = orjson.loads(orjson.dumps(ledgers[0].to_json()))
        return records

    elapsed = median_seconds(run, repeats=3)
    return {"carbon+certificates [readings/s]": len(readings) / elapsed}


BENCHES: dict[str, Callable[[], dict[str, float]]] = {
    "rule": bench_rule,
    "optimal": bench_optimal,
    "backtest": bench_backtest,
    "replay-encode": bench_replay_encode,
    "replay-broker": bench_replay_broker,
    "modbus": bench_modbus,
    "sink-encode": bench_sink_encode,
    "sink-influxdb": bench_sink_influxdb,
    "sink-victoria-metrics": bench_sink_victoria_metrics,
    "detectors": bench_detectors,
    "detect": bench_detect,
    "scram": bench_scram_latency,
    "carbon": bench_carbon,
    "steps": bench_steps,
    "e2e": bench_e2e,
    "scale-out": bench_scale_out,
    "peer": bench_peer,
    "memory": bench_memory,
    "ocpp": bench_ocpp,
}

# The figures the performance issue names, taken from the benchmarks that measure them.
CANONICAL_KEYS = {
    "alert_latency_p50_ms": "scram_latency_p50_ms",
    "alert_latency_p99_ms": "scram_latency_p99_ms",
    "influx_points_per_s": "sink_into_influxdb_v1_points_per_s",
}


def main() -> None:
    """Run every benchmark, or those named (``python -m benchmarks sink-influxdb``)."""
    chosen = sys.argv[1:] or list(BENCHES)
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    results: dict[str, float] = {}
    for bench in (BENCHES[name] for name in chosen):
        results.update(bench())
    for canonical, source in CANONICAL_KEYS.items():
        if source in results:
            results[canonical] = results[source]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    width = max(len(k) for k in results)
    print(f"wattstream benchmarks ({machine})")
    print("-" * (width + 18))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>14,.2f}")
    (REPO / "bench-results.json").write_text(
        json.dumps({"machine": machine, **results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
