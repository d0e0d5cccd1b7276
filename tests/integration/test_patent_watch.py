"""The deep-tech patent watch end to end on the embedded broker: the bundled sample files
published (a malformed document dead-lettered, the rest sent), scored by the worker's
agent, an alert for the credible fusion grant with its factors, none for pseudo-science."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingest.patents import ParseResult, parse_file, publish
from pipeline import codec, kafka, topics
from pipeline.app import create_app
from pipeline.cli import main
from pipeline.local import EmbeddedBroker
from pipeline.schemas import Alert, DeadLetter
from tests.conftest import REPO, SettingsFactory
from tests.unit.processors.test_patent_scoring import fusion_grant
from tests.workers import run_worker

pytestmark = pytest.mark.integration

SAMPLES = sorted((REPO / "data" / "patents").glob("*.xml"))


async def test_published_patents_are_scored_and_the_credible_one_alerts(
    kafka_broker: EmbeddedBroker, make_settings: SettingsFactory
) -> None:
    settings = make_settings(
        broker=kafka_broker.bootstrap,
        kafka={"one_record_per_batch": True},
        patents={"site": "deeptech"},
    )
    await kafka.ensure_topics(settings)
    results = [parse_file(path) for path in SAMPLES]
    grant = fusion_grant()
    results.append(ParseResult(patents=[grant]))
    stats = await publish(settings, results)
    parsed = sum(len(r.patents) for r in results)
    assert stats.patents_sent == parsed and stats.dead_lettered == 1

    app = create_app(settings)
    await run_worker(app, settings, [], [settings.topic(topics.PATENTS)])

    alerts = [codec.decode(Alert, v) for _, v in await kafka.read_all(settings, topics.ALERTS)]
    patent_alerts = [a for a in alerts if a.alert_type == "patent"]
    assert [a.subject.split(":")[0] for a in patent_alerts] == [grant.patent_id]
    (alert,) = patent_alerts
    assert alert.site == "deeptech" and alert.severity == "warning"
    assert alert.details["market"] == "DISRUPTIVE" and "fusion" in str(alert.details["watchlists"])
    assert float(alert.details["factor_patent_citations"]) > 0
    assert alert.details["reason_red_flags"]
    letters = [
        codec.decode(DeadLetter, v) for _, v in await kafka.read_all(settings, topics.DEAD_LETTERS)
    ]
    (letter,) = [d for d in letters if d.component == "ingest.patents"]
    assert "uspto_malformed.xml: document 2: not well-formed XML" in letter.reason
    assert letter.raw.startswith("<?xml") and letter.source_topic.endswith("wattstream.patents")


def test_the_score_command_reads_every_sample_and_skips_the_malformed_document(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(main, ["patents", "score", "--json", *map(str, SAMPLES)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == sum(len(parse_file(p).patents) for p in SAMPLES)
    by_id = {row["patent_id"]: row for row in rows}
    pseudo = by_id["US-20249999999-A1"]
    assert pseudo["market"] == "NOISE" and pseudo["validity"] < 40 and not pseudo["alert"]
    assert pseudo["red_flags"]
    assert all(set(row["factors"]) >= {"base", "red_flags", "examination"} for row in rows)
    assert "document 2: not well-formed XML" in result.stderr
