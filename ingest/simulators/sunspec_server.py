"""A SunSpec Modbus TCP server on pymodbus' own server, for tests, demos and benchmarks.

Each simulated device is one Modbus unit id holding ``SunS``, its models and the end
marker at ``base_address`` (40000 by default). Register values are encoded from
physical values by :func:`ingest.sunspec.encode_model`, the inverse of the decoder
the connector uses, so a test says "1500 W" and never writes a register by hand.

Values change over time through a profile, called before every read with the
current time and the seconds since its previous call; it returns the points to
update, per model. Tests set exact values with :meth:`SimulatedDevice.set`.

Uses pymodbus' ``SimDevice``/``SimData`` API (pymodbus >= 3.10): unlike the
deprecated datastore contexts, its addresses are the protocol addresses, with no
shift by one. The register block is refreshed in place from the read callback
(``SimDevice.action``), which pymodbus documents as the way to change what a read
returns.

    >>> server = SunSpecServer([inverter(unit_id=1, power_w=1500.0)])
    >>> await server.start()   # server.port is a free loopback port
    >>> await server.stop()    # start() again serves the same port
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from ingest.sunspec import END_MODEL_ID, SUNS_MARKER, Value, encode_model
from pipeline.local import free_port

PointValues: TypeAlias = dict[str, Value]
Profile: TypeAlias = Callable[[datetime, float], Mapping[int, Mapping[str, Value]]]
"""(now, seconds since the previous call) -> {model id: {point: physical value}}."""


class SimulatedDevice:
    """One SunSpec device (a Modbus unit id): its models' physical point values."""

    def __init__(
        self,
        unit_id: int,
        models: Mapping[int, Mapping[str, Value]],
        profile: Profile | None = None,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit_id {unit_id} must be 1..247 (Modbus unicast addresses)")
        self.unit_id = unit_id
        self.models: dict[int, PointValues] = {mid: dict(v) for mid, v in models.items()}
        self.profile = profile
        self.reads = 0
        """Read requests served, for tests and rate measurements."""
        self.refused_models: set[int] = set()
        """Models whose block reads are answered "illegal address" (their 2-register
        header still reads), as a device whose map has holes does."""
        self._profiled_at: datetime | None = None
        self.registers(datetime.now(UTC))  # fail now, not on the first read, if unencodable

    def set(self, model_id: int, **values: Value) -> None:
        """Set physical values of points of one model (``set(103, W=1500.0)``)."""
        self.models[model_id].update(values)

    def advance(self, now: datetime) -> None:
        """Apply the profile up to ``now``."""
        if self.profile is None:
            return
        dt_s = 0.0 if self._profiled_at is None else (now - self._profiled_at).total_seconds()
        self._profiled_at = now
        for model_id, values in self.profile(now, max(dt_s, 0.0)).items():
            self.models[model_id].update(values)

    def model_offsets(self) -> dict[int, int]:
        """Each model's ``ID`` register, as an offset from ``SunS``."""
        offsets: dict[int, int] = {}
        offset = len(SUNS_MARKER)
        for model_id, values in self.models.items():
            offsets[model_id] = offset
            offset += len(encode_model(model_id, values))
        return offsets

    def registers(self, now: datetime) -> list[int]:
        """The whole map: ``SunS``, each model block, the end marker."""
        self.advance(now)
        words = list(SUNS_MARKER)
        for model_id, values in self.models.items():
            words.extend(encode_model(model_id, values))
        words.extend([END_MODEL_ID, 0])
        return words


# --- devices ---------------------------------------------------------------------------


def _common(manufacturer: str, model: str, serial: str) -> PointValues:
    return {"Mn": manufacturer, "Md": model, "Vr": "1.0.0", "SN": serial, "DA": 1}


def _inverter_103(power_w: float, energy_wh: float = 1_000_000.0) -> PointValues:
    # Scale factors chosen so a residential/commercial range fits int16/acc32:
    # W with sf 0 holds up to 32.7 kW at 1 W resolution.
    return {
        "W": power_w,
        "W_SF": 0,
        "WH": energy_wh,
        "WH_SF": 0,
        "Hz": 50.0,
        "Hz_SF": -2,
        "PhVphA": 230.0,
        "PhVphB": 230.0,
        "PhVphC": 230.0,
        "V_SF": -1,
        "St": 4,  # MPPT: producing
    }


def inverter(
    unit_id: int, power_w: float = 0.0, profile: Profile | None = None, serial: str = "INV-1"
) -> SimulatedDevice:
    """A three-phase PV inverter: models 1 + 103."""
    return SimulatedDevice(
        unit_id,
        {1: _common("wattstream", "sim-inverter", serial), 103: _inverter_103(power_w)},
        profile,
    )


def battery(
    unit_id: int,
    soc_pct: float = 50.0,
    power_w: float = 0.0,
    profile: Profile | None = None,
    serial: str = "BAT-1",
    capacity_wh: float = 10_000.0,
) -> SimulatedDevice:
    """A battery with its inverter: models 1 + 103 (AC power, positive = output, i.e.
    discharging) + 802 (SoC, DC voltage and power, same sign)."""
    return SimulatedDevice(
        unit_id,
        {
            1: _common("wattstream", "sim-battery", serial),
            103: _inverter_103(power_w),
            802: {
                "AHRtg": capacity_wh / 50.0,
                "AHRtg_SF": 0,
                "WHRtg": capacity_wh,
                "WHRtg_SF": 0,
                "WChaRteMax": 5000.0,
                "WDisChaRteMax": 5000.0,
                "WChaDisChaMax_SF": 0,
                "SoC": soc_pct,
                "SoC_SF": -1,
                "ChaSt": _charge_status(power_w),
                "LocRemCtl": 0,
                "AlmRst": 0,
                "Typ": 4,  # LITHIUM_ION
                "State": 2,  # CONNECTED
                "Evt1": 0,
                "Evt2": 0,
                "EvtVnd1": 0,
                "EvtVnd2": 0,
                "V": 51.2,
                "V_SF": -1,
                "CellV_SF": -3,
                "A": power_w / 51.2,
                "A_SF": -1,
                "AMax_SF": 0,
                "W": power_w,
                "W_SF": 0,
                "SetOp": 0,
                "SetInvState": 2,
            },
        },
        profile,
    )


def meter(
    unit_id: int,
    power_w: float = 0.0,
    import_wh: float = 1_000_000.0,
    export_wh: float = 500_000.0,
    profile: Profile | None = None,
    serial: str = "MTR-1",
) -> SimulatedDevice:
    """A three-phase grid meter: models 1 + 203. ``power_w`` positive = importing."""
    return SimulatedDevice(
        unit_id,
        {
            1: _common("wattstream", "sim-meter", serial),
            203: {
                "W": power_w,
                "W_SF": 0,
                "TotWhImp": import_wh,
                "TotWhExp": export_wh,
                "TotWh_SF": 0,
                "PhV": 230.0,
                "PhVphA": 230.0,
                "PhVphB": 230.0,
                "PhVphC": 230.0,
                "V_SF": -1,
                "Hz": 50.0,
                "Hz_SF": -2,
                "A_SF": -2,
                "VA_SF": 0,
                "VAR_SF": 0,
                "PF_SF": -2,
                "TotVAh_SF": 0,
                "TotVArh_SF": 0,
                "Evt": 0,
            },
        },
        profile,
    )


def _charge_status(power_w: float) -> int:
    # 802 ChaSt: 3 DISCHARGING, 4 CHARGING, 6 HOLDING.
    return 3 if power_w > 0 else 4 if power_w < 0 else 6


# --- profiles --------------------------------------------------------------------------


def clear_sky_power_w(now: datetime, peak_w: float) -> float:
    """A clear-sky-like PV curve: zero at night, a sine bump 06:00-18:00 UTC. [W]"""
    hour = now.hour + now.minute / 60 + now.second / 3600
    if not 6.0 < hour < 18.0:
        return 0.0
    return peak_w * math.sin(math.pi * (hour - 6.0) / 12.0) ** 1.5


def pv_profile(peak_w: float) -> Profile:
    """Inverter model 103 ``W`` following :func:`clear_sky_power_w`."""

    def profile(now: datetime, dt_s: float) -> Mapping[int, Mapping[str, Value]]:
        return {103: {"W": round(clear_sky_power_w(now, peak_w))}}

    return profile


def battery_profile(
    power_w: Callable[[datetime], float], capacity_wh: float, soc_pct: float
) -> Profile:
    """SoC integrates ``power_w(now)`` (positive discharging), clamped to 0..100 %."""
    state = {"soc_pct": soc_pct}

    def profile(now: datetime, dt_s: float) -> Mapping[int, Mapping[str, Value]]:
        watts = power_w(now)
        state["soc_pct"] = min(
            100.0, max(0.0, state["soc_pct"] - watts * dt_s / 3600.0 / capacity_wh * 100.0)
        )
        return {
            103: {"W": watts},
            802: {"W": watts, "SoC": state["soc_pct"], "ChaSt": _charge_status(watts)},
        }

    return profile


# --- the server ------------------------------------------------------------------------


class SunSpecServer:
    """pymodbus' TCP server serving simulated SunSpec devices on one port.

    ``stop()`` then ``start()`` serves the same port again (how tests take a device
    away and give it back); both are safe to call twice.
    """

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        host: str = "127.0.0.1",
        port: int | None = None,
        base_address: int = 40000,
    ) -> None:
        if not devices:
            raise ValueError("devices must hold at least one simulated device")
        ids = [d.unit_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit ids must be unique, got {ids}")
        self.devices = {d.unit_id: d for d in devices}
        self.host = host
        self.port = port or free_port(host)
        self.base_address = base_address
        self._server: ModbusTcpServer | None = None

    def _sim_device(self, device: SimulatedDevice) -> SimDevice:
        async def refresh(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            # Re-encode the map on every request, so a read sees the profile's present.
            # The block is never resized: the chain's layout is fixed per device.
            refused = {device.model_offsets()[m] for m in device.refused_models}
            if count > 2 and address - start_address in refused:
                return ExcCodes.ILLEGAL_ADDRESS
            words = device.registers(datetime.now(UTC))
            registers[: len(words)] = words
            device.reads += 1
            return None

        initial = device.registers(datetime.now(UTC))
        return SimDevice(
            id=device.unit_id,
            simdata=[
                SimData(
                    address=self.base_address,
                    values=initial,
                    datatype=DataType.REGISTERS,
                )
            ],
            action=refresh,
        )

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        server = ModbusTcpServer(
            [self._sim_device(d) for d in self.devices.values()],
            address=(self.host, self.port),
        )
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        """Close the listener and every client connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            # Let the transports' close callbacks run before a restart binds the port.
            await asyncio.sleep(0)

    async def __aenter__(self) -> SunSpecServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


__all__ = [
    "Profile",
    "SimulatedDevice",
    "SunSpecServer",
    "battery",
    "battery_profile",
    "clear_sky_power_w",
    "inverter",
    "meter",
    "pv_profile",
]
