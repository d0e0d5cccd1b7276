"""The same arbitrage as a quixstreams application, against our worker on the same data.

quixstreams (Quix's Kafka stream processing library for Python, on librdkafka) is the
peer the performance issue names. Both sides run on the embedded broker, in their own
process, over the same topics:

* ``arbitrage_only_readings_per_s``: ``wattstream worker`` on a configuration with the
  sample's batteries and nothing else (detection turned off), so that it computes what
  the peer computes, agents only (``--no-sinks``: no InfluxDB sink, which the peer does
  not have either). It still runs the price fan-out that writes ``site-prices``, which
  the peer reads ready-made: the comparison is tilted towards the peer.
* ``peer_quixstreams_readings_per_s``: a quixstreams ``Application`` that consumes the
  telemetry and the ``site-prices`` topic (both keyed by site; the worker above wrote
  the latter from the prices), concatenated into one stream with one state store per
  site, and runs :class:`processors.arbitrage.SiteArbitrage` (the rule is plain Python,
  so both sides run the same code) on every message, with the site's state read from
  and written to quixstreams' state (RocksDB, changelogged) as its documentation
  shows. Decisions and commands go to a topic of its own.

Both figures count the telemetry readings consumed between the consumer group's first
commit and the moment it has committed everything (telemetry and prices), as the e2e
bench does, and the commit interval is the same (``kafka.commit_interval_s``). The
decisions each side produced are counted too: the two should agree, or the comparison
is not of the same work.

Run: ``python -m benchmarks peer``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from benchmarks.e2e import (
    SAMPLE,
    Drained,
    _e2e,
    _load,
    _overrides,
    _peak_rss_mb,
    watch_drained,
)
from pipeline import codec, kafka, topics
from pipeline.local import EmbeddedBroker, die_with_parent, stop_process
from pipeline.schemas import PriceTick
from pipeline.settings import Settings, load_settings
from processors.arbitrage import SiteArbitrage, SiteState, battery_readings, command_for

STATE_KEY = "arbitrage"
RETENTION_MS = str(7 * 24 * 3600 * 1000)


def arbitrage_only_config(settings: Settings) -> str:
    """Settings (TOML) with the sites' batteries and no other processor."""
    lines = [f"partitions = {settings.partitions}", ""]
    for site in settings.sites:
        if not site.batteries:
            continue
        lines += ["[[sites]]", f"id = {json.dumps(site.id)}", f"market = {json.dumps(site.market)}"]
        lines += ["  [sites.detection]", "  enabled = false"]
        for battery in site.batteries:
            lines.append("  [[sites.batteries]]")
            for key, value in battery.model_dump(mode="json", exclude_none=True).items():
                lines.append(f"  {key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


class PeerArbitrage:
    """One message of the peer: the site's state in, its state and outputs out.

    What the worker's arbitrage step does (``processors.arbitrage.register``), written
    for a framework that hands over one message and its key's state at a time. A batch
    that does not decode is skipped: the peer has no dead-letter topic.
    """

    def __init__(self, settings: Settings) -> None:
        self.engines = {site.id: SiteArbitrage(site) for site in settings.sites if site.batteries}

    def on_message(
        self, site: str, value: bytes, is_price: bool, saved: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, list[bytes]]:
        engine = self.engines.get(site)
        if engine is None:
            return None, []
        state = SiteState.from_json(saved) if saved is not None else SiteState()
        if is_price:
            decisions = engine.on_price(state, codec.decode(PriceTick, value))
        else:
            batch, _ = codec.decode_telemetry(value)
            readings = battery_readings(batch) if batch is not None else []
            if not readings:
                return None, []
            decisions = engine.on_readings(state, readings)
        out = []
        for decision in decisions:
            out.append(codec.encode(decision))
            command = command_for(decision, engine.batteries[decision.device])
            if command is not None:
                out.append(codec.encode(command))
        return state.to_json(), out


def run_peer(
    bootstrap: str, prefix: str, group: str, config: Path, state_dir: Path, output: str
) -> None:
    """The quixstreams application; runs until SIGTERM."""
    from quixstreams import Application, State, message_context
    from quixstreams.models import TopicConfig

    settings = load_settings(config, broker=bootstrap, topic_prefix=prefix)
    peer = PeerArbitrage(settings)
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        commit_interval=settings.kafka.commit_interval_s,
        state_dir=state_dir,
        loglevel="WARNING",
        # The embedded broker holds a waiting fetch (see the e2e bench): the same
        # short wait as the worker's.
        consumer_extra_config={"fetch.wait.max.ms": 10},
    )
    topic_config = TopicConfig(
        num_partitions=settings.partitions,
        replication_factor=1,
        extra_config={"retention.ms": RETENTION_MS},
    )
    prices_name = settings.topic(topics.SITE_PRICES)

    def topic(name: str) -> Any:
        return app.topic(
            name,
            key_deserializer="str",
            value_deserializer="bytes",
            key_serializer="str",
            value_serializer="bytes",
            config=topic_config,
        )

    def arbitrage(value: bytes, key: str, _ts: int, _headers: Any, state: State) -> list[bytes]:
        is_price = message_context().topic == prices_name
        saved, out = peer.on_message(key, value, is_price, state.get(STATE_KEY))
        if saved is not None:
            state.set(STATE_KEY, saved)
        return out

    stream = app.dataframe(topic(settings.topic(topics.TELEMETRY))).concat(
        app.dataframe(topic(prices_name))
    )
    stream = stream.apply(arbitrage, stateful=True, expand=True, metadata=True)
    stream.to_topic(topic(output))
    app.run()


async def peer_drained(
    settings: Settings, group: str, process: subprocess.Popen[bytes], timeout_s: float
) -> Drained:
    """Until the peer's group has committed all the telemetry and ``site-prices``."""
    names = [settings.topic(topics.TELEMETRY), settings.topic(topics.SITE_PRICES)]
    return await watch_drained(settings, [process], timeout_s, {group: names})


def start_peer(
    settings: Settings, group: str, config: Path, work_dir: Path, output: str
) -> subprocess.Popen[bytes]:
    """The peer in its own process (``work_dir`` holds its state and ``peer.log``)."""
    args = [kafka.bootstrap_servers(settings), settings.topic_prefix, group, str(config)]
    args += [str(work_dir / "peer-state"), output]
    with (work_dir / "peer.log").open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peer", *args],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=die_with_parent,
        )


def _peer(
    settings: Settings, config: Path, readings: int, work_dir: Path
) -> tuple[dict[str, float], set[str]]:
    """The peer's figures, and the ids of the decisions and commands it produced."""
    group = f"{settings.app_id}-peer"
    output = f"{settings.topic_prefix}peer-decisions"
    process = start_peer(settings, group, config, work_dir, output)
    try:
        drained = asyncio.run(peer_drained(settings, group, process, 900))
        rss_mb = _peak_rss_mb(process.pid)
        ids = asyncio.run(decision_ids(settings, output))
    except Exception as error:
        log = (work_dir / "peer.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{error}: {log}") from error
    finally:
        stop_process(process, timeout_s=60)
    return {
        "peer_quixstreams_readings_per_s": drained.readings_per_s(readings),
        "peer_quixstreams_rss_mb": rss_mb,
    }, ids


async def decision_ids(settings: Settings, *names: str) -> set[str]:
    """The decision and command ids on the topics, read until nothing more comes.

    Not up to the end offsets: the embedded broker reports those short of the last
    record for batches of several records, which librdkafka (the peer) produces.
    """
    ids: set[str] = set()
    partitions = list(await kafka.end_offsets(settings, list(names)))
    async with kafka.running(kafka.consumer(settings, group_id=None)) as reader:
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        while batches := await reader.getmany(timeout_ms=2000):
            for messages in batches.values():
                for message in messages:
                    record = orjson.loads(message.value)
                    ids.add(record.get("decision_id") or record["command_id"])
    return ids


def bench_peer() -> dict[str, float]:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        config = work_dir / "arbitrage.toml"
        config.write_text(arbitrage_only_config(load_settings(SAMPLE / "wattstream.toml")))
        overrides = _overrides(broker, work_dir)
        settings = load_settings(config, **overrides)
        readings = asyncio.run(_load(settings))
        # Agents only, as the peer: the InfluxDB sink is not part of the computation.
        ours = _e2e(settings, readings, config=config, sinks=False)
        ours_ids = asyncio.run(
            decision_ids(
                settings, settings.topic(topics.DECISIONS), settings.topic(topics.COMMANDS)
            )
        )
        peer, peer_ids = _peer(settings, config, readings, work_dir)
    return {
        "arbitrage_only_readings_per_s": ours["e2e_readings_per_s"],
        "arbitrage_only_rss_mb": ours["worker_rss_mb"],
        "arbitrage_only_outputs": float(len(ours_ids)),
        **peer,
        "peer_quixstreams_outputs": float(len(peer_ids)),
        # 1.0 when both produced exactly the same decisions and commands.
        "peer_quixstreams_same_outputs": len(ours_ids & peer_ids)
        / max(1, len(ours_ids | peer_ids)),
        "arbitrage_only_vs_peer": ours["e2e_readings_per_s"]
        / peer["peer_quixstreams_readings_per_s"],
    }


if __name__ == "__main__":
    if len(sys.argv) == 7:
        bootstrap, prefix, group, config, state_dir, output = sys.argv[1:]
        run_peer(bootstrap, prefix, group, Path(config), Path(state_dir), output)
    else:
        for key, value in bench_peer().items():
            print(f"{key:<40} {value:>14,.1f}")
