"""OCPP central system: how many charge points one CSMS process serves, and how fast a
``set_power`` command reaches a charge point as a charging profile.

Capacity (``ocpp_charge_points_served``): the embedded broker; the CSMS
(:class:`ingest.ocpp.OcppConnector`, auto-registering, security profile 0) in its own
process, which writes its CPU time (``resource.getrusage`` of itself), wall time and
counters to a status file every second; simulated charge points (real ``ocpp``
clients, :class:`ingest.simulators.ocpp.ChargePointFleet`, half 1.6, half 2.0.1) in
another process, each charging one car and sending MeterValues every ``10 s`` of real
time. N steps up (``STEPS``, or ``BENCH_OCPP_STEPS="500,1000,2000,5000"``);
at each step, once all N are connected and ``WARM_S`` have passed, the CSMS's CPU use and
the readings it produced are measured over ``WINDOW_S``. A step is *served* when every
charge point connected within ``CONNECT_TIMEOUT_S`` and the readings produced reach 90 %
of the N / 10 s offered; stepping stops at the first step that is not.
``ocpp_csms_cpu_cores`` is the CSMS's CPU seconds per wall second at the largest served
N, ``ocpp_meter_values_per_s`` the readings per second produced there (one per
MeterValues). The simulator process and the broker share the machine's cores with it:
on 2 cores the simulator, not the CSMS, may be what stops the steps
(``ocpp_sim_cpu_cores``, from /proc, says).

Latency (``ocpp_command_to_profile_p50_ms`` / ``_p99_ms``): the CSMS with
``[ocpp.control] enabled`` and charge points in this process (one clock): ``COMMANDS``
``set_power`` commands, one at a time round robin over ``LATENCY_CHARGE_POINTS``, each
from the moment before it is handed to the producer to the moment the charge point's
SetChargingProfile handler runs. Includes the producer, the broker, the control
consumer's fetch (``fetch_max_wait_ms`` 10, as the embedded broker gets), planning, the
WebSocket and the ``ocpp`` package's framing on both sides; not the audit, which comes
after the charger's answer. Run twice: with the CSMS's default ``batch_max_wait_s``
(0.1 s) and with 0.05 s (keys ending ``_batch_wait_50ms``). The charge points report
every second here, and a profile sent while a charge point's MeterValues answer waits for
its Kafka flush arrives up to that wait late (about one command in 25 at 0.5 s, the
default before, p99 ~260 ms): the tail is the batch wait, not the control path.

Run: ``python -m benchmarks ocpp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.ocpp import OcppConfig, OcppConnector
from ingest.simulators.ocpp import OcppSimulatorConfig, SimulatedChargePoint, Version
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker, die_with_parent, free_port, stop_process
from pipeline.schemas import Command
from pipeline.settings import Settings, load_settings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
STEPS = (500, 1000, 2000)
"""Default steps: the default run stays within about three minutes on 2 cores."""
METER_INTERVAL_S = 10.0
WARM_S = 15.0
"""Past the connection storm (BootNotification, StatusNotification, StartTransaction of
all N at once), which is not the steady load measured: 5 s left it in the 2,000 step."""
WINDOW_S = 20.0
"""Two meter intervals: every charge point reports twice in the window."""
CONNECT_TIMEOUT_S = 90.0
LATENCY_CHARGE_POINTS = 10
COMMANDS = 200
WARMUP_COMMANDS = 5
"""The first commands wait for the control consumer's group join: not measured."""
FETCH_WAIT_MS = 10


def _overrides(broker: EmbeddedBroker) -> dict[str, Any]:
    return {
        "app_id": f"bench-ocpp-{uuid.uuid4().hex[:8]}",
        "broker": broker.bootstrap,
        "topic_prefix": f"bench-{uuid.uuid4().hex[:8]}.",
        "store": "memory",
        "kafka": {
            "one_record_per_batch": True,
            "fetch_max_wait_ms": FETCH_WAIT_MS,
            "session_timeout_s": 2.0,
            "heartbeat_interval_s": 0.5,
            "rebalance_timeout_s": 2.0,
        },
    }


# --- the CSMS process ---------------------------------------------------------------------


async def _serve_csms(settings: Settings, port: int, status_path: Path) -> None:
    config = OcppConfig(
        port=port,
        require_password=False,
        auto_register=True,
        auto_register_site="bench",
        # Heartbeats every 5 min, as in the field: the load is the meter values.
        heartbeat_interval_s=300,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with OcppConnector(settings, config) as csms:
        run = asyncio.create_task(csms.run())
        while not stop.is_set():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            status = {
                "wall_s": time.monotonic(),
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "connections": csms.stats.connections,
                "readings": csms.stats.readings_produced,
                "frames": csms.stats.frames_received,
            }
            temporary = status_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(status))
            temporary.replace(status_path)  # the reader never sees half a file
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        await csms.stop()
        await run


async def _serve_simulator(url: str, charge_points: int, prefix: str) -> None:
    from ingest.simulators.ocpp import ChargePointFleet

    config = OcppSimulatorConfig(
        url=url,
        charge_points=charge_points,
        id_prefix=prefix,
        interval_s=METER_INTERVAL_S,
        speed=1.0,  # real time: MeterValues every 10 s of the wall clock
        gap_s=0.0,
        dwell_s=86_400.0,  # one car the whole run
        vehicles=1,
        reconnect_min_s=1.0,
        reconnect_max_s=5.0,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await ChargePointFleet(config).run(stop=stop)


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ocpp", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _read_status(path: Path) -> dict[str, float]:
    try:
        data: dict[str, float] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux). [s]"""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _steps() -> list[int]:
    given = os.environ.get("BENCH_OCPP_STEPS")
    return [int(n) for n in given.split(",")] if given else list(STEPS)


def _capacity(overrides: dict[str, Any], tmp: Path) -> dict[str, float]:
    port = free_port()
    status_path = tmp / "csms-status.json"
    log_path = tmp / "ocpp-bench.log"
    csms = _spawn(["csms", json.dumps(overrides), str(port), str(status_path)], log_path)
    results: dict[str, float] = {"ocpp_charge_points_served": 0.0}
    try:
        deadline = time.monotonic() + 30
        while not _read_status(status_path):
            if csms.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"CSMS did not start; log: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        for n in _steps():
            before = _read_status(status_path)["connections"]
            sim = _spawn(["sim", f"ws://127.0.0.1:{port}/ocpp", str(n), f"B{n}-"], log_path)
            try:
                deadline = time.monotonic() + CONNECT_TIMEOUT_S
                while _read_status(status_path)["connections"] - before < n:
                    if sim.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                connected = _read_status(status_path)["connections"] - before
                if connected < n:
                    results[f"ocpp_step_{n}_connected"] = connected
                    break
                time.sleep(WARM_S)
                start, sim_start = _read_status(status_path), _process_cpu_s(sim.pid)
                time.sleep(WINDOW_S)
                end, sim_end = _read_status(status_path), _process_cpu_s(sim.pid)
                wall_s = end["wall_s"] - start["wall_s"]
                cores = (end["cpu_s"] - start["cpu_s"]) / wall_s
                rate = (end["readings"] - start["readings"]) / wall_s
                results[f"ocpp_step_{n}_csms_cpu_cores"] = cores
                results[f"ocpp_step_{n}_meter_values_per_s"] = rate
                if rate < 0.9 * n / METER_INTERVAL_S:
                    break
                results.update(
                    ocpp_charge_points_served=float(n),
                    ocpp_csms_cpu_cores=cores,
                    ocpp_meter_values_per_s=rate,
                    ocpp_sim_cpu_cores=(sim_end - sim_start) / wall_s,
                )
            finally:
                stop_process(sim, timeout_s=20)
    finally:
        stop_process(csms, timeout_s=20)
    return results


# --- latency (one process, one clock) -----------------------------------------------------


class _TimedChargePoint(SimulatedChargePoint):
    """Notes when each SetChargingProfile reaches the charge point's handler."""

    def __init__(self, charge_point_id: str, version: Version, config: OcppSimulatorConfig) -> None:
        super().__init__(charge_point_id, version, config)
        self.profiles_at_s: list[float] = []
        self.profile_arrived = asyncio.Event()

    def set_profile(self, connector_id: int, payload: Any) -> str:
        self.profiles_at_s.append(time.perf_counter())
        self.profile_arrived.set()
        return super().set_profile(connector_id, payload)


async def _latency(
    settings: Settings, batch_max_wait_s: float, suffix: str = ""
) -> dict[str, float]:
    sim_config = OcppSimulatorConfig(
        url="ws://127.0.0.1:1/ocpp",
        charge_points=LATENCY_CHARGE_POINTS,
        id_prefix="LAT-",
        interval_s=60.0,
        speed=60.0,  # a report a second: the transactions are open at once
        gap_s=0.0,
        dwell_s=86_400.0,
        vehicles=1,
    )
    ids = sim_config.charge_point_ids()
    config = OcppConfig(
        port=0,
        require_password=False,
        charge_points={cp_id: {"site": "bench", "device": f"ev-{cp_id}"} for cp_id in ids},
        control={"enabled": True, "min_interval_s": 0.0},
        batch_max_wait_s=batch_max_wait_s,
    )
    latencies_ms: list[float] = []
    async with OcppConnector(settings, config) as csms:
        run = asyncio.create_task(csms.run())
        sim_config = sim_config.model_copy(update={"url": csms.url})
        cps = [
            _TimedChargePoint(cp_id, sim_config.version_of(i), sim_config)
            for i, cp_id in enumerate(ids)
        ]
        stop = asyncio.Event()
        sims = [asyncio.create_task(cp.run(stop=stop)) for cp in cps]
        producer = kafka.producer(settings, linger_ms=0)
        await producer.start()
        try:
            deadline = time.monotonic() + 30
            while not all(cp.reports for cp in cps):
                if time.monotonic() > deadline:
                    raise RuntimeError("the latency bench's charge points did not start charging")
                await asyncio.sleep(0.1)
            commands_topic = settings.topic(topics.COMMANDS)
            for i in range(WARMUP_COMMANDS + COMMANDS):
                cp = cps[i % len(cps)]
                issued = datetime.now(UTC)
                command = Command(
                    command_id=f"cmd-bench-{i}-{uuid.uuid4().hex[:8]}",
                    site="bench",
                    device=f"ev-{cp.id}",
                    action="set_power",
                    setpoint_kw=3.0 + i % 2,
                    reason="bench",
                    issued_at=issued,
                    valid_until=issued + timedelta(minutes=5),
                    dry_run=False,
                )
                seen = len(cp.profiles_at_s)
                cp.profile_arrived.clear()
                sent_at_s = time.perf_counter()
                await producer.send(commands_topic, codec.encode(command), key=b"bench")
                while len(cp.profiles_at_s) == seen:
                    await asyncio.wait_for(cp.profile_arrived.wait(), 30)
                    cp.profile_arrived.clear()
                if i >= WARMUP_COMMANDS:
                    latencies_ms.append((cp.profiles_at_s[seen] - sent_at_s) * 1000)
                    if os.environ.get("BENCH_OCPP_TRACE") and latencies_ms[-1] > 100:
                        log.warning("command %d (%s): %.0f ms", i, cp.id, latencies_ms[-1])
                await asyncio.sleep(0.02)  # let the audit go out: one command at a time
        finally:
            await producer.stop()
            stop.set()
            await asyncio.gather(*sims, return_exceptions=True)
            await csms.stop()
            await run
    ordered = sorted(latencies_ms)
    return {
        f"ocpp_command_to_profile_p50_ms{suffix}": statistics.median(ordered),
        f"ocpp_command_to_profile_p99_ms{suffix}": ordered[
            max(1, math.ceil(0.99 * len(ordered))) - 1
        ],
        f"ocpp_command_to_profile_max_ms{suffix}": ordered[-1],
        f"ocpp_commands_over_100ms{suffix}": float(sum(1 for ms in ordered if ms > 100)),
    }


def bench_ocpp() -> dict[str, float]:
    """Charge points one CSMS serves, and command-to-profile latency (module docstring)."""
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        overrides = _overrides(broker)
        settings = load_settings(**overrides)
        asyncio.run(kafka.ensure_topics(settings))
        # The CSMS's default batch wait, then a short one: a profile for a charge point
        # whose MeterValues answer still waits for its Kafka flush is held up to that
        # wait (measured: p99 ~260 ms at 0.5 s, ~11 ms at 0.05 s).
        results = asyncio.run(_latency(settings, OcppConfig().batch_max_wait_s))
        results.update(asyncio.run(_latency(settings, 0.05, "_batch_wait_50ms")))
        results.update(_capacity(overrides, Path(tmp)))
        results["ocpp_machine_load_avg_1min"] = os.getloadavg()[0]
        return results


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "csms":
        asyncio.run(_serve_csms(load_settings(**json.loads(args[0])), int(args[1]), Path(args[2])))
    elif role == "sim":
        asyncio.run(_serve_simulator(args[0], int(args[1]), args[2]))
    else:
        raise SystemExit(f"unknown role {role!r}: csms or sim")
