"""The demo's carbon summary: totals, the daily 24/7 score, certificates, windows, once per id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.report import summarize_carbon
from pipeline.schemas import (
    Alert,
    AlertStatus,
    CertificateAction,
    CertificateEvent,
    EmissionsRecord,
    Severity,
)

T0 = datetime(2025, 4, 7, tzinfo=UTC)
H = timedelta(hours=1)


def record(hour: int, grid: float, solar: float, clean_pct: float) -> EmissionsRecord:
    return EmissionsRecord(
        record_id=f"em-{hour}",
        site="s",
        start=T0 + hour * H,
        end=T0 + (hour + 1) * H,
        grid_energy_kwh=grid,
        solar_energy_kwh=solar,
        battery_energy_kwh=0.0,
        grid_co2_g_per_kwh=200.0,
        location_based_kg_co2=grid * 0.2,
        market_based_kg_co2=grid * 0.1,
        clean_share_pct=clean_pct,
    )


def test_totals_and_the_daily_score_weigh_hours_by_consumption_and_count_ids_once() -> None:
    # Day 1: 1 kWh at 100 % and 3 kWh at 20 %: (1 + 0.6) / 4 = 40 %. Day 2: 2 kWh at 50 %.
    records = [record(10, 0, 1, 100.0), record(11, 3, 0, 20.0), record(30, 2, 0, 50.0)]
    mint = CertificateEvent(
        event_id="m1",
        certificate_id="c1",
        action=CertificateAction.MINT,
        site="s",
        hour_start=T0,
        energy_mwh=0.001,
        at=T0 + H,
    )
    window = Alert(
        alert_id="a1",
        site="s",
        alert_type="follow_the_sun",
        severity=Severity.INFO,
        status=AlertStatus.FIRING,
        subject="window",
        message="m",
        start=T0,
    )
    (site,) = summarize_carbon(records + records[:1], [mint, mint], [window, window]).values()
    assert site.hours == 3 and site.consumption_kwh == pytest.approx(6.0)
    assert site.location_based_kg_co2 == pytest.approx(1.0)
    assert site.daily_clean_share_pct == pytest.approx({"2025-04-07": 40.0, "2025-04-08": 50.0})
    assert site.clean_share_pct == pytest.approx(100 * (1 + 0.6 + 1) / 6)
    assert site.minted_mwh == pytest.approx(0.001) and site.follow_sun_windows == 1
    assert site.as_dict()["daily_clean_share_pct"] == {"2025-04-07": 40.0, "2025-04-08": 50.0}
