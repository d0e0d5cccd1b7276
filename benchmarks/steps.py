"""The CPU cost of one worker's site steps, with no broker: what a worker could do at most.

The bundled sample (``ROUNDS`` rounds, each a week later) goes through the very steps
``create_app`` registers on the shared site agent (:func:`pipeline.streams.site_agent`):
telemetry batches decoded once, prices and intensities in event-time order, state
flushed (serialised) once per ``BATCH_MESSAGES`` messages as the agent does. The
tables are plain dicts, so what is timed is decoding, the processors and their state
serialisation: no Kafka, no Faust. SCRAM runs in its own agent and is not included.

``steps_readings_per_s`` is the ceiling of ``e2e_readings_per_s`` on this machine;
``steps_<processor>_us_per_reading`` says where the time goes.

Run: ``python -m benchmarks steps``.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.e2e import sample_period_ms
from ingest.carbon import parse_carbon
from ingest.replay import (
    read_prices,
    read_telemetry,
    shift_carbon,
    shift_price,
    site_batches,
)
from pipeline import codec, streams
from pipeline.app import create_app
from pipeline.schemas import CarbonIntensity, PriceTick
from pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
ROUNDS = 3
BATCH_MESSAGES = 50


def _timeline(settings: Settings) -> Iterator[tuple[int, int, Any]]:
    """(event ms, order, item): telemetry batches (raw bytes), price ticks and intensities."""
    frame, _ = read_telemetry(SAMPLE / "telemetry.parquet")
    ticks, _ = read_prices(SAMPLE / "prices.csv")
    parsed = parse_carbon((SAMPLE / "carbon.csv").read_bytes())
    intensities = list(parsed.messages)
    period_ms = sample_period_ms()
    streams_: list[Iterator[tuple[int, int, Any]]] = []
    for round_ in range(ROUNDS):
        shift = round_ * period_ms
        shifted = [shift_price(t, shift) for t in ticks]
        streams_.append(
            (int((t.published_at or t.start).timestamp() * 1000), 0, t) for t in shifted
        )
        # Shifted now: a generator would read ``shift`` when consumed, the last round's.
        shifted_intensities = [shift_carbon(c, shift) for c in intensities]
        streams_.append((int(c.start.timestamp() * 1000), 0, c) for c in shifted_intensities)
        for batches in site_batches(frame, "bench", settings.replay, round_=round_, shift_ms=shift):
            streams_.append((b.event_time_ms, 1, b) for b, _ in batches if b is not None)
    return heapq.merge(*streams_, key=lambda event: (event[0], event[1]))


def bench_steps() -> dict[str, float]:
    # The app is built, never started: the broker address is only written into its config.
    settings = load_settings(SAMPLE / "wattstream.toml", store="memory", broker="127.0.0.1:9")
    app = create_app(settings)
    registry = streams._SITE_STEPS[app]
    for table in registry.tables:
        table.table = {}  # type: ignore[attr-defined]  # both kinds keep their table there
    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, step: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if step is None:
            return None

        def run(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return step(*args)
            finally:
                spent[name] += time.perf_counter() - started

        return run

    def timed_steps(steps: Any) -> Any:
        name = steps.name.rsplit(".", 1)[-1]
        return dataclasses.replace(
            steps,
            telemetry=timed(name, steps.telemetry),
            prices=timed(name, steps.prices),
            carbon=timed(name, steps.carbon),
        )

    # The agent's own dispatch (registry.run) over the steps, each timed.
    registry.steps[:] = [timed_steps(s) for s in registry.steps]
    markets = {site.id: site.market for site in settings.sites}
    zones = {
        site.id: site.carbon.get("zone") for site in settings.sites if isinstance(site.carbon, dict)
    }
    timeline = list(_timeline(settings))
    readings = messages = 0
    outputs: Counter[str] = Counter()
    started = time.perf_counter()
    for _, _, item in timeline:
        # Prices and intensities reach every site of their market or zone (the fan-outs).
        if isinstance(item, PriceTick | CarbonIntensity):
            owners, key = (
                (markets, item.market) if isinstance(item, PriceTick) else (zones, item.zone)
            )
            for site in (s for s, owner in owners.items() if owner == key):
                outputs.update(type(o).__name__ for o in registry.run(site, item))
            continue
        decode_started = time.perf_counter()
        batch, _ = codec.decode_telemetry(item.value)
        spent["decode"] += time.perf_counter() - decode_started
        assert batch is not None
        readings += len(batch.readings)
        messages += 1
        outputs.update(type(o).__name__ for o in registry.run(batch.site, batch))
        if messages % BATCH_MESSAGES == 0:
            flush_started = time.perf_counter()
            for table in registry.tables:
                table.flush()
            spent["state flush"] += time.perf_counter() - flush_started
    elapsed = time.perf_counter() - started
    # Every kind of output the sample's processors make, or a step is not exercised (as
    # Scope 2 was not, when the timeline's intensities were wrong).
    missing = {kind.__name__ for kind in streams.OUTPUT_TOPICS} - set(outputs)
    assert not missing, f"the steps made no {sorted(missing)}: the bench is not exercising them"
    out = {
        "steps_readings_per_s": readings / elapsed,
        "steps_readings": float(readings),
        "steps_messages": float(messages),
        "steps_outputs": float(outputs.total()),
    }
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        out[f"steps_{name.replace(' ', '_')}_us_per_reading"] = seconds / readings * 1e6
    return out


if __name__ == "__main__":
    for key, value in bench_steps().items():
        print(f"{key:<44} {value:>14,.2f}")
