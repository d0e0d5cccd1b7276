"""The OCPP central system without a network: its settings, how OCPP messages (as the
``ocpp`` package hands them to handlers) become readings and session events, the answers
to frames the package cannot unpack, and the simulated charge points' charging profiles.

(Named ``test_ocpp_messages.py``: ``tests/integration/test_ocpp.py`` has the basename
``test_ocpp.py``, and pytest needs each basename once.)"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ocpp.exceptions import (
    FormatViolationError,
    InternalError,
    OCPPError,
    PropertyConstraintViolationError,
    ProtocolError,
)
from ocpp.messages import unpack
from pydantic import ValidationError

from ingest.ocpp import (
    _FRAME_LOG,
    ChargePointConfig,
    ChargePointSession,
    OcppConfig,
    OcppConnector,
    OcppConnectorError,
    Outcome,
    charge_point_id_from_path,
    frame_error,
    hash_id_token,
    parse_meter_value,
    transaction_id_16,
)
from ingest.simulators.ocpp import (
    OcppSimulatorConfig,
    SimulatedChargePoint,
    TransactionRecord,
    make_vehicle,
    parse_profile,
)
from pipeline.schemas import ChargingSessionEvent, SessionEventType
from tests.conftest import SettingsFactory

T0 = datetime(2026, 6, 21, 18, 0, tzinfo=UTC)
PASSWORD = "sixteen-chars-pw!"
REPO = Path(__file__).resolve().parents[3]


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def cp_config(**overrides: Any) -> ChargePointConfig:
    return ChargePointConfig(**{"site": "home", "device": "wb-1", **overrides})


def session(**overrides: Any) -> ChargePointSession:
    return ChargePointSession("CP-001", cp_config(**overrides))


def sampled_16(measurand: str, value: str, unit: str | None = None, **extra: str) -> dict[str, Any]:
    item: dict[str, Any] = {"measurand": measurand, "value": value, **extra}
    if unit is not None:
        item["unit"] = unit
    return item


def meter_value(at: datetime, *sampled: dict[str, Any]) -> dict[str, Any]:
    return {"timestamp": iso(at), "sampled_value": list(sampled)}


# --- settings ---------------------------------------------------------------------------


def test_the_sample_config_and_its_example_charge_point_are_valid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sample = REPO / "ingest" / "ocpp.sample.toml"
    assert OcppConfig.from_toml(sample) == OcppConfig()
    # Uncommenting the example must give a valid config.
    text = re.sub(r"(?m)^## ([a-z_]+ = .*|\[.*\])$", r"\1", sample.read_text())
    example = tmp_path / "ocpp.toml"
    monkeypatch.setenv("CP001_PASSWORD", PASSWORD)
    monkeypatch.setenv("OCPP_COMMISSIONING_PASSWORD", "commissioning-pw-16")
    monkeypatch.setenv("OCPP_ID_TOKEN_KEY", "a-stable-hmac-key-here")
    # (The TLS example names files this machine does not have.)
    example.write_text(re.sub(r"(?m)^tls_.*\n", "", text))
    config = OcppConfig.from_toml(example)
    cp = config.charge_points["CP-001"]
    assert (cp.site, cp.device_for(1), cp.device_for(2), cp.device_for(3)) == (
        "turin-home",
        "wallbox-1",
        "wallbox-1b",
        "wallbox-1-3",
    )
    assert cp.password is not None and cp.password.get_secret_value() == PASSWORD
    assert config.auto_register_site == "unassigned"


def one_cp(**fields: Any) -> dict[str, Any]:
    """``charge_points`` with the one charge point CP-1."""
    return {"charge_points": {"CP-1": {"site": "s", "device": "d", **fields}}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (one_cp(), "CP-1: needs password"),
        (one_cp(password="short"), "password: at least 16 characters"),
        (one_cp(password=PASSWORD, password_env="X"), "password and password_env: set only one"),
        (
            one_cp(password_env="NO_SUCH_VARIABLE_X"),
            "password_env: the environment variable 'NO_SUCH_VARIABLE_X' is not set",
        ),
        (one_cp(password_file="/no/such/file"), "password_file: cannot read '/no/such/file'"),
        (one_cp(pasword=PASSWORD), "pasword"),
        (
            {"charge_points": {"CP/1": one_cp(password=PASSWORD)["charge_points"]["CP-1"]}},
            "'CP/1' is not a charge point id",
        ),
        (
            {
                "charge_points": {
                    "CP-1": {"site": "s", "device": "d", "password": PASSWORD},
                    "CP-2": {"site": "s", "device": "d", "password": PASSWORD},
                }
            },
            "s/d is configured twice",
        ),
        ({"auto_register": True}, "auto_register requires auto_register_site"),
        ({"auto_register": True, "auto_register_site": "lobby"}, "needs auto_register_password"),
        ({"tls_certfile": "/no/such/cert.pem"}, "tls_certfile: no such file '/no/such/cert.pem'"),
        ({"tls_keyfile": "/k.pem"}, "tls_keyfile needs tls_certfile"),
        ({"batch_max_wait_s": 0}, "batch_max_wait_s"),
    ],
)
def test_a_bad_setting_fails_at_construction_naming_it(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as error:
        OcppConfig(**values)
    assert message in str(error.value)
    assert PASSWORD not in str(error.value)


def test_passwords_come_from_a_variable_or_a_file_and_never_show(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CP_PW", PASSWORD)
    secret = tmp_path / "cp2.secret"
    secret.write_text("from-a-secret-file-xyz\n")
    config = OcppConfig(
        charge_points={
            "CP-1": {"site": "s", "device": "d1", "password_env": "CP_PW"},
            "CP-2": {"site": "s", "device": "d2", "password_file": str(secret)},
        }
    )
    assert config.password_for("CP-1").get_secret_value() == PASSWORD  # type: ignore[union-attr]
    assert config.password_for("CP-2").get_secret_value() == "from-a-secret-file-xyz"  # type: ignore[union-attr]
    assert PASSWORD not in repr(config) and "from-a-secret" not in repr(config)
    assert config.charge_point("CP-3") is None and config.password_for("CP-3") is None


def test_an_invalid_tls_certificate_fails_at_start_up(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="tls_certfile / tls_keyfile: cannot load"):
        OcppConfig(tls_certfile=cert)


def test_auto_registered_charge_points_get_the_site_and_their_id_as_device() -> None:
    config = OcppConfig(auto_register=True, auto_register_site="lobby", require_password=False)
    cp = config.charge_point("NEW-7")
    assert cp is not None and (cp.site, cp.device, cp.max_power_kw) == ("lobby", "NEW-7", 22.0)
    assert config.password_for("NEW-7") is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ocpp/CP-001", "CP-001"),
        ("/CP-001", "CP-001"),
        ("/a/b/c/CP.1_x?foo=bar", "CP.1_x"),
        ("/ocpp/CP%2D001", "CP-001"),
        ("/ocpp/", None),
        ("/", None),
        ("/ocpp/CP 1", None),
        ("/ocpp/" + "x" * 49, None),
        ("/ocpp/caf%C3%A9", None),
    ],
)
def test_the_charge_point_id_is_the_last_path_segment(path: str, expected: str | None) -> None:
    assert charge_point_id_from_path(path) == expected


# --- meter values ---------------------------------------------------------------------------


def test_units_are_converted_and_default_to_ocpps() -> None:
    sample, rejections = parse_meter_value(
        meter_value(
            T0,
            sampled_16("Power.Active.Import", "7400"),  # W by default
            sampled_16("Energy.Active.Import.Register", "12345.6"),  # Wh by default
            {"value": "48", "measurand": "SoC", "location": "EV"},  # Percent by default
        )
    )
    assert rejections == []
    assert sample is not None
    assert (sample.ts, sample.power_kw, sample.import_energy_kwh, sample.soc_pct) == (
        T0,
        7.4,
        pytest.approx(12.3456),
        48.0,
    )
    sample, _ = parse_meter_value(
        meter_value(
            T0,
            sampled_16("Power.Active.Import", "7.4", "kW"),
            {"value": "1.5", "unit": "kWh"},  # the default measurand: the import register
        )
    )
    assert sample is not None and (sample.power_kw, sample.import_energy_kwh) == (7.4, 1.5)


def test_2_0_1_units_of_measure_with_a_multiplier() -> None:
    sample, rejections = parse_meter_value(
        {
            "timestamp": iso(T0),
            "sampled_value": [
                {
                    "value": 7.4,
                    "measurand": "Power.Active.Import",
                    "unit_of_measure": {"unit": "kW"},
                },
                {"value": 12.5, "unit_of_measure": {"unit": "Wh", "multiplier": 3}},
                {"value": 61, "measurand": "SoC", "unit_of_measure": {"unit": "Percent"}},
            ],
        }
    )
    assert rejections == []
    assert sample is not None and (sample.power_kw, sample.import_energy_kwh, sample.soc_pct) == (
        7.4,
        12.5,
        61.0,
    )


def test_phases_add_up_and_a_total_wins_over_them() -> None:
    per_phase, _ = parse_meter_value(
        meter_value(
            T0,
            *(sampled_16("Power.Active.Import", "2400", "W", phase=p) for p in ("L1", "L2", "L3")),
            *(sampled_16("Current.Import", "10.5", "A", phase=p) for p in ("L1", "L2", "L3")),
            sampled_16("Current.Import", "0.2", "A", phase="N"),
            sampled_16("Voltage", "400", "V", phase="L1-L2"),
        )
    )
    assert per_phase is not None
    assert per_phase.power_kw == pytest.approx(7.2)
    assert (per_phase.current_a, per_phase.current_phases) == (31.5, 3)
    assert per_phase.voltage_v == pytest.approx(230.94, abs=0.01)  # 400 / sqrt(3)
    with_total, _ = parse_meter_value(
        meter_value(
            T0,
            sampled_16("Power.Active.Import", "2400", "W", phase="L1"),
            sampled_16("Power.Active.Import", "7000", "W"),
        )
    )
    assert with_total is not None and with_total.power_kw == 7.0


def test_export_power_is_negative_and_the_outlet_wins_over_the_inlet() -> None:
    sample, _ = parse_meter_value(
        meter_value(
            T0,
            sampled_16("Power.Active.Import", "7600", "W", location="Inlet"),
            sampled_16("Power.Active.Import", "7400", "W", location="Outlet"),
            sampled_16("Power.Active.Import", "9999", "W", location="Cable"),
            sampled_16("Power.Active.Export", "0.4", "kW"),
        )
    )
    assert sample is not None and sample.power_kw == pytest.approx(7.0)
    v2g, _ = parse_meter_value(meter_value(T0, sampled_16("Power.Active.Export", "3000", "W")))
    assert v2g is not None and v2g.power_kw == -3.0


POWER = "Power.Active.Import"


@pytest.mark.parametrize(
    ("sampled", "reason"),
    [
        (sampled_16(POWER, "7400", "Wh"), f"{POWER} in unit 'Wh'; expected one of ['W', 'kW']"),
        (sampled_16("SoC", "48", "kWh"), "SoC in unit 'kWh'; expected one of ['Percent']"),
        (sampled_16(POWER, "abc"), f"{POWER} value 'abc' is not a finite number"),
        (sampled_16(POWER, "NaN"), f"{POWER} value 'NaN' is not a finite number"),
        (sampled_16(POWER, "inf"), f"{POWER} value 'inf' is not a finite number"),
        (
            {"measurand": POWER, "value": True, "unit_of_measure": {}},
            f"{POWER} value 'True' is not a finite number",
        ),
    ],
)
def test_an_unusable_value_is_rejected_and_the_others_kept(
    sampled: dict[str, Any], reason: str
) -> None:
    sample, rejections = parse_meter_value(
        meter_value(T0, sampled, sampled_16("Energy.Active.Import.Register", "1000")),
        "meter_value[0].",
    )
    assert [r.reason for r in rejections] == [f"meter_value[0].sampled_value[0]: {reason}"]
    assert sample is not None and sample.import_energy_kwh == 1.0 and sample.power_kw is None


def test_a_timestamp_without_offset_rejects_the_instant() -> None:
    sample, rejections = parse_meter_value(
        {
            "timestamp": "2026-06-21T18:00:00",
            "sampled_value": [sampled_16("Power.Active.Import", "1")],
        }
    )
    assert sample is None
    assert len(rejections) == 1 and rejections[0].reason.startswith("timestamp: ")


def test_signed_and_unmapped_values_are_ignored() -> None:
    sample, rejections = parse_meter_value(
        meter_value(
            T0,
            sampled_16("Power.Active.Import", "c2lnbmVk", format="SignedData"),
            sampled_16("Temperature", "40", "Celsius"),
            sampled_16("Frequency", "50"),
        )
    )
    assert rejections == [] and sample is not None and sample.power_kw is None


# --- sessions: OCPP 1.6 -------------------------------------------------------------------


def test_a_1_6_session_plug_in_start_meter_values_stop_unplug() -> None:
    cp = session()
    out = cp.status_16(1, "Available", iso(T0), T0)
    assert out.events == []  # "not plugged" at first contact is no news
    assert [(r.power_kw, r.plugged_in) for _, r in out.readings] == [(0.0, False)]

    out = cp.status_16(1, "Preparing", iso(T0 + timedelta(minutes=1)), T0)
    assert [e.event_type for e in out.events] == [SessionEventType.PLUGGED_IN]
    transaction_id, out = cp.start_16(1, "04A2B3C4", 10_000, iso(T0 + timedelta(minutes=2)), T0)
    (started,) = out.events
    assert started.event_type == SessionEventType.STARTED
    assert started.transaction_id == str(transaction_id)
    assert (started.energy_kwh, started.import_energy_kwh) == (0.0, 10.0)
    assert (
        started.id_token_hash == hash_id_token("04A2B3C4")
        and "04A2B3C4" not in started.model_dump_json()
    )
    assert [(r.power_kw, r.energy_kwh, r.plugged_in) for _, r in out.readings] == [(0.0, 0.0, True)]

    out = cp.status_16(1, "Charging", iso(T0 + timedelta(minutes=2)), T0)
    assert out.readings == [] and out.events == []  # power unknown: meter values say it
    out = cp.meter_values(
        1,
        [
            meter_value(
                T0 + timedelta(minutes=3),
                sampled_16("Power.Active.Import", "7400", "W"),
                sampled_16("Energy.Active.Import.Register", "12345.6", "Wh"),
                sampled_16("SoC", "48", "Percent", location="EV"),
            )
        ],
        transaction_id=str(transaction_id),
    )
    ((site, reading),) = out.readings
    assert site == "home"
    assert reading.model_dump(mode="json") == {
        "device": "wb-1",
        "ts": "2026-06-21T18:03:00Z",
        "kind": "ev",
        "power_kw": 7.4,
        "soc_pct": 48.0,
        "plugged_in": True,
        "energy_kwh": 2.3456,
    }
    out = cp.stop_16(
        transaction_id, 14_000, iso(T0 + timedelta(minutes=30)), T0, reason="EVDisconnected"
    )
    (stopped,) = out.events
    assert (
        stopped.event_type,
        stopped.energy_kwh,
        stopped.import_energy_kwh,
        stopped.stop_reason,
    ) == (
        SessionEventType.STOPPED,
        4.0,
        14.0,
        "EVDisconnected",
    )
    assert stopped.id_token_hash == started.id_token_hash
    assert [(r.power_kw, r.energy_kwh) for _, r in out.readings] == [(0.0, 4.0)]
    out = cp.status_16(1, "Available", iso(T0 + timedelta(minutes=31)), T0)
    assert [e.event_type for e in out.events] == [SessionEventType.UNPLUGGED]
    assert [(r.plugged_in, r.energy_kwh) for _, r in out.readings] == [(False, None)]


def test_a_repeated_start_gets_the_same_transaction_and_event_ids() -> None:
    cp = session()
    first_id, first = cp.start_16(1, "TAG", 500, iso(T0), T0)
    again_id, again = cp.start_16(1, "TAG", 500, iso(T0), T0)
    assert first_id == again_id == transaction_id_16("CP-001", 1, iso(T0), 500)
    assert 1 <= first_id < 2**31
    assert [e.event_id for e in first.events if e.event_type == "started"] == [
        e.event_id for e in again.events
    ]
    other_id, _ = cp.start_16(1, "TAG", 500, iso(T0 + timedelta(seconds=1)), T0)
    assert other_id != first_id


def test_power_from_current_then_from_the_register_when_no_power_is_sampled() -> None:
    cp = session(voltage_v=230.0, phases=3)
    transaction_id, _ = cp.start_16(1, "TAG", 10_000, iso(T0), T0)
    tx = str(transaction_id)
    out = cp.meter_values(
        1,
        [meter_value(T0 + timedelta(minutes=1), sampled_16("Current.Import", "16", "A"))],
        transaction_id=tx,
    )
    assert [r.power_kw for _, r in out.readings] == [pytest.approx(11.04)]  # 16 A x 230 V x 3
    register = [
        meter_value(T0 + timedelta(minutes=m), sampled_16("Energy.Active.Import.Register", str(wh)))
        for m, wh in ((2, 10_100), (17, 12_850))
    ]
    out = cp.meter_values(1, register, transaction_id=tx)
    # The first register sample has no earlier one in the transaction: no power, no reading.
    assert out.samples_without_power == 1
    # 2.75 kWh in 15 minutes is 11 kW on average.
    assert [(r.power_kw, r.energy_kwh) for _, r in out.readings] == [(pytest.approx(11.0), 2.85)]


def test_a_transaction_first_seen_in_the_middle_has_no_energy() -> None:
    """After a CSMS restart its start register is unknown: energy_kwh stays None rather
    than counting from the first register seen."""
    cp = session()
    out = cp.meter_values(
        1,
        [
            meter_value(
                T0,
                sampled_16("Power.Active.Import", "7000"),
                sampled_16("Energy.Active.Import.Register", "50000"),
            )
        ],
        transaction_id="777",
    )
    assert [(r.power_kw, r.energy_kwh, r.plugged_in) for _, r in out.readings] == [
        (7.0, None, False)
    ]
    out = cp.stop_16(777, 60_000, iso(T0 + timedelta(hours=1)), T0)
    (stopped,) = out.events
    assert (stopped.energy_kwh, stopped.import_energy_kwh, stopped.stop_reason) == (
        None,
        60.0,
        "Local",
    )


def test_connector_0_and_other_connectors() -> None:
    cp = session(connector_devices={2: "wb-1b"})
    assert not cp.status_16(0, "Faulted", None, T0)
    assert not cp.meter_values(0, [meter_value(T0, sampled_16("Power.Active.Import", "1"))])
    out = cp.meter_values(2, [meter_value(T0, sampled_16("Power.Active.Import", "1000"))])
    out3 = cp.meter_values(3, [meter_value(T0, sampled_16("Power.Active.Import", "1000"))])
    assert [r.device for _, r in out.readings + out3.readings] == ["wb-1b", "wb-1-3"]


def test_a_status_without_a_valid_timestamp_uses_the_receive_time() -> None:
    cp = session()
    received = T0 + timedelta(seconds=5)
    out = cp.status_16(1, "Preparing", None, received)
    assert [e.ts for e in out.events] == [received] and out.rejections == []
    out = cp.status_16(1, "Available", "yesterday", received)
    assert [r.ts for _, r in out.readings] == [received]
    assert len(out.rejections) == 1 and "StatusNotification timestamp" in out.rejections[0].reason


def test_faulted_keeps_the_cable_state_and_reports_no_power() -> None:
    cp = session()
    cp.status_16(1, "Preparing", iso(T0), T0)
    out = cp.status_16(1, "Faulted", iso(T0 + timedelta(minutes=1)), T0)
    assert out.events == [] and [(r.power_kw, r.plugged_in) for _, r in out.readings] == [
        (0.0, True)
    ]


def test_id_token_pseudonyms_are_keyed_hash_prefixes() -> None:
    assert hash_id_token("04A2B3C4") == hashlib.sha256(b"04A2B3C4").hexdigest()[:16]
    keyed = hmac.new(b"key-one", b"04A2B3C4", hashlib.sha256).hexdigest()[:16]
    assert hash_id_token("04A2B3C4", b"key-one") == keyed
    assert hash_id_token("04A2B3C4", b"key-one") != hash_id_token("04A2B3C4", b"key-two")
    assert hash_id_token("04A2B3C4", b"key-one") != hash_id_token("04A2B3C4")
    assert re.fullmatch(r"[0-9a-f]{16}", hash_id_token("x", b"k"))


# --- sessions: OCPP 2.0.1 -------------------------------------------------------------------


def sampled_201(
    measurand: str, value: float, unit: str, context: str | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "measurand": measurand,
        "value": value,
        "unit_of_measure": {"unit": unit},
    }
    if context:
        item["context"] = context
    return item


def test_a_2_0_1_session_from_transaction_events() -> None:
    cp = session()
    cp.version = "2.0.1"
    out = cp.status_201(1, "Occupied", iso(T0), T0)
    assert [e.event_type for e in out.events] == [SessionEventType.PLUGGED_IN]
    out = cp.transaction_event_201(
        "Started",
        iso(T0),
        "CablePluggedIn",
        {"transaction_id": "tx-1", "charging_state": "EVConnected"},
        T0,
        evse={"id": 1, "connector_id": 1},
        id_token={"id_token": "04A2B3C4", "type": "ISO14443"},
        meter_value=[
            {
                "timestamp": iso(T0),
                "sampled_value": [
                    sampled_201("Energy.Active.Import.Register", 20_000, "Wh", "Transaction.Begin")
                ],
            }
        ],
    )
    (started,) = out.events
    assert (started.transaction_id, started.energy_kwh, started.import_energy_kwh) == (
        "tx-1",
        0.0,
        20.0,
    )
    assert (started.ocpp_version, started.id_token_hash) == ("2.0.1", hash_id_token("04A2B3C4"))
    assert [(r.power_kw, r.energy_kwh) for _, r in out.readings] == [(0.0, 0.0)]
    out = cp.transaction_event_201(
        "Updated",
        iso(T0 + timedelta(minutes=10)),
        "MeterValuePeriodic",
        {"transaction_id": "tx-1", "charging_state": "Charging"},
        T0,
        meter_value=[
            {
                "timestamp": iso(T0 + timedelta(minutes=10)),
                "sampled_value": [
                    sampled_201("Power.Active.Import", 11_000, "W"),
                    sampled_201("Energy.Active.Import.Register", 21.8, "kWh"),
                    sampled_201("SoC", 52, "Percent"),
                ],
            }
        ],
    )  # no evse: the transaction's is known
    assert out.events == []
    assert [(r.device, r.power_kw, r.energy_kwh, r.soc_pct) for _, r in out.readings] == [
        ("wb-1", 11.0, pytest.approx(1.8), 52.0)
    ]
    out = cp.transaction_event_201(
        "Ended",
        iso(T0 + timedelta(minutes=20)),
        "EVDeparted",
        {"transaction_id": "tx-1", "charging_state": "Idle", "stopped_reason": "EVDisconnected"},
        T0,
        meter_value=[
            {
                "timestamp": iso(T0 + timedelta(minutes=20)),
                "sampled_value": [
                    sampled_201("Energy.Active.Import.Register", 23_500, "Wh", "Transaction.End")
                ],
            }
        ],
    )
    # The stop, then the cable out: a cable comes out after the session ends.
    assert [e.event_type for e in out.events] == [
        SessionEventType.STOPPED,
        SessionEventType.UNPLUGGED,
    ]
    stopped = out.events[0]
    assert (stopped.energy_kwh, stopped.stop_reason, stopped.id_token_hash) == (
        3.5,
        "EVDisconnected",
        started.id_token_hash,
    )
    # The End sample has no power: the stop reading says 0, not the average since the last sample.
    assert [(r.power_kw, r.energy_kwh, r.plugged_in) for _, r in out.readings] == [(0.0, 3.5, True)]
    assert cp.open_transaction(1) is None


def test_a_2_0_1_transaction_without_a_begin_value_starts_at_its_first_register() -> None:
    cp = session()
    cp.version = "2.0.1"
    cp.transaction_event_201(
        "Started", iso(T0), "Authorized", {"transaction_id": "t"}, T0, evse={"id": 1}
    )
    out = cp.meter_values(
        1,
        [
            {"timestamp": iso(T0 + timedelta(minutes=m)), "sampled_value": [
                sampled_201("Power.Active.Import", 7.0, "kW"),
                sampled_201("Energy.Active.Import.Register", wh, "Wh"),
            ]}
            for m, wh in ((1, 5_000), (2, 5_117))
        ],
    )  # fmt: skip
    assert [r.energy_kwh for _, r in out.readings] == [0.0, pytest.approx(0.117)]


def test_an_unknown_2_0_1_transaction_without_evse_is_rejected() -> None:
    cp = session(connector_devices={2: "wb-2"})
    cp.connector(1)
    cp.connector(2)
    out = cp.transaction_event_201(
        "Updated", iso(T0), "MeterValuePeriodic", {"transaction_id": "zzz"}, T0
    )
    assert [r.error_type for r in out.rejections] == ["UnknownTransaction"] and not out.readings


def test_the_session_event_schema() -> None:
    event = ChargingSessionEvent(
        event_id="evs-1",
        site="s",
        device="d",
        charge_point_id="CP-1",
        connector_id=1,
        event_type="stopped",
        ocpp_version="1.6",
        id_token_hash="0123456789abcdef",
        energy_kwh=4.0,
        ts="2026-06-21T18:00:00Z",
    )
    assert ChargingSessionEvent.model_validate_json(event.model_dump_json()) == event
    for bad in ({"id_token_hash": "04A2B3C4"}, {"energy_kwh": -1.0}, {"ts": "2026-06-21T18:00:00"}):
        with pytest.raises(ValidationError):
            ChargingSessionEvent.model_validate({**event.model_dump(), **bad})


# --- frames the ocpp package cannot unpack ---------------------------------------------------


UNKNOWN_TYPE, BAD_PROPERTY = "MessageTypeNotSupported", "PropertyConstraintViolation"
BadProperty = PropertyConstraintViolationError


def unpack_error(frame: str) -> OCPPError:
    with pytest.raises(OCPPError) as error:
        unpack(frame)
    return error.value


@pytest.mark.parametrize(
    ("frame", "answer_201", "answer_16", "package_error"),
    [
        ("not json", ("-1", "RpcFrameworkError"), ("-1", "FormatViolation"), FormatViolationError),
        ('{"a": 1}', ("-1", "RpcFrameworkError"), ("-1", "ProtocolError"), ProtocolError),
        ("[]", ("-1", "RpcFrameworkError"), ("-1", "ProtocolError"), ProtocolError),
        ('[2, "id-1"]', ("id-1", "RpcFrameworkError"), ("id-1", "ProtocolError"), ProtocolError),
        ('[9, "id-2", "X", {}]', ("id-2", UNKNOWN_TYPE), ("id-2", BAD_PROPERTY), BadProperty),
        ('[9, 5, "X", {}]', ("-1", UNKNOWN_TYPE), ("-1", BAD_PROPERTY), BadProperty),
        ("[3]", (None, "ProtocolError"), (None, "ProtocolError"), ProtocolError),
        ('[4, "id-3"]', (None, "ProtocolError"), (None, "ProtocolError"), ProtocolError),
    ],
)  # fmt: skip
def test_frames_the_package_refuses_get_the_protocols_call_error(
    frame: str,
    answer_201: tuple[str | None, str],
    answer_16: tuple[str | None, str],
    package_error: type[OCPPError],
) -> None:
    error = unpack_error(frame)
    assert isinstance(error, package_error)
    for version, (message_id, code) in (("2.0.1", answer_201), ("1.6", answer_16)):
        answer = frame_error(frame, version, error)  # type: ignore[arg-type]
        assert (answer.message_id, answer.code) == (message_id, code)
        if message_id is not None:
            sent = json.loads(answer.call_error())
            # Details stay empty: the package's would echo the raw frame back.
            assert sent[:3] == [4, message_id, code] and sent[4] == {}


def test_a_frame_nested_too_deep_for_json_loads() -> None:
    answer = frame_error("[" * 100_000, "2.0.1", FormatViolationError())
    assert (answer.message_id, answer.code) == ("-1", "RpcFrameworkError")


def test_a_binary_frame_that_is_not_utf8() -> None:
    raw = b"\xff\xfe[2"
    answer = frame_error(raw, "2.0.1", unpack_error(raw))  # type: ignore[arg-type]
    assert (answer.message_id, answer.code) == ("-1", "RpcFrameworkError")


# --- answers wait for Kafka -------------------------------------------------------------


async def test_a_message_kafka_has_not_acked_in_time_is_answered_internal_error(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The connector is not started, so nothing is ever produced: as when Kafka is down."""
    csms = OcppConnector(
        make_settings(broker="127.0.0.1:9"), OcppConfig(ack_timeout_s=0.05, max_buffered_readings=1)
    )
    link = SimpleNamespace(id="CP-001")
    cp = session()
    outcome = cp.meter_values(1, [meter_value(T0, sampled_16("Power.Active.Import", "1000"))])
    with pytest.raises(InternalError, match="not stored in time"):
        await csms.deliver(link, "MeterValues", outcome, b"[2, ...]")  # type: ignore[arg-type]
    # It stays buffered, to be produced when Kafka is back (the retry may duplicate it).
    assert (csms.stats.ack_timeouts, csms._buffered_readings) == (1, 1)
    with pytest.raises(InternalError, match="buffer full"):
        await csms.deliver(link, "MeterValues", outcome, b"[2, ...]")  # type: ignore[arg-type]
    assert csms.stats.refused_buffer_full == 1
    # A message that becomes nothing (a heartbeat's worth) does not wait at all.
    await csms.deliver(link, "MeterValues", Outcome(), b"[2, ...]")  # type: ignore[arg-type]

    # The package reports a handler's error with a traceback and the request: for ours,
    # one warning line without the request (it holds id tokens).
    caplog.set_level(logging.DEBUG, logger="ingest.ocpp.frames")
    try:
        raise InternalError(description="telemetry not stored in time; retry later")
    except InternalError:
        _FRAME_LOG.exception("Error while handling request '%s'", "<Call idTag=04A2B3C4>")
    (record,) = [r for r in caplog.records if r.name == "ingest.ocpp.frames"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "04A2B3C4" not in record.getMessage() and "not stored in time" in record.getMessage()


# --- the simulator's charging profiles ------------------------------------------------------


def simulated(**overrides: Any) -> SimulatedChargePoint:
    config = OcppSimulatorConfig(**{"voltage_v": 230.0, **overrides})
    cp = SimulatedChargePoint("SIM-1", "1.6", config)
    return cp


def tx_profile(limit: float, unit: str = "W", **extra: Any) -> dict[str, Any]:
    return {
        "charging_profile_id": 7001,
        "stack_level": 1,
        "charging_profile_purpose": "TxProfile",
        "charging_profile_kind": "Relative",
        "charging_schedule": {
            "charging_rate_unit": unit,
            "charging_schedule_period": [{"start_period": 0, "limit": limit, **extra}],
        },
    }


def test_a_tx_profile_needs_a_transaction_and_limits_the_power() -> None:
    cp = simulated()
    assert cp.set_profile(1, tx_profile(3000)) == "Rejected"  # no transaction
    cp.vehicle = make_vehicle("SIM-1", 0, T0, cp.config)
    cp._transaction = TransactionRecord("42", "TAG", T0, meter_start_wh=0)
    assert cp.set_profile(1, {**tx_profile(3000), "transaction_id": 41}) == "Rejected"
    assert cp.set_profile(1, {**tx_profile(3000), "transaction_id": 42}) == "Accepted"
    assert cp.limit_w(T0) == 3000
    # In A: per phase, over the period's phases (3 by default).
    assert (
        cp.set_profile(1, tx_profile(6.0, "A", number_phases=1)) == "Accepted"
    )  # same id: replaced
    assert cp.limit_w(T0) == pytest.approx(1380.0)
    assert cp.set_profile(1, tx_profile(16.0, "A")) == "Accepted"
    assert cp.limit_w(T0) == pytest.approx(11040.0)
    assert cp.clear_profiles(profile_id=9) == "Unknown"
    assert cp.clear_profiles(profile_id=7001) == "Accepted"
    assert cp.limit_w(T0) == float("inf")


def test_profile_precedence_and_schedules() -> None:
    cp = simulated()
    default = {
        **tx_profile(5000),
        "charging_profile_id": 1,
        "charging_profile_purpose": "TxDefaultProfile",
    }
    default["charging_schedule"] = {
        "charging_rate_unit": "W",
        "start_schedule": iso(T0),
        "charging_schedule_period": [
            {"start_period": 0, "limit": 5000},
            {"start_period": 3600, "limit": 2000},
        ],
    }
    default["charging_profile_kind"] = "Absolute"
    assert cp.set_profile(1, default) == "Accepted"
    assert cp.limit_w(T0 - timedelta(seconds=1)) == float("inf")  # before the schedule
    assert (cp.limit_w(T0 + timedelta(minutes=59)), cp.limit_w(T0 + timedelta(minutes=61))) == (
        5000,
        2000,
    )
    cap = {
        **tx_profile(4000),
        "charging_profile_id": 2,
        "charging_profile_purpose": "ChargePointMaxProfile",
    }
    assert cp.set_profile(1, cap) == "Rejected"  # only on connector 0
    assert cp.set_profile(0, cap) == "Accepted"
    assert cp.limit_w(T0) == 4000
    assert cp.clear_profiles(purpose="ChargePointMaxProfile") == "Accepted"
    assert cp.limit_w(T0) == 5000


def test_2_0_1_profiles_parse_too() -> None:
    profile = parse_profile(
        1,
        {
            "id": 7001,
            "stack_level": 1,
            "charging_profile_purpose": "TxProfile",
            "charging_profile_kind": "Relative",
            "transaction_id": "tx-9",
            "charging_schedule": [
                {
                    "id": 7001,
                    "charging_rate_unit": "W",
                    "charging_schedule_period": [{"start_period": 0, "limit": 3000.0}],
                }
            ],
        },
    )
    assert (profile.profile_id, profile.transaction_id, profile.limit_w(T0, T0, 230.0)) == (
        7001,
        "tx-9",
        3000.0,
    )
    with pytest.raises(ValueError, match="charging rate unit"):
        parse_profile(1, tx_profile(1, "kW"))


def test_vehicles_are_seeded_and_plausible() -> None:
    config = OcppSimulatorConfig()
    assert make_vehicle("A", 0, T0, config) == make_vehicle("A", 0, T0, config)
    assert make_vehicle("A", 0, T0, config) != make_vehicle("B", 0, T0, config)
    vehicle = make_vehicle("A", 3, T0, config)
    assert 15 <= vehicle.arrival_soc_pct <= 60 <= 80 <= vehicle.target_soc_pct <= 100
    assert T0 < vehicle.arrival < vehicle.departure
    assert re.fullmatch(r"[0-9A-F]{8}", vehicle.id_tag)


def test_a_mixed_fleet_is_half_1_6() -> None:
    config = OcppSimulatorConfig(charge_points=5)
    assert [config.version_of(i) for i in range(5)] == ["1.6", "1.6", "2.0.1", "2.0.1", "2.0.1"]
    assert config.charge_point_ids()[:2] == ["SIM-CP-001", "SIM-CP-002"]
    with pytest.raises(ValidationError, match="must not hold credentials"):
        OcppSimulatorConfig(url="ws://u:p@host/ocpp")


async def test_a_limit_for_a_charge_point_that_is_not_connected_says_nothing_was_sent(
    make_settings: SettingsFactory,
) -> None:
    csms = OcppConnector(make_settings(broker="127.0.0.1:9"), OcppConfig(require_password=False))
    with pytest.raises(OcppConnectorError, match="is not connected") as raised:
        await csms.set_charging_limit("CP-9", 3.0)
    # The control path audits it with dry_run true: the charger got nothing.
    assert raised.value.sent is False
