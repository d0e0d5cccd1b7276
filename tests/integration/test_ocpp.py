"""The OCPP central system against real OCPP clients over real WebSockets (1.6 and 2.0.1)
and the embedded Kafka broker: many charge points at once, authentication, malformed
frames, a reconnect in the middle of a session, and charging limits followed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.headers import build_authorization_basic
from websockets.typing import Subprotocol

from ingest.ocpp import OcppConfig, OcppConnector, OcppConnectorError, hash_id_token
from ingest.simulators.ocpp import (
    ChargePointFleet,
    ChargePointRefused,
    OcppSimulatorConfig,
    SimulatedChargePoint,
)
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker, free_port, stop_process
from pipeline.schemas import (
    ChargingSessionEvent,
    DeadLetter,
    EvReading,
    SessionEventType,
    TelemetryBatch,
)
from pipeline.settings import Settings
from tests.conftest import SettingsFactory
from tests.workers import metrics_page, run_wattstream, start_wattstream

pytestmark = pytest.mark.integration

PASSWORD = "sixteen-chars-pw!"
DEEP = "[" * 100_000


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def settings(kafka_broker: EmbeddedBroker, make_settings: SettingsFactory) -> Settings:
    settings = make_settings(broker=kafka_broker.bootstrap, kafka={"one_record_per_batch": True})
    await kafka.ensure_topics(settings)
    return settings


def site_of(charge_point_id: str) -> str:
    return f"site-{int(charge_point_id[-3:]) % 5}"


def known(fleet: OcppSimulatorConfig, **overrides: Any) -> dict[str, dict[str, Any]]:
    """The CSMS's table of the fleet's charge points."""
    return {
        cp_id: {"site": site_of(cp_id), "device": f"ev-{cp_id}", "password": PASSWORD, **overrides}
        for cp_id in fleet.charge_point_ids()
    }


def fleet_config(**overrides: Any) -> OcppSimulatorConfig:
    defaults: dict[str, Any] = {
        "url": "ws://127.0.0.1:1/ocpp",  # replaced once the CSMS has its port
        "password": PASSWORD,
        "interval_s": 60.0,
        "speed": 1200.0,  # a simulated minute every 50 ms
        "gap_s": 60.0,
        "dwell_s": 1200.0,
        "vehicles": 1,
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
    }
    return OcppSimulatorConfig(**{**defaults, **overrides})


@contextlib.asynccontextmanager
async def running_csms(settings: Settings, **overrides: Any) -> AsyncIterator[OcppConnector]:
    defaults: dict[str, Any] = {"port": 0, "batch_max_wait_s": 0.05}
    csms = OcppConnector(settings, OcppConfig(**{**defaults, **overrides}))
    await csms.start()
    task = asyncio.create_task(csms.run())
    try:
        yield csms
    finally:
        await csms.stop()
        await csms.stop()  # safe twice
        await task


def pointed_at(fleet: OcppSimulatorConfig, csms: OcppConnector) -> OcppSimulatorConfig:
    return fleet.model_copy(update={"url": csms.url})


async def readings(settings: Settings) -> list[tuple[str, EvReading]]:
    out = []
    for key, value in await kafka.read_all(settings, topics.TELEMETRY):
        batch = codec.decode(TelemetryBatch, value)
        assert key == batch.site.encode()
        for reading in batch.readings:
            assert isinstance(reading, EvReading)
            out.append((batch.site, reading))
    return out


async def session_events(settings: Settings) -> list[ChargingSessionEvent]:
    """The session events, each once: a message the charge point sent again (a lost
    answer) gives an event with the same id, as a consumer deduplicates."""
    records = await kafka.read_all(settings, topics.EV_SESSIONS)
    events = [codec.decode(ChargingSessionEvent, value) for _, value in records]
    assert [key for key, _ in records] == [e.site.encode() for e in events]
    return list({e.event_id: e for e in events}.values())


async def readings_by_device(settings: Settings) -> dict[str, dict[Any, list[EvReading]]]:
    """device -> ts -> its distinct readings (a resent message repeats one)."""
    by_device: dict[str, dict[Any, list[EvReading]]] = {}
    for site, reading in await readings(settings):
        if reading.device.startswith("ev-"):  # a simulated charge point's
            assert site == site_of(reading.device[-3:])
        at = by_device.setdefault(reading.device, {}).setdefault(reading.ts, [])
        if reading not in at:
            at.append(reading)
    return by_device


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [
        codec.decode(DeadLetter, v) for _, v in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]


def check_sessions_and_readings(
    cp: SimulatedChargePoint,
    events: list[ChargingSessionEvent],
    by_device: dict[str, dict[Any, list[EvReading]]],
) -> None:
    """What ``cp`` sent is in Kafka, converted: W -> kW, Wh -> kWh, session energy."""
    device = f"ev-{cp.id}"
    mine = [e for e in events if e.charge_point_id == cp.id]
    (transaction,) = cp.transactions
    assert transaction.stop is not None and transaction.meter_stop_wh is not None
    types = [e.event_type for e in mine]
    assert types == [
        SessionEventType.PLUGGED_IN,
        SessionEventType.STARTED,
        SessionEventType.STOPPED,
        SessionEventType.UNPLUGGED,
    ], (cp.id, types)
    started, stopped = mine[1], mine[2]
    assert {e.site for e in mine} == {site_of(cp.id)} and {e.device for e in mine} == {device}
    assert {e.ocpp_version for e in mine} == {cp.version}
    assert started.transaction_id == stopped.transaction_id == transaction.transaction_id
    assert started.id_token_hash == stopped.id_token_hash == hash_id_token(transaction.id_tag)
    assert started.import_energy_kwh == transaction.meter_start_wh / 1000
    assert stopped.energy_kwh == pytest.approx(
        (transaction.meter_stop_wh - transaction.meter_start_wh) / 1000
    )
    assert stopped.energy_kwh is not None and stopped.energy_kwh > 0
    assert stopped.stop_reason == "EVDisconnected"
    assert stopped.ts == transaction.stop
    assert cp.reports
    for report in cp.reports:
        (reading,) = by_device[device][report.ts]
        assert reading.power_kw == pytest.approx(report.power_w / 1000)
        assert reading.soc_pct == report.soc_pct
        assert reading.plugged_in is True
        assert reading.energy_kwh == pytest.approx(
            (report.register_wh - transaction.meter_start_wh) / 1000
        )
    # The stop is a reading too: no power, the session's total; the unplugging (at the
    # same instant here) is one with the cable out.
    at_stop = [
        (r.power_kw, r.energy_kwh, r.plugged_in) for r in by_device[device][transaction.stop]
    ]
    assert at_stop == [(0.0, stopped.energy_kwh, True), (0.0, None, False)]


async def test_fifty_charge_points_of_both_versions_at_once_reach_kafka_converted(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=50)
    async with running_csms(settings, charge_points=known(fleet)) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        stats = await asyncio.wait_for(simulation.run(), 60)
        assert stats.failed == []
        assert csms.stats.connections == 50
    versions = [cp.version for cp in simulation.charge_points]
    assert versions.count("1.6") == versions.count("2.0.1") == 25
    assert stats.transactions_stopped == 50
    assert csms.stats.dead_lettered == 0 and csms.stats.call_errors_sent == 0

    events = await session_events(settings)
    by_device = await readings_by_device(settings)
    for cp in simulation.charge_points:
        check_sessions_and_readings(cp, events, by_device)
    assert await dead_letters(settings) == []


@contextlib.asynccontextmanager
async def raw_client(
    csms: OcppConnector,
    charge_point_id: str,
    *,
    subprotocol: str = "ocpp1.6",
    username: str | None = None,
    password: str | None = PASSWORD,
) -> AsyncIterator[ClientConnection]:
    """A bare WebSocket client, to send what no OCPP library would."""
    headers = {}
    if password is not None:
        headers["Authorization"] = build_authorization_basic(username or charge_point_id, password)
    async with connect(
        f"{csms.url}/{charge_point_id}",
        subprotocols=[Subprotocol(subprotocol)],
        additional_headers=headers,
    ) as connection:
        yield connection


async def exchange(connection: ClientConnection, frame: str) -> list[Any]:
    await connection.send(frame)
    answer: list[Any] = json.loads(await asyncio.wait_for(connection.recv(), 10))
    return answer


async def refused_status(csms: OcppConnector, charge_point_id: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with raw_client(csms, charge_point_id, **kwargs):
            pass
    return refused.value.response.status_code


async def test_wrong_passwords_and_unknown_ids_are_refused_in_the_handshake(
    settings: Settings,
) -> None:
    table = {"CP-001": {"site": "s", "device": "wb-1", "password": PASSWORD}}
    async with running_csms(settings, charge_points=table) as csms:
        assert await refused_status(csms, "CP-001", password="wrong-password-1234") == 401
        assert await refused_status(csms, "CP-001", password=None) == 401
        # The user name must be the charge point's own identity.
        assert await refused_status(csms, "CP-001", username="CP-002") == 401
        assert await refused_status(csms, "CP-999") == 404
        assert await refused_status(csms, "") == 404
        async with raw_client(csms, "CP-001", subprotocol="ocpp1.5") as unsupported:
            assert unsupported.subprotocol is None
            with pytest.raises(ConnectionClosed) as closed:
                await unsupported.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
        async with raw_client(csms, "CP-001") as client:
            assert client.subprotocol == "ocpp1.6"
            boot = '[2,"b1","BootNotification",{"chargePointVendor":"v","chargePointModel":"m"}]'
            answer = await exchange(client, boot)
            assert answer[:2] == [3, "b1"] and answer[2]["status"] == "Accepted"
            assert answer[2]["interval"] == 300
        # Refused: 3 bad logins, 2 unknown ids, 1 without an OCPP subprotocol.
        assert (csms.stats.connections_refused, csms.stats.connections) == (6, 1)


async def test_auto_register_accepts_an_unknown_id_with_the_shared_password(
    settings: Settings,
) -> None:
    fleet = fleet_config(
        charge_points=1, protocol="2.0.1", id_prefix="NEW-", password="shared-commissioning"
    )
    async with running_csms(
        settings,
        auto_register=True,
        auto_register_site="lobby",
        auto_register_password="shared-commissioning",
    ) as csms:
        assert await refused_status(csms, "NEW-001", password=PASSWORD) == 401
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        stats = await asyncio.wait_for(simulation.run(), 30)
    assert stats.failed == [] and stats.transactions_stopped == 1
    events = await session_events(settings)
    assert {(e.site, e.device, e.charge_point_id) for e in events} == {
        ("lobby", "NEW-001", "NEW-001")
    }
    assert {site for site, _ in await readings(settings)} == {"lobby"}


async def test_a_simulated_charge_point_with_a_wrong_password_gives_up(settings: Settings) -> None:
    fleet = fleet_config(charge_points=1, password="not-the-right-one")
    async with running_csms(settings, charge_points=known(fleet)) as csms:
        cp = ChargePointFleet(pointed_at(fleet, csms)).charge_points[0]
        with pytest.raises(ChargePointRefused) as refused:
            await asyncio.wait_for(cp.run(), 10)
    assert refused.value.status == 401


async def test_a_fleet_stops_promptly_even_while_it_cannot_connect() -> None:
    """Nothing listens at the URL: the charge points keep retrying, as chargers do, and a
    stop (SIGTERM in `wattstream simulate ocpp`) still ends the run."""
    fleet = ChargePointFleet(
        fleet_config(charge_points=3, url=f"ws://127.0.0.1:{free_port()}/ocpp")
    )
    stop = asyncio.Event()
    run = asyncio.create_task(fleet.run(stop=stop))
    await asyncio.sleep(0.5)
    assert not run.done()
    stop.set()
    stats = await asyncio.wait_for(run, 5)
    assert (stats.connects, stats.messages_sent, stats.failed) == (0, 0, [])


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_malformed_frames_get_call_errors_and_dead_letters_and_others_carry_on(
    settings: Settings, version: str
) -> None:
    fleet = fleet_config(charge_points=2, protocol=version)
    table = known(fleet)
    table["RAW-001"] = {"site": "raw", "device": "wb-raw", "password": PASSWORD}
    if version == "1.6":
        bad_payload = '[2,"p1","MeterValues",{"connectorId":"one","meterValue":[]}]'
        semantic = (
            '[2,"s1","MeterValues",{"connectorId":1,"meterValue":[{"timestamp":'
            '"2026-06-21T18:00:00Z","sampledValue":[{"value":"abc","measurand":'
            '"Power.Active.Import"},{"value":"10","measurand":"Current.Import","unit":"A"},'
            '{"value":"55","measurand":"SoC","unit":"Percent","location":"EV"}]}]}]'
        )
        codes = [
            "FormatViolation",
            "FormatViolation",
            "NotSupported",
            "TypeConstraintViolation",
            "PropertyConstraintViolation",
        ]
    else:
        bad_payload = '[2,"p1","MeterValues",{"evseId":"one","meterValue":[]}]'
        semantic = (
            '[2,"s1","MeterValues",{"evseId":1,"meterValue":[{"timestamp":'
            '"2026-06-21T18:00:00Z","sampledValue":[{"value":7.2,"measurand":'
            '"Power.Active.Import","unitOfMeasure":{"unit":"kW"}},{"value":55,'
            '"measurand":"SoC","unitOfMeasure":{"unit":"Wh"}}]}]}]'
        )
        codes = [
            "RpcFrameworkError",
            "RpcFrameworkError",
            "NotSupported",
            "TypeConstraintViolation",
            "MessageTypeNotSupported",
        ]
    subprotocol = f"ocpp{version}"
    async with running_csms(settings, charge_points=table) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        others = asyncio.create_task(simulation.run())
        async with raw_client(csms, "RAW-001", subprotocol=subprotocol) as raw:
            answers = [
                await exchange(raw, "this is not JSON {"),
                # Nested past Python's recursion limit: json.loads raises RecursionError.
                await exchange(raw, DEEP),
                await exchange(raw, '[2,"u1","FlyToTheMoon",{}]'),
                await exchange(raw, bad_payload),
                await exchange(raw, '[7,"u3","Heartbeat",{}]'),
            ]
            # A broken answer to a request we never made gets no answer of its own.
            await raw.send("[3]")
            # The connection still works, and a message with one unusable value keeps the rest.
            assert (await exchange(raw, semantic))[:2] == [3, "s1"]
            heartbeat = await exchange(raw, '[2,"h1","Heartbeat",{}]')
            assert heartbeat[:2] == [3, "h1"] and "currentTime" in heartbeat[2]
            with pytest.raises(OcppConnectorError, match="no open transaction"):
                await csms.set_charging_limit("RAW-001", 3.0)
        await eventually(lambda: not csms.connected("RAW-001"))
        with pytest.raises(OcppConnectorError, match="not connected"):
            await csms.set_charging_limit("RAW-001", 3.0)
        stats = await asyncio.wait_for(others, 30)
    assert [a[0] for a in answers] == [4, 4, 4, 4, 4]
    assert [a[1] for a in answers] == ["-1", "-1", "u1", "p1", "u3"]
    assert [a[2] for a in answers] == codes
    assert csms.stats.call_errors_sent == 5

    letters = await dead_letters(settings)
    assert {letter.source_topic for letter in letters} == {"ocpp:RAW-001"}
    assert {letter.component for letter in letters} == {"ingest.ocpp"}
    # "[3]" is a CALLRESULT cut short: the package calls it a ProtocolError.
    assert [letter.error_type for letter in letters] == [
        *codes,
        "ProtocolError",
        letters[-1].error_type,
    ]
    not_json, deep, _, bad, _, short, unusable = letters
    assert (not_json.raw, deep.raw, bad.raw, short.raw) == (
        "this is not JSON {",
        DEEP,
        bad_payload,
        "[3]",
    )
    assert unusable.raw == semantic
    if version == "1.6":
        assert "'abc' is not a finite number" in unusable.reason
    else:
        assert unusable.error_type == "UnknownUnit" and "'Wh'" in unusable.reason
    raw_readings = [r for site, r in await readings(settings) if site == "raw"]
    assert [(r.power_kw, r.soc_pct) for r in raw_readings] == (
        # 1.6: no power value, so 10 A x 230 V x 3 phases; 2.0.1: 7.2 kW, the SoC in Wh refused.
        [(6.9, 55.0)] if version == "1.6" else [(7.2, None)]
    )
    # The simulated charge points beside it noticed nothing.
    assert stats.transactions_stopped == 2
    events = await session_events(settings)
    by_device = await readings_by_device(settings)
    for cp in simulation.charge_points:
        check_sessions_and_readings(cp, events, by_device)


async def test_a_charge_point_that_drops_and_reconnects_resumes_its_session(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=2, dwell_s=1800.0, speed=600.0)
    async with running_csms(settings, charge_points=known(fleet)) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        run = asyncio.create_task(simulation.run())
        await eventually(lambda: all(len(cp.reports) >= 5 for cp in simulation.charge_points))
        before = {cp.id: len(cp.reports) for cp in simulation.charge_points}
        for cp in simulation.charge_points:
            await cp.drop(offline_s=0.3)
        await eventually(lambda: not any(csms.connected(cp.id) for cp in simulation.charge_points))
        stats = await asyncio.wait_for(run, 30)
    assert stats.connects == 4 and csms.stats.connections == 4
    assert stats.transactions_stopped == 2
    events = await session_events(settings)
    by_device = await readings_by_device(settings)
    for cp in simulation.charge_points:
        assert len(cp.reports) > before[cp.id] + 5  # the session went on after the drop
        # One session across both connections: its energy went on from the first
        # connection's start register (the CSMS kept it), up to the stop's total.
        check_sessions_and_readings(cp, events, by_device)
        energies = [by_device[f"ev-{cp.id}"][report.ts][0].energy_kwh for report in cp.reports]
        present = [e for e in energies if e is not None]
        assert present == energies and present == sorted(present)


async def test_set_charging_limit_is_accepted_and_followed_in_both_versions(
    settings: Settings,
) -> None:
    fleet = fleet_config(charge_points=2, dwell_s=1500.0, speed=600.0)
    table = known(fleet, max_power_kw=11.0)
    cp16_id = fleet.charge_point_ids()[0]
    table[cp16_id]["charging_rate_unit"] = "A"  # 1.6 in current, 2.0.1 in power
    async with running_csms(settings, charge_points=table) as csms:
        simulation = ChargePointFleet(pointed_at(fleet, csms))
        cp16, cp201 = simulation.charge_points
        assert (cp16.version, cp201.version) == ("1.6", "2.0.1")
        run = asyncio.create_task(simulation.run())
        await eventually(lambda: all(cp.reports for cp in simulation.charge_points))

        capped = await csms.set_charging_limit(cp201.id, 50.0)
        assert capped.accepted and (capped.limit_kw, capped.limit) == (11.0, 11000.0)
        answers = {cp.id: await csms.set_charging_limit(cp.id, 3.0) for cp in (cp16, cp201)}
        assert all(a.accepted for a in answers.values())
        # 3 kW in A: 3000 / (230 V x 3 phases) = 4.3 A per phase, drawn as 2967 W.
        assert (answers[cp16.id].charging_rate_unit, answers[cp16.id].limit) == ("A", 4.3)
        assert (answers[cp201.id].charging_rate_unit, answers[cp201.id].limit) == ("W", 3000.0)
        limited = {cp16.id: 2967.0, cp201.id: 3000.0}
        marks = {cp.id: len(cp.reports) for cp in (cp16, cp201)}
        await eventually(
            lambda: all(len(cp.reports) > marks[cp.id] + 2 for cp in (cp16, cp201)), 20
        )
        for cp in (cp16, cp201):
            # Reports after the limit, but one step late at most: a limit holds from the next step.
            assert {r.power_w for r in cp.reports[marks[cp.id] + 1 :]} == {limited[cp.id]}

        cleared = {cp.id: await csms.set_charging_limit(cp.id, None) for cp in (cp16, cp201)}
        assert {a.status for a in cleared.values()} == {"Accepted"}
        marks = {cp.id: len(cp.reports) for cp in (cp16, cp201)}
        await eventually(
            lambda: all(len(cp.reports) > marks[cp.id] + 2 for cp in (cp16, cp201)), 20
        )
        for cp in (cp16, cp201):
            assert cp.vehicle is not None
            default_w = min(cp.vehicle.max_power_kw, 11.0) * 1000
            assert {r.power_w for r in cp.reports[marks[cp.id] + 1 :]} == {default_w}
        again = await csms.set_charging_limit(cp16.id, None)
        assert again.status == "Unknown"  # nothing of ours left to clear
        await asyncio.wait_for(run, 30)
    # What the charge points reported under the limit reached Kafka as such.
    powers = {(r.device, r.power_kw) for _, r in await readings(settings)}
    assert (f"ev-{cp16.id}", 2.967) in powers and (f"ev-{cp201.id}", 3.0) in powers


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_security_profile_2_serves_wss_with_the_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    fleet = fleet_config(charge_points=2, tls_cafile=None, url="wss://127.0.0.1:1/ocpp")
    async with running_csms(
        settings, charge_points=known(fleet), tls_certfile=cert, tls_keyfile=key
    ) as csms:
        assert csms.url.startswith("wss://127.0.0.1:")
        simulation = ChargePointFleet(
            pointed_at(fleet, csms).model_copy(update={"tls_cafile": cert})
        )
        stats = await asyncio.wait_for(simulation.run(), 30)
        untrusting = ChargePointFleet(pointed_at(fleet, csms)).charge_points[0]
        with pytest.raises(ConnectionError, match="certificate"):
            await asyncio.wait_for(untrusting.run(), 10)
    assert stats.failed == [] and stats.transactions_stopped == 2
    assert len([e for e in await session_events(settings) if e.event_type == "stopped"]) == 2


async def test_the_ingest_and_simulate_ocpp_commands(
    kafka_broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    metrics_port = free_port()
    config = tmp_path / "ocpp.toml"
    config.write_text(
        f"[ocpp]\nport = {port}\nbatch_max_wait_s = 0.05\n"
        + "".join(
            f'[ocpp.charge_points.CLI-00{n}]\nsite = "cli"\ndevice = "wb-{n}"\n'
            'password_env = "CP_PASSWORD"\n'
            for n in (1, 2)
        )
    )
    env = env_for(
        WATTSTREAM_BROKER=kafka_broker.bootstrap,
        WATTSTREAM_TOPIC_PREFIX=settings.topic_prefix,
        WATTSTREAM_PARTITIONS=str(settings.partitions),
        WATTSTREAM_KAFKA_ONE_RECORD_PER_BATCH="true",
        WATTSTREAM_METRICS_PORT=str(metrics_port),
        CP_PASSWORD=PASSWORD,
    )
    csms = start_wattstream(env, tmp_path / "csms.log", "ingest", "ocpp", str(config))
    try:
        simulated = await asyncio.to_thread(
            run_wattstream,
            env,
            "simulate", "ocpp",
            "--url", f"ws://127.0.0.1:{port}/ocpp",
            "--charge-points", "2",
            "--id-prefix", "CLI-",
            "--password-env", "CP_PASSWORD",
            "--vehicles", "1",
            "--speed", "1200",
            "--gap-s", "60",
            "--dwell-s", "600",
            "--connect-timeout-s", "30",
            "--json",
        )  # fmt: skip
        assert simulated.returncode == 0, simulated.stderr[-2000:]
        summary = json.loads(simulated.stdout)
        assert summary["transactions_stopped"] == 2 and summary["failed"] == []
        assert PASSWORD not in simulated.stdout + simulated.stderr
        events = await session_events(settings)
        assert sorted((e.device, e.event_type) for e in events if e.event_type == "stopped") == [
            ("wb-1", SessionEventType.STOPPED),
            ("wb-2", SessionEventType.STOPPED),
        ]
        assert {e.ocpp_version for e in events} == {"1.6", "2.0.1"}
        # The CSMS's /metrics counts what reached the telemetry topic, reading for reading.
        batches = [
            codec.decode(TelemetryBatch, value)
            for _, value in await kafka.read_all(settings, topics.TELEMETRY)
        ]
        sent = sum(len(b.readings) for b in batches if b.site == "cli")
        page = await asyncio.to_thread(metrics_page, f"http://127.0.0.1:{metrics_port}/metrics")
        assert sent > 0
        assert page[("wattstream_connector_readings_total", ("ocpp",))] == sent
        assert page[("wattstream_connector_messages_received_total", ("ocpp",))] > sent
        csms.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(csms.wait, 30) == 0
    finally:
        stop_process(csms, timeout_s=10)
    log = (tmp_path / "csms.log").read_text()
    assert "Traceback" not in log and PASSWORD not in log


def env_for(**values: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATTSTREAM_")}
    return {**clean, **values}
