"""Guarantees of origin: a ledger that mints, burns and expires certificates per site.

One certificate (``CertificateEvent.energy_mwh`` = 1.0) stands for one MWh of metered
on-site solar. RED II (Directive (EU) 2018/2001, art. 19(2)) fixes the standard size of a
guarantee of origin at 1 MWh, so a certificate is never split. A site may choose a smaller
unit (``unit_kwh``, EnergyTag's granular certificates): a home never consumes a MWh in an
hour, so under hourly matching it could never claim a 1 MWh certificate.

**Minting.** :func:`mint` takes the solar energy a generation device metered in one hour
*so far* (the hour's running total, not an increment) and adds what is new to the device's
carry. Each full MWh (unit) of carry mints one certificate; the fraction carries over to the
device's next hours (never to another device: a certificate names one device). The
certificate's ``hour_start`` is the hour in which its MWh was completed. Its id is
``stable_id("goo", site, device, serial)`` with a per-device serial, and every event id
derives from the certificate id, so a replay or a restart emits byte-identical events.
Hours are taken in order per device: a call for an hour before the device's last metered
hour, or the same total again, is a replay and mints nothing. A genuinely late hour is
therefore dropped too; the wiring closes an hour only after a grace period (as a
watermark would) so that does not happen on healthy telemetry.

**Claiming (hourly matching).** :func:`claim` burns certificates minted in the *same*
hour as the consumption, up to the consumption, whole certificates only: ``n`` MWh of
consumption burn at most ``floor(n)`` 1 MWh certificates. Why whole certificates and not a
claimed fraction per certificate: the GHG Protocol Scope 2 quality criteria require that
an energy attribute certificate conveys the attributes of exactly the energy claimed and
is retired once, so burning a 1 MWh certificate against 0.4 MWh would claim energy that was
not consumed, and splitting it would give one certificate several burns (and RED II's
guarantee of origin is not divisible). EnergyTag's granular certificates solve that with
smaller units in hourly intervals; here the unit stays 1 MWh and the part of an hour's
consumption below a whole MWh is simply not covered (never carried to another hour, which
would defeat hourly matching). The result is conservative: claimed energy never exceeds
consumption. Certificates of an hour are burned in ``certificate_id`` order so the choice
does not depend on arrival order. Like :func:`mint`, ``consumption_kwh`` is the
claimant's running total for the hour: a repeat with no more consumption burns nothing,
and more consumption burns only what the total not yet matched covers. That cap is taken
from the ledger's own BURN events, so even a ledger rebuilt from the topic never lets
one claimant's hour claim more than it consumed.

**Expiry.** :func:`expire` expires every active certificate whose validity ended: RED II
art. 19(3) gives a guarantee of origin 12 months from the production of its unit, so a
certificate expires at the end of its hour plus ``validity_months`` (calendar months,
clamped to the month's last day) and is expired at that instant (``now >= expires_at``).
The EXPIRE event's ``at`` is that instant, not the wall clock, so it is deterministic.

**Applying events.** :func:`apply` adds an event to the ledger, keyed by ``event_id``: an
id already known changes nothing, so re-reading the certificates topic or replaying a
stretch of telemetry never double counts. A certificate's state is a function of the *set*
of its events, not of their order, so any order of the same events gives the same ledger:

* without its MINT a certificate counts nowhere: a BURN or EXPIRE that arrives first is
  held until the MINT arrives;
* a BURN counts only if its hour is the certificate's hour (hourly matching); if several
  valid BURNs exist (only a bug or two writers could make them) the one with the smallest
  ``event_id`` is the burn and the others are ignored, so a certificate is burned at most
  once whatever the order;
* a valid BURN takes precedence over an EXPIRE: under hourly matching the burn happened
  in the production hour, months before the expiry.

Hence ``minted = burned + balance + expired`` (in MWh) holds after any sequence of
:func:`apply`. Queries: :func:`balance` and :func:`summary` (minted by production hour,
burned by consumption hour, expired by expiry instant, in ``[start, end)``).

State per site: :class:`CertificateLedger` (JSON via ``to_json``/``from_json``) holds the
events plus the producer's memory (per device: last hour, its total and the carry; per
hour and claimant: the consumption already seen). The producer's memory is not on the
topic, so a ledger rebuilt from the topic alone is right for queries; minting resumes
exactly only from the saved state (the Faust table).

Everything here is plain Python (no Faust import).
"""

from __future__ import annotations

import bisect
import calendar
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.schemas import CertificateAction, CertificateEvent, Identifier, stable_id
from pipeline.settings import SiteConfig, validate_section

CERTIFICATE_MWH = 1.0
"""RED II standard size of a guarantee of origin. [MWh]"""
CERTIFICATE_KWH = CERTIFICATE_MWH * 1000.0
# 1 mWh: far below any meter's resolution, far above float rounding of summed kWh
# (1e-13 relative), so 1000 x 1.0 kWh always completes a certificate.
ENERGY_TOL_KWH = 1e-6
HOUR = timedelta(hours=1)


class CertificateSettings(BaseModel):
    """``[sites.certificates]``: which devices mint and how long a certificate lives.

    A site without this section mints no certificates.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    unit_kwh: float = Field(default=CERTIFICATE_KWH, gt=0, le=CERTIFICATE_KWH)
    """Energy of one certificate. 1000 (1 MWh) is RED II's guarantee of origin; sites far
    below a megawatt never consume 1 MWh in an hour, so under hourly matching their
    certificates could never be claimed: EnergyTag's granular certificates use smaller
    units (1 kWh, or 1 Wh) for exactly that. [kWh]"""
    validity_months: int = Field(default=12, ge=1, le=120)
    """Validity from production; 12 is RED II art. 19(3) for guarantees of origin. [months]"""
    generation_devices: list[Identifier] = Field(default_factory=list)
    """Solar devices that count as on-site generation; empty means every solar device of
    the site (a device behind another site's meter must be left out by listing the rest)."""

    def counts(self, device: str) -> bool:
        """Whether ``device``'s solar energy mints certificates."""
        return not self.generation_devices or device in self.generation_devices


def certificate_settings(site: SiteConfig) -> CertificateSettings | None:
    """Validate a site's ``certificates`` section (None without one); raises SettingsError."""
    if site.certificates is None:
        return None
    return validate_section(
        CertificateSettings, f"sites[{site.id}].certificates", site.certificates
    )


class CertificateStatus(StrEnum):
    HELD = "held"
    """A BURN or EXPIRE arrived before the MINT: counted nowhere yet."""
    ACTIVE = "active"
    BURNED = "burned"
    EXPIRED = "expired"


@dataclass
class _Certificate:
    """The events of one certificate; its status is derived from them, never stored."""

    mint: CertificateEvent | None = None
    burns: dict[str, CertificateEvent] = field(default_factory=dict)
    expiries: dict[str, CertificateEvent] = field(default_factory=dict)

    @property
    def burn(self) -> CertificateEvent | None:
        """The BURN that counts: in the certificate's hour, smallest event id wins."""
        if self.mint is None:
            return None
        hour = self.mint.hour_start
        valid = [b for b in self.burns.values() if b.hour_start == hour]
        return min(valid, key=lambda b: b.event_id) if valid else None

    @property
    def expiry(self) -> CertificateEvent | None:
        return min(self.expiries.values(), key=lambda e: e.event_id) if self.expiries else None

    @property
    def status(self) -> CertificateStatus:
        if self.mint is None:
            return CertificateStatus.HELD
        if self.burn is not None:
            return CertificateStatus.BURNED
        if self.expiries:
            return CertificateStatus.EXPIRED
        return CertificateStatus.ACTIVE


@dataclass
class DeviceMeter:
    """What minting remembers of one generation device."""

    hour: datetime | None = None
    """Last metered hour (start)."""
    hour_kwh: float = 0.0
    """Energy of that hour already counted. [kWh]"""
    carry_kwh: float = 0.0
    """Energy counted but not yet minted (< 1 MWh). [kWh]"""
    serial: int = 0
    """Certificates minted for the device so far (the next one gets ``serial + 1``)."""


@dataclass
class CertificateLedger:
    """The guarantee-of-origin ledger of one site (a Faust table value)."""

    site: str
    meters: dict[str, DeviceMeter] = field(default_factory=dict)
    claims_kwh: dict[datetime, dict[str, float]] = field(default_factory=dict)
    """Hour start -> claimant -> consumption already seen. [kWh]"""
    claims_pruned_through: datetime | None = None
    """The latest hour whose consumption memory :func:`expire` forgot: its certificates
    are past validity, so a later claim for it or an earlier hour (a replay) burns nothing."""
    _events: dict[str, CertificateEvent] = field(default_factory=dict)
    _certificates: dict[str, _Certificate] = field(default_factory=dict)
    # Indexes of the above, so that settling an hour touches that hour's certificates and
    # the ones due to expire, not the whole ledger (a year of hourly certificates).
    _minted_by_hour: dict[datetime, list[str]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """Hour start -> ids of the certificates minted in it."""
    _expiry_queue: list[tuple[datetime, str]] = field(
        default_factory=list, compare=False, repr=False
    )
    """Heap of (hour start, id) of minted certificates not yet looked at by :func:`expire`."""
    _claim_hours: list[datetime] = field(default_factory=list, compare=False, repr=False)
    """Heap of the hours of ``claims_kwh``, oldest first."""

    def __post_init__(self) -> None:
        self._claim_hours = list(self.claims_kwh)
        heapq.heapify(self._claim_hours)

    def _minted(self, hour: datetime) -> Iterable[tuple[CertificateEvent, _Certificate]]:
        """The certificates minted in ``hour``, with their MINT."""
        for certificate_id in self._minted_by_hour.get(hour, ()):
            certificate = self._certificates[certificate_id]
            # A second MINT of another hour (a foreign writer) may have replaced it.
            if certificate.mint is not None and certificate.mint.hour_start == hour:
                yield certificate.mint, certificate

    def _note_claim(self, hour: datetime) -> None:
        if hour not in self.claims_kwh:
            heapq.heappush(self._claim_hours, hour)

    @property
    def events(self) -> list[CertificateEvent]:
        """Every distinct event applied, in ``event_id`` order (the order does not matter)."""
        return [self._events[k] for k in sorted(self._events)]

    def statuses(self) -> dict[str, tuple[CertificateStatus, str | None]]:
        """Certificate id -> (status, claimed_by): the ledger's view, for checks and reports."""
        result: dict[str, tuple[CertificateStatus, str | None]] = {}
        for certificate_id in sorted(self._certificates):
            certificate = self._certificates[certificate_id]
            burn = certificate.burn
            result[certificate_id] = (certificate.status, burn.claimed_by if burn else None)
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "meters": {
                device: {
                    "hour": None if m.hour is None else m.hour.isoformat(),
                    "hour_kwh": m.hour_kwh,
                    "carry_kwh": m.carry_kwh,
                    "serial": m.serial,
                }
                for device, m in self.meters.items()
            },
            "claims_kwh": {hour.isoformat(): dict(c) for hour, c in self.claims_kwh.items()},
            "claims_pruned_through": (
                None
                if self.claims_pruned_through is None
                else self.claims_pruned_through.isoformat()
            ),
            "events": [event.model_dump(mode="json") for event in self.events],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CertificateLedger:
        ledger = cls(
            site=data["site"],
            meters={
                device: DeviceMeter(
                    hour=None if m["hour"] is None else datetime.fromisoformat(m["hour"]),
                    hour_kwh=float(m["hour_kwh"]),
                    carry_kwh=float(m["carry_kwh"]),
                    serial=int(m["serial"]),
                )
                for device, m in data["meters"].items()
            },
            claims_kwh={
                datetime.fromisoformat(hour): {k: float(v) for k, v in c.items()}
                for hour, c in data["claims_kwh"].items()
            },
            claims_pruned_through=(
                None
                if (pruned := data.get("claims_pruned_through")) is None
                else datetime.fromisoformat(pruned)
            ),
        )
        for raw in data["events"]:
            apply(ledger, CertificateEvent.model_validate(raw))
        return ledger


@dataclass(frozen=True)
class LedgerSummary:
    """Certificate energy of a period ``[start, end)``."""

    minted_mwh: float
    """By production hour. [MWh]"""
    burned_mwh: float
    """By consumption hour (= production hour under hourly matching). [MWh]"""
    expired_mwh: float
    """By expiry instant. [MWh]"""


# --- time ---------------------------------------------------------------------------


def _hour(value: datetime) -> datetime:
    """The UTC hour containing ``value``; naive datetimes are ambiguous and rejected."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def add_months(value: datetime, months: int) -> datetime:
    """``value`` plus calendar months, the day clamped to the month's end (31 Jan + 1: 28 Feb)."""
    index = value.month - 1 + months
    year, month = value.year + index // 12, index % 12 + 1
    day = min(value.day, calendar.monthrange(year, month)[1])
    return value.replace(year=year, month=month, day=day)


def expires_at(hour_start: datetime, validity_months: int) -> datetime:
    """When a certificate produced in the hour starting at ``hour_start`` stops being valid."""
    return add_months(hour_start + HOUR, validity_months)


def _check_energy(name: str, value_kwh: float) -> None:
    if not math.isfinite(value_kwh) or value_kwh < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value_kwh!r}")


# --- ledger operations --------------------------------------------------------------


def apply(ledger: CertificateLedger, event: CertificateEvent) -> bool:
    """Add ``event`` to the ledger; True if it was new, False if its id was already known.

    Idempotent and order-independent (see the module docstring). An event of another
    site is a routing error and raises ValueError.
    """
    if event.site != ledger.site:
        raise ValueError(
            f"event {event.event_id!r} of site {event.site!r} in ledger of {ledger.site!r}"
        )
    if event.event_id in ledger._events:
        return False
    ledger._events[event.event_id] = event
    certificate = ledger._certificates.setdefault(event.certificate_id, _Certificate())
    if event.action is CertificateAction.MINT:
        # One MINT per certificate: its event id derives from the certificate id, so a
        # second MINT id can only come from a foreign writer; keep the smallest id.
        if certificate.mint is None or event.event_id < certificate.mint.event_id:
            certificate.mint = event
            ledger._minted_by_hour.setdefault(event.hour_start, []).append(event.certificate_id)
            heapq.heappush(ledger._expiry_queue, (event.hour_start, event.certificate_id))
    elif event.action is CertificateAction.BURN:
        certificate.burns[event.event_id] = event
    else:
        certificate.expiries[event.event_id] = event
    return True


def mint(
    ledger: CertificateLedger,
    device: str,
    hour_start: datetime,
    solar_kwh: float,
    unit_kwh: float = CERTIFICATE_KWH,
) -> list[CertificateEvent]:
    """Mint a certificate for each full ``unit_kwh`` (1 MWh) of ``device``'s metered solar,
    and apply them.

    ``solar_kwh`` is the device's metered energy in the hour containing ``hour_start`` so
    far (a running total). Returns the new MINT events (empty on a replay). [kWh]
    """
    _check_energy("solar_kwh", solar_kwh)
    if not 0 < unit_kwh <= CERTIFICATE_KWH:
        raise ValueError(f"unit_kwh must be in (0, {CERTIFICATE_KWH:g}], got {unit_kwh!r}")
    hour = _hour(hour_start)
    meter = ledger.meters.setdefault(device, DeviceMeter())
    if meter.hour is not None and hour < meter.hour:
        return []  # replayed (or late) hour: already counted or dropped, never twice
    new_kwh = solar_kwh - meter.hour_kwh if hour == meter.hour else solar_kwh
    if new_kwh <= 0:
        return []
    meter.hour, meter.hour_kwh = hour, solar_kwh
    meter.carry_kwh += new_kwh
    events = []
    while meter.carry_kwh >= unit_kwh - ENERGY_TOL_KWH:
        meter.carry_kwh = max(0.0, meter.carry_kwh - unit_kwh)
        meter.serial += 1
        certificate_id = stable_id("goo", ledger.site, device, meter.serial)
        event = CertificateEvent(
            event_id=stable_id("goo-mint", certificate_id),
            certificate_id=certificate_id,
            action=CertificateAction.MINT,
            site=ledger.site,
            device=device,
            hour_start=hour,
            energy_mwh=unit_kwh / 1000.0,
            at=hour + HOUR,  # the MWh is complete at the latest at the hour's end
        )
        apply(ledger, event)
        events.append(event)
    return events


def claim(
    ledger: CertificateLedger, hour_start: datetime, consumption_kwh: float, claimed_by: str
) -> list[CertificateEvent]:
    """Burn whole certificates of the same hour to cover ``claimed_by``'s consumption.

    ``consumption_kwh`` is the claimant's consumption in the hour containing
    ``hour_start`` so far (a running total). Returns the new BURN events, already applied.
    [kWh]
    """
    _check_energy("consumption_kwh", consumption_kwh)
    if not claimed_by:
        raise ValueError("claimed_by must name the claimant")
    hour = _hour(hour_start)
    pruned = ledger.claims_pruned_through
    if pruned is not None and hour <= pruned:
        return []  # past validity, and its consumption memory is gone: never claim it again
    seen_kwh = ledger.claims_kwh.get(hour, {}).get(claimed_by, 0.0)
    if consumption_kwh <= seen_kwh + ENERGY_TOL_KWH:
        return []  # a replay, or no consumption beyond what was already matched
    ledger._note_claim(hour)
    ledger.claims_kwh.setdefault(hour, {})[claimed_by] = consumption_kwh
    active: list[CertificateEvent] = []  # their MINT events
    matched_mwh = 0.0
    for minted, certificate in ledger._minted(hour):
        burn = certificate.burn
        if burn is not None and burn.claimed_by == claimed_by:
            matched_mwh += minted.energy_mwh
        elif certificate.status is CertificateStatus.ACTIVE:
            active.append(minted)
    uncovered_kwh = consumption_kwh - matched_mwh * 1000.0
    events = []
    for minted in sorted(active, key=lambda m: m.certificate_id):
        certificate_kwh = minted.energy_mwh * 1000.0
        if certificate_kwh > uncovered_kwh + ENERGY_TOL_KWH:
            break  # whole certificates only: the rest of the hour stays uncovered
        uncovered_kwh -= certificate_kwh
        event = CertificateEvent(
            event_id=stable_id("goo-burn", minted.certificate_id, claimed_by),
            certificate_id=minted.certificate_id,
            action=CertificateAction.BURN,
            site=ledger.site,
            device=minted.device,
            hour_start=hour,
            energy_mwh=minted.energy_mwh,
            claimed_by=claimed_by,
            at=hour + HOUR,
        )
        apply(ledger, event)
        events.append(event)
    return events


def expire(
    ledger: CertificateLedger, now: datetime, settings: CertificateSettings
) -> list[CertificateEvent]:
    """Expire every active certificate whose validity ended by ``now``; apply and return them.

    Also forgets the consumption seen for hours whose certificates have all expired
    (no claim can match them any more), which bounds the ledger's memory.
    """
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: pass a timezone-aware UTC time")
    # Expiry grows with the production hour, so the due certificates are the queue's head.
    # One looked at here is never active again once due: it is expired now, or was burned.
    queue = ledger._expiry_queue
    due: dict[str, CertificateEvent] = {}
    while queue and expires_at(queue[0][0], settings.validity_months) <= now:
        hour_start, certificate_id = heapq.heappop(queue)
        certificate = ledger._certificates[certificate_id]
        minted = certificate.mint
        if minted is None or minted.hour_start != hour_start:
            continue  # replaced by a MINT of another hour, which has its own entry
        if certificate.status is CertificateStatus.ACTIVE:
            due[certificate_id] = minted
    events = []
    for certificate_id in sorted(due):
        minted = due[certificate_id]
        end = expires_at(minted.hour_start, settings.validity_months)
        event = CertificateEvent(
            event_id=stable_id("goo-expire", certificate_id),
            certificate_id=certificate_id,
            action=CertificateAction.EXPIRE,
            site=ledger.site,
            device=minted.device,
            hour_start=minted.hour_start,
            energy_mwh=minted.energy_mwh,
            at=end,
        )
        apply(ledger, event)
        events.append(event)
    hours = ledger._claim_hours
    while hours and expires_at(hours[0], settings.validity_months) <= now:
        hour = heapq.heappop(hours)
        ledger.claims_kwh.pop(hour, None)
        pruned = ledger.claims_pruned_through
        ledger.claims_pruned_through = hour if pruned is None else max(pruned, hour)
    return events


def settle_hour(
    ledger: CertificateLedger,
    settings: CertificateSettings,
    hour_start: datetime,
    solar_by_device_kwh: Mapping[str, float],
    consumption_kwh: float,
    claimed_by: str,
) -> list[CertificateEvent]:
    """Everything one closed hour does to the ledger, in order: mint each generation
    device's metered solar, claim the hour's consumption, and expire what ended by the
    hour's end. Returns the new events (none when the hour was settled before). [kWh]
    """
    events: list[CertificateEvent] = []
    for device in sorted(solar_by_device_kwh):
        if settings.counts(device):
            energy_kwh = solar_by_device_kwh[device]
            events += mint(ledger, device, hour_start, energy_kwh, settings.unit_kwh)
    events += claim(ledger, hour_start, consumption_kwh, claimed_by)
    events += expire(ledger, _hour(hour_start) + HOUR, settings)
    return events


# --- queries ------------------------------------------------------------------------


def claimed_kwh(ledger: CertificateLedger, hour_start: datetime, claimed_by: str) -> float:
    """Energy of the certificates ``claimed_by`` burned for the hour (valid burns only). [kWh]"""
    hour = _hour(hour_start)
    total_mwh = 0.0
    for minted, certificate in ledger._minted(hour):
        burn = certificate.burn
        if burn is not None and burn.claimed_by == claimed_by:
            total_mwh += minted.energy_mwh
    return total_mwh * 1000.0


def _counted(ledger: CertificateLedger) -> Iterable[tuple[CertificateEvent, _Certificate]]:
    """Minted certificates with their MINT event (held ones count nowhere)."""
    for certificate in ledger._certificates.values():
        if certificate.mint is not None:
            yield certificate.mint, certificate


def balance(ledger: CertificateLedger) -> float:
    """Energy of the site's active (unclaimed, unexpired) certificates. [MWh]"""
    return sum(
        minted.energy_mwh
        for minted, certificate in _counted(ledger)
        if certificate.status is CertificateStatus.ACTIVE
    )


def summary(ledger: CertificateLedger, start: datetime, end: datetime) -> LedgerSummary:
    """Minted, burned and expired certificate energy in ``[start, end)``. [MWh]"""
    minted_mwh = burned_mwh = expired_mwh = 0.0
    for minted, certificate in _counted(ledger):
        energy_mwh = minted.energy_mwh
        if start <= minted.hour_start < end:
            minted_mwh += energy_mwh
        status = certificate.status
        burn, expiry = certificate.burn, certificate.expiry
        if status is CertificateStatus.BURNED and burn and start <= burn.hour_start < end:
            burned_mwh += energy_mwh
        if status is CertificateStatus.EXPIRED and expiry and start <= expiry.at < end:
            expired_mwh += energy_mwh
    return LedgerSummary(minted_mwh=minted_mwh, burned_mwh=burned_mwh, expired_mwh=expired_mwh)


def totals(ledger: CertificateLedger) -> LedgerSummary:
    """All-time minted, burned and expired certificate energy. [MWh]"""
    return summary(ledger, datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


def ledgers_from_events(events: Iterable[CertificateEvent]) -> dict[str, CertificateLedger]:
    """Each site's ledger rebuilt from its events (e.g. the whole certificates topic).

    Right for every query; only the minting memory (carries) is not on the topic.
    """
    ledgers: dict[str, CertificateLedger] = {}
    for event in events:
        apply(ledgers.setdefault(event.site, CertificateLedger(event.site)), event)
    return dict(sorted(ledgers.items()))


def period_starts(start: datetime, end: datetime, by: str) -> list[datetime]:
    """The starts of the UTC days (``by="day"``) or months (``"month"``) covering
    ``[start, end)``, and ``end`` last."""
    if by not in ("day", "month"):
        raise ValueError(f"by must be 'day' or 'month', got {by!r}")
    first = _hour(start).replace(hour=0)
    if by == "month":
        first = first.replace(day=1)
    starts = []
    current = first
    while current < end:
        starts.append(current)
        current = add_months(current, 1) if by == "month" else current + timedelta(days=1)
    return [*starts, end]


def summaries(ledger: CertificateLedger, bounds: list[datetime]) -> list[LedgerSummary]:
    """:func:`summary` for each period ``[bounds[i], bounds[i + 1])``, in one pass. [MWh]"""
    minted = [0.0] * (len(bounds) - 1)
    burned = [0.0] * (len(bounds) - 1)
    expired = [0.0] * (len(bounds) - 1)

    def add(totals_mwh: list[float], at: datetime, energy_mwh: float) -> None:
        index = bisect.bisect_right(bounds, at) - 1
        if 0 <= index < len(totals_mwh):
            totals_mwh[index] += energy_mwh

    for mint_event, certificate in _counted(ledger):
        add(minted, mint_event.hour_start, mint_event.energy_mwh)
        status = certificate.status
        burn, expiry = certificate.burn, certificate.expiry
        if status is CertificateStatus.BURNED and burn is not None:
            add(burned, burn.hour_start, mint_event.energy_mwh)
        elif status is CertificateStatus.EXPIRED and expiry is not None:
            add(expired, expiry.at, mint_event.energy_mwh)
    return [LedgerSummary(m, b, e) for m, b, e in zip(minted, burned, expired, strict=True)]
