"""Guarantee-of-origin ledger: edges of mint/claim/expire and properties of apply."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.schemas import CertificateAction, CertificateEvent
from pipeline.settings import SettingsError, SiteConfig
from processors.certificates import (
    CertificateLedger,
    CertificateSettings,
    CertificateStatus,
    add_months,
    apply,
    balance,
    certificate_settings,
    claim,
    claimed_kwh,
    expire,
    expires_at,
    ledgers_from_events,
    mint,
    period_starts,
    settle_hour,
    summaries,
    summary,
    totals,
)

T0 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
SITE = "site1"
CFG = CertificateSettings()


def hour(n: int) -> datetime:
    return T0 + timedelta(hours=n)


def ledger() -> CertificateLedger:
    return CertificateLedger(site=SITE)


def conserved(book: CertificateLedger) -> bool:
    t = totals(book)
    return t.minted_mwh == pytest.approx(t.burned_mwh + balance(book) + t.expired_mwh)


# --- settings -----------------------------------------------------------------------


def test_settings_default_to_red_ii_validity_and_all_devices() -> None:
    cfg = certificate_settings(SiteConfig(id=SITE, market="M", certificates={}))
    assert cfg is not None
    assert cfg.validity_months == 12
    assert cfg.counts("any-pv")
    assert certificate_settings(SiteConfig(id=SITE, market="M")) is None


def test_settings_name_the_bad_key() -> None:
    with pytest.raises(SettingsError, match=r"sites\[site1\]\.certificates\.validity_months"):
        certificate_settings(SiteConfig(id=SITE, market="M", certificates={"validity_months": 0}))


def test_settings_listed_devices_only() -> None:
    cfg = CertificateSettings(generation_devices=["pv1"])
    assert cfg.counts("pv1")
    assert not cfg.counts("pv2")


# --- mint ---------------------------------------------------------------------------


def test_exactly_one_mwh_mints_one_certificate() -> None:
    book = ledger()
    (event,) = mint(book, "pv1", hour(0) + timedelta(minutes=30), 1000.0)
    assert event.action is CertificateAction.MINT
    assert (event.site, event.device, event.hour_start) == (SITE, "pv1", hour(0))
    assert event.energy_mwh == 1.0
    assert event.at == hour(1)
    assert book.meters["pv1"].carry_kwh == 0.0
    assert balance(book) == 1.0


def test_just_below_one_mwh_mints_nothing() -> None:
    book = ledger()
    assert mint(book, "pv1", hour(0), 999.9) == []
    assert book.meters["pv1"].carry_kwh == pytest.approx(999.9)


def test_many_small_readings_add_up_without_float_drift() -> None:
    book = ledger()
    events = [e for n in range(1, 1001) for e in mint(book, "pv1", hour(0), n * 1.0)]
    # 1000 running totals of 1..1000 kWh in one hour: exactly 1 MWh.
    assert len(events) == 1


def test_fraction_carries_across_hours_and_cert_gets_completing_hour() -> None:
    book = ledger()
    assert mint(book, "pv1", hour(0), 600.0) == []
    (event,) = mint(book, "pv1", hour(1), 600.0)
    assert event.hour_start == hour(1)
    assert book.meters["pv1"].carry_kwh == pytest.approx(200.0)


def test_fractions_of_different_devices_are_not_pooled() -> None:
    book = ledger()
    assert mint(book, "pv1", hour(0), 600.0) == []
    assert mint(book, "pv2", hour(0), 600.0) == []
    assert balance(book) == 0.0


def test_large_hour_mints_several_with_distinct_ids() -> None:
    book = ledger()
    events = mint(book, "pv1", hour(0), 2500.0)
    assert len(events) == 2
    assert len({e.certificate_id for e in events}) == 2
    assert book.meters["pv1"].carry_kwh == pytest.approx(500.0)


def test_running_total_within_an_hour_counts_only_the_increase() -> None:
    book = ledger()
    assert mint(book, "pv1", hour(0), 400.0) == []
    assert len(mint(book, "pv1", hour(0), 1100.0)) == 1
    assert mint(book, "pv1", hour(0), 1100.0) == []
    assert book.meters["pv1"].carry_kwh == pytest.approx(100.0)


def test_replaying_telemetry_hours_mints_nothing_new() -> None:
    book = ledger()
    first = mint(book, "pv1", hour(0), 1500.0) + mint(book, "pv1", hour(1), 700.0)
    assert len(first) == 2
    assert mint(book, "pv1", hour(0), 1500.0) == []  # earlier hour: replay
    assert mint(book, "pv1", hour(1), 700.0) == []  # same total: replay
    assert balance(book) == 2.0


def test_ids_are_deterministic_across_runs() -> None:
    a, b = ledger(), ledger()
    assert mint(a, "pv1", hour(0), 3000.0) == mint(b, "pv1", hour(0), 3000.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_energy_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="solar_kwh"):
        mint(ledger(), "pv1", hour(0), bad)
    with pytest.raises(ValueError, match="consumption_kwh"):
        claim(ledger(), hour(0), bad, "c1")


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        mint(ledger(), "pv1", datetime(2025, 6, 2, 10), 1000.0)  # noqa: DTZ001 - on purpose


# --- claim --------------------------------------------------------------------------


def test_claim_burns_same_hour_certificates() -> None:
    book = ledger()
    minted = mint(book, "pv1", hour(0), 2000.0)
    burns = claim(book, hour(0) + timedelta(minutes=59), 2000.0, "tenant-a")
    assert {b.certificate_id for b in burns} == {m.certificate_id for m in minted}
    assert all(b.claimed_by == "tenant-a" and b.hour_start == hour(0) for b in burns)
    assert balance(book) == 0.0
    assert totals(book).burned_mwh == 2.0


def test_claim_in_another_hour_matches_nothing() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 1000.0)
    assert claim(book, hour(1), 5000.0, "tenant-a") == []
    assert balance(book) == 1.0


def test_claim_larger_than_available_burns_only_what_exists() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 2000.0)
    assert len(claim(book, hour(0), 5000.0, "tenant-a")) == 2
    assert balance(book) == 0.0


def test_consumption_below_one_mwh_burns_nothing_until_covered() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 1000.0)
    assert claim(book, hour(0), 999.0, "tenant-a") == []
    assert len(claim(book, hour(0), 1000.0, "tenant-a")) == 1


def test_replayed_claim_burns_nothing_more() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 3000.0)
    assert len(claim(book, hour(0), 2000.0, "tenant-a")) == 2
    assert claim(book, hour(0), 2000.0, "tenant-a") == []
    assert balance(book) == 1.0


def test_claimant_never_claims_more_than_it_consumed() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 1000.0)
    assert len(claim(book, hour(0), 1500.0, "tenant-a")) == 1
    # A second device completes a MWh in the same hour; the claimant's 1.5 MWh is
    # already matched by 1 MWh, and 0.5 MWh more does not cover a whole certificate.
    mint(book, "pv2", hour(0), 1000.0)
    assert claim(book, hour(0), 1900.0, "tenant-a") == []
    assert len(claim(book, hour(0), 2000.0, "tenant-a")) == 1


def test_cap_survives_a_rebuild_from_the_topic() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 3000.0)
    claim(book, hour(0), 2000.0, "tenant-a")
    rebuilt = ledger()
    for event in book.events:
        apply(rebuilt, event)
    # The rebuilt ledger lost the producer's memory but not the burns: a replayed claim
    # of the same consumption finds it already matched.
    assert claim(rebuilt, hour(0), 2000.0, "tenant-a") == []
    assert balance(rebuilt) == 1.0


def test_two_claimants_share_an_hour_without_overlap() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 3000.0)
    a = claim(book, hour(0), 2000.0, "tenant-a")
    b = claim(book, hour(0), 2000.0, "tenant-b")
    assert (len(a), len(b)) == (2, 1)
    assert not {e.certificate_id for e in a} & {e.certificate_id for e in b}


def test_claim_needs_a_claimant() -> None:
    with pytest.raises(ValueError, match="claimed_by"):
        claim(ledger(), hour(0), 1000.0, "")


# --- expire -------------------------------------------------------------------------


def test_add_months_clamps_to_month_end() -> None:
    assert add_months(datetime(2025, 1, 31, tzinfo=UTC), 1) == datetime(2025, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2024, 3, 15, tzinfo=UTC), 12) == datetime(2025, 3, 15, tzinfo=UTC)


def test_expiry_boundary_is_end_of_hour_plus_validity() -> None:
    book = ledger()
    (minted,) = mint(book, "pv1", datetime(2025, 1, 31, 10, tzinfo=UTC), 1000.0)
    end = expires_at(minted.hour_start, 12)
    assert end == datetime(2026, 1, 31, 11, tzinfo=UTC)
    assert expire(book, end - timedelta(microseconds=1), CFG) == []
    (event,) = expire(book, end, CFG)
    assert event.action is CertificateAction.EXPIRE
    assert event.at == end  # deterministic, not the wall clock
    assert expire(book, end + timedelta(days=1), CFG) == []
    assert (balance(book), totals(book).expired_mwh) == (0.0, 1.0)


def test_burned_certificate_never_expires_and_expired_never_burns() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 2000.0)
    claim(book, hour(0), 1000.0, "tenant-a")
    (expired,) = expire(book, add_months(hour(1), 12), CFG)
    assert claim(book, hour(0), 5000.0, "tenant-b") == []
    t = totals(book)
    assert (t.minted_mwh, t.burned_mwh, t.expired_mwh) == (2.0, 1.0, 1.0)
    assert book.statuses()[expired.certificate_id][0] is CertificateStatus.EXPIRED


def test_expire_forgets_old_claims() -> None:
    book = ledger()
    claim(book, hour(0), 500.0, "tenant-a")
    expire(book, add_months(hour(1), 12), CFG)
    assert book.claims_kwh == {}


def test_a_forgotten_hour_is_never_claimed_again() -> None:
    # Found by the replay property: the hour's memory was pruned, then a late MINT for it
    # arrived; replaying the hour's claim must not burn that (past validity) certificate.
    book = ledger()
    claim(book, hour(0), 1000.0, "tenant-a")
    expire(book, add_months(hour(1), 12), CFG)
    mint(book, "pv1", hour(0), 1000.0)
    assert claim(book, hour(0), 1000.0, "tenant-a") == []
    restored = CertificateLedger.from_json(json.loads(json.dumps(book.to_json())))
    assert restored.claims_pruned_through == hour(0)
    assert claim(restored, hour(0), 1000.0, "tenant-a") == []


# --- apply and queries --------------------------------------------------------------


def test_burn_before_its_mint_is_held() -> None:
    source = ledger()
    (minted,) = mint(source, "pv1", hour(0), 1000.0)
    (burn,) = claim(source, hour(0), 1000.0, "tenant-a")
    book = ledger()
    assert apply(book, burn)
    assert book.statuses()[burn.certificate_id] == (CertificateStatus.HELD, None)
    assert (balance(book), totals(book).burned_mwh) == (0.0, 0.0)
    assert apply(book, minted)
    assert book.statuses()[burn.certificate_id] == (CertificateStatus.BURNED, "tenant-a")


def test_conflicting_burns_resolve_the_same_way_in_any_order() -> None:
    source = ledger()
    (minted,) = mint(source, "pv1", hour(0), 1000.0)
    (burn_a,) = claim(source, hour(0), 1000.0, "tenant-a")
    # A second writer (a bug) burns the same certificate for another claimant.
    burn_b = burn_a.model_copy(update={"event_id": "goo-burn-0", "claimed_by": "tenant-b"})
    for order in ([minted, burn_a, burn_b], [burn_b, minted, burn_a], [burn_a, burn_b, minted]):
        book = ledger()
        for event in order:
            apply(book, event)
        # The smallest event id wins; the certificate is burned once.
        assert book.statuses()[minted.certificate_id] == (CertificateStatus.BURNED, "tenant-b")
        assert totals(book).burned_mwh == 1.0


def test_claim_before_the_mint_of_its_hour_is_not_replayed_onto_it() -> None:
    book = ledger()
    assert claim(book, hour(0), 1500.0, "tenant-a") == []
    mint(book, "pv1", hour(0), 1000.0)
    # The same consumption replayed must not now claim the certificate minted later:
    # in the original stream it was already processed.
    assert claim(book, hour(0), 1500.0, "tenant-a") == []
    # More consumption in the hour does claim it.
    assert len(claim(book, hour(0), 1600.0, "tenant-a")) == 1


def test_burn_outside_the_certificate_hour_is_ignored() -> None:
    book = ledger()
    (minted,) = mint(book, "pv1", hour(0), 1000.0)
    wrong = minted.model_copy(
        update={"event_id": "x", "action": CertificateAction.BURN, "hour_start": hour(1)}
    )
    apply(book, wrong)
    assert balance(book) == 1.0


def test_apply_is_idempotent_and_rejects_other_sites() -> None:
    book = ledger()
    (minted,) = mint(book, "pv1", hour(0), 1000.0)
    assert not apply(book, minted)
    with pytest.raises(ValueError, match="site"):
        apply(book, minted.model_copy(update={"site": "other"}))


def test_summary_by_period() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 2000.0)
    mint(book, "pv1", hour(5), 1000.0)
    claim(book, hour(0), 1000.0, "tenant-a")
    expire(book, add_months(hour(6), 12), CFG)
    first = summary(book, hour(0), hour(1))
    assert (first.minted_mwh, first.burned_mwh, first.expired_mwh) == (2.0, 1.0, 0.0)
    year_later = summary(book, add_months(hour(0), 12), add_months(hour(24), 12))
    assert (year_later.minted_mwh, year_later.expired_mwh) == (0.0, 2.0)


def test_json_round_trip_keeps_ledger_and_producer_memory() -> None:
    book = ledger()
    mint(book, "pv1", hour(0), 2600.0)
    claim(book, hour(0), 1000.0, "tenant-a")
    data = json.loads(json.dumps(book.to_json()))
    copy = CertificateLedger.from_json(data)
    assert copy.to_json() == book.to_json()
    assert copy.statuses() == book.statuses()
    # Minting resumes from the saved carry and serial: same next certificate.
    assert mint(copy, "pv1", hour(1), 400.0) == mint(book, "pv1", hour(1), 400.0) != []


# --- properties ---------------------------------------------------------------------

DEVICES = ("pv1", "pv2")
CLAIMANTS = ("tenant-a", "tenant-b")
HOURS = 6

mint_op = st.tuples(
    st.just("mint"),
    st.sampled_from(DEVICES),
    st.integers(0, HOURS - 1),
    st.floats(0, 2500, allow_nan=False),
)
claim_op = st.tuples(
    st.just("claim"),
    st.sampled_from(CLAIMANTS),
    st.integers(0, HOURS - 1),
    st.floats(0, 3500, allow_nan=False),
)
# Days after T0; a one-month validity makes expiry happen within the generated range.
expire_op = st.tuples(st.just("expire"), st.just(""), st.integers(0, 60), st.just(0.0))
operations = st.lists(st.one_of(mint_op, mint_op, claim_op, expire_op), max_size=40)
SHORT = CertificateSettings(validity_months=1)


def run(book: CertificateLedger, ops: list[tuple[str, str, int, float]]) -> list[CertificateEvent]:
    log: list[CertificateEvent] = []
    clock_days = 0  # the wall clock never goes back
    for op, name, n, energy_kwh in ops:
        if op == "mint":
            log += mint(book, name, hour(n), energy_kwh)
        elif op == "claim":
            log += claim(book, hour(n), energy_kwh, name)
        else:
            clock_days = max(clock_days, n)
            log += expire(book, T0 + timedelta(days=clock_days), SHORT)
    return log


def rebuild(events: list[CertificateEvent]) -> CertificateLedger:
    book = ledger()
    for event in events:
        apply(book, event)
    return book


# Enough to reach held events, conflicts and expiries; small enough for a few seconds.
PROPERTY = settings(max_examples=80, deadline=None)


@PROPERTY
@given(operations, st.randoms(use_true_random=False))
def test_conservation_holds_for_any_event_order(ops: Any, rnd: random.Random) -> None:
    producer = ledger()
    log = run(producer, ops)
    assert conserved(producer)
    shuffled = list(log)
    rnd.shuffle(shuffled)
    book = ledger()
    for event in shuffled:
        apply(book, event)
        assert conserved(book)  # also while BURNs and EXPIREs are held
    assert book.statuses() == producer.statuses()
    assert totals(book) == totals(producer)


@PROPERTY
@given(operations, st.data())
def test_replaying_any_prefix_of_the_log_changes_nothing(ops: Any, data: st.DataObject) -> None:
    log = run(ledger(), ops)
    book = rebuild(log)
    before = book.to_json()
    k = data.draw(st.integers(0, len(log)))
    assert not any(apply(book, event) for event in log[:k])
    assert book.to_json() == before


@PROPERTY
@given(operations, st.data())
def test_replaying_telemetry_emits_nothing_new(ops: Any, data: st.DataObject) -> None:
    book = ledger()
    run(book, ops)
    before = book.to_json()
    start = data.draw(st.integers(0, len(ops)))
    end = data.draw(st.integers(start, len(ops)))
    # Expiry follows the clock, not telemetry: only readings are replayed.
    telemetry = [op for op in ops[start:end] if op[0] != "expire"]
    assert run(book, telemetry) == []
    after = book.to_json()
    # The consumption memory of hours past validity may be re-recorded (expire prunes it
    # again); it can match nothing, as every certificate of such an hour is spent.
    assert (after["events"], after["meters"]) == (before["events"], before["meters"])


@PROPERTY
@given(operations, operations, st.integers(0, 60))
def test_expire_leaves_nothing_due_active_also_after_a_json_round_trip(
    first: Any, then: Any, day: int
) -> None:
    # expire() looks only at the head of its queues (oldest first): what it leaves must
    # equal a scan of the whole ledger, and a ledger restored from JSON rebuilds them.
    book = ledger()
    run(book, first)
    restored = CertificateLedger.from_json(book.to_json())
    assert run(restored, then) == run(book, then)
    now = T0 + timedelta(days=day)
    assert expire(restored, now, SHORT) == expire(book, now, SHORT)
    minted = {e.certificate_id: e for e in book.events if e.action is CertificateAction.MINT}
    for certificate_id, (status, _) in book.statuses().items():
        if status is CertificateStatus.ACTIVE:
            assert expires_at(minted[certificate_id].hour_start, 1) > now
    assert all(expires_at(h, 1) > now for h in book.claims_kwh)
    assert book.to_json() == restored.to_json()


@PROPERTY
@given(operations)
def test_no_certificate_burned_twice_nor_energy_claimed_twice(ops: Any) -> None:
    book = ledger()
    log = run(book, ops)
    burns = Counter(e.certificate_id for e in log if e.action is CertificateAction.BURN)
    assert all(n == 1 for n in burns.values())
    # Burned certificates never exceed the largest consumption given for that hour.
    consumption_kwh: dict[tuple[str, int], float] = defaultdict(float)
    for op, name, n, energy_kwh in ops:
        if op == "claim":
            consumption_kwh[name, n] = max(consumption_kwh[name, n], energy_kwh)
    burned_mwh: dict[tuple[str, int], float] = defaultdict(float)
    for e in log:
        if e.action is CertificateAction.BURN:
            assert e.claimed_by is not None
            burned_mwh[e.claimed_by, (e.hour_start - T0) // timedelta(hours=1)] += e.energy_mwh
    assert all(burned_mwh[k] * 1000 <= consumption_kwh[k] + 1e-6 for k in burned_mwh)
    # A burned certificate is neither expired nor active.
    expired = {e.certificate_id for e in log if e.action is CertificateAction.EXPIRE}
    assert not expired & set(burns)


# Arbitrary events, including conflicting BURNs no valid producer would write (two
# claimants, wrong hour) and EXPIREs of burned certificates: the ledger is still the same
# for every order, and a certificate still counts as burned at most once.
raw_event = st.tuples(
    st.integers(0, 1),  # certificate: few, so conflicts are frequent
    st.sampled_from(list(CertificateAction)),
    st.sampled_from((*CLAIMANTS, "intruder")),
    st.integers(0, 1),  # BURN hour offset from the certificate's hour
)


def make_event(certificate: int, action: CertificateAction, who: str, offset: int) -> Any:
    cert_hour = hour(certificate)
    burn = action is CertificateAction.BURN
    return CertificateEvent(
        event_id=f"{certificate}-{action}-{who if burn else ''}-{offset if burn else 0}",
        certificate_id=f"cert-{certificate}",
        action=action,
        site=SITE,
        device="pv1",
        hour_start=cert_hour + timedelta(hours=offset) if burn else cert_hour,
        claimed_by=who if burn else None,
        at=cert_hour + HOURS * timedelta(hours=1),
    )


@PROPERTY
@given(st.lists(raw_event, max_size=30), st.randoms(use_true_random=False))
def test_arbitrary_events_commute(raw: Any, rnd: random.Random) -> None:
    events = [make_event(*r) for r in raw]
    reference = rebuild(events)
    shuffled = events + events[: len(events) // 2]  # with duplicates
    rnd.shuffle(shuffled)
    book = rebuild(shuffled)
    assert book.statuses() == reference.statuses()
    assert rebuild(events[::-1]).statuses() == reference.statuses()
    assert conserved(book)
    t = totals(book)
    burned = sum(s is CertificateStatus.BURNED for s, _ in book.statuses().values())
    assert t.burned_mwh == burned  # each burned certificate counted once


# --- granular units and settling an hour ----------------------------------------------


def test_granular_units_mint_and_burn_in_kwh() -> None:
    book = ledger()
    minted = mint(book, "pv-1", hour(0), 3.4, unit_kwh=1.0)
    assert [e.energy_mwh for e in minted] == [0.001] * 3
    burned = claim(book, hour(0), 2.7, "site1")
    assert len(burned) == 2  # whole certificates only: 0.7 kWh stays uncovered
    assert claimed_kwh(book, hour(0), "site1") == pytest.approx(2.0)
    assert balance(book) == pytest.approx(0.001)
    # The 0.4 kWh carried completes a certificate in the next hour with 0.6 kWh more.
    assert [e.hour_start for e in mint(book, "pv-1", hour(1), 0.6, unit_kwh=1.0)] == [hour(1)]
    assert conserved(book)


@pytest.mark.parametrize("unit", [0.0, -1.0, 1000.1])
def test_a_unit_outside_zero_to_one_mwh_is_rejected(unit: float) -> None:
    with pytest.raises(ValueError, match="unit_kwh"):
        mint(ledger(), "pv-1", hour(0), 5.0, unit_kwh=unit)
    with pytest.raises(SettingsError, match="unit_kwh"):
        certificate_settings(SiteConfig(id=SITE, market="M", certificates={"unit_kwh": unit}))


def test_settle_hour_mints_counted_devices_claims_and_expires_in_one_call() -> None:
    cfg = CertificateSettings(unit_kwh=1.0, generation_devices=["pv-1"], validity_months=1)
    book = ledger()
    events = settle_hour(book, cfg, hour(0), {"pv-1": 2.5, "pv-roof-of-neighbour": 9.0}, 1.2, SITE)
    assert [(e.action, e.device) for e in events] == [
        (CertificateAction.MINT, "pv-1"),
        (CertificateAction.MINT, "pv-1"),
        (CertificateAction.BURN, "pv-1"),
    ]
    # Settling the same hour again (a restart re-accounting it) adds nothing.
    assert settle_hour(book, cfg, hour(0), {"pv-1": 2.5}, 1.2, SITE) == []
    # A month later the unclaimed certificate expires when that hour is settled.
    later = hour(24 * 31)
    expired = settle_hour(book, cfg, later, {}, 0.0, SITE)
    assert [e.action for e in expired] == [CertificateAction.EXPIRE]
    assert totals(book).expired_mwh == pytest.approx(0.001) and balance(book) == 0.0


# --- reports ---------------------------------------------------------------------------


def test_period_starts_cover_days_and_months_up_to_the_end() -> None:
    end = datetime(2025, 8, 3, 5, tzinfo=UTC)
    days = period_starts(datetime(2025, 8, 1, 17, tzinfo=UTC), end, "day")
    assert days == [datetime(2025, 8, d, tzinfo=UTC) for d in (1, 2, 3)] + [end]
    months = period_starts(datetime(2025, 6, 30, 23, tzinfo=UTC), end, "month")
    assert months == [datetime(2025, m, 1, tzinfo=UTC) for m in (6, 7, 8)] + [end]
    with pytest.raises(ValueError, match="by"):
        period_starts(end, end, "week")


def test_summaries_in_one_pass_equal_summary_per_period() -> None:
    rng = random.Random(3)
    book = ledger()
    cfg = CertificateSettings(unit_kwh=1.0, validity_months=1)
    for h in range(24 * 40):
        mint(book, "pv-1", hour(h), rng.uniform(0, 4), unit_kwh=1.0)
        claim(book, hour(h), rng.uniform(0, 3), SITE)
        expire(book, hour(h + 1), cfg)
    bounds = period_starts(hour(0), hour(24 * 40 + 1), "day")
    per_period = [summary(book, a, b) for a, b in itertools.pairwise(bounds)]
    flat = [v for s in per_period for v in (s.minted_mwh, s.burned_mwh, s.expired_mwh)]
    fast = [v for s in summaries(book, bounds) for v in (s.minted_mwh, s.burned_mwh, s.expired_mwh)]
    assert fast == pytest.approx(flat, abs=1e-12)
    assert sum(s.expired_mwh for s in per_period) > 0 and sum(s.burned_mwh for s in per_period) > 0


def test_ledgers_rebuilt_from_a_topic_with_duplicates_count_each_event_once() -> None:
    book = ledger()
    events = mint(book, "pv-1", hour(0), 2500.0) + claim(book, hour(0), 1200.0, SITE)
    other = CertificateLedger(site="site2")
    events += mint(other, "pv-9", hour(0), 1000.0)
    rebuilt = ledgers_from_events(events + events[::-1])
    assert list(rebuilt) == [SITE, "site2"]
    assert balance(rebuilt[SITE]) == balance(book) == 1.0
    assert totals(rebuilt["site2"]).minted_mwh == 1.0
