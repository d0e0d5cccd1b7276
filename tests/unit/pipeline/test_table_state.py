"""TableState and BufferedTable: held writes, one table write per flush, a key parsed once
until a rebalance (partitions revoked, a table recovered) makes the worker forget it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import faust

from pipeline.settings import load_settings
from pipeline.streams import BufferedTable, TableState, site_state


class CountingTable(dict[str, Any]):
    """A dict that counts writes (each write of a Faust table is one changelog record)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)


def test_state_is_held_until_flush_then_written_once_and_parsed_once() -> None:
    table = CountingTable()
    parsed: list[Any] = []
    dumped: list[Any] = []

    def parse(value: Any) -> dict[str, int]:
        parsed.append(value)
        return dict(value) if value else {"n": 0}

    def dump(state: dict[str, int]) -> dict[str, int]:
        dumped.append(state)
        return dict(state)

    states = TableState(table, parse, dump)
    for _ in range(3):  # three messages of one batch
        state = states.get("site")
        state["n"] += 1
        states.put("site", state)
    assert table == {} and dumped == []  # nothing written before the batch ends
    states.flush()
    assert table == {"site": {"n": 3}} and table.writes == 1 and len(dumped) == 1
    again = states.get("site")
    assert again is state and len(parsed) == 1  # no parse while the value is ours
    states.flush()
    assert table.writes == 1  # nothing held, nothing written
    # A store that returns a copy on every read (RocksDB) is not parsed per read either.
    copies: Any = type(
        "Copies", (dict,), {"get": lambda self, k: dict(self[k]) if k in self else None}
    )()
    states = TableState(copies, parse, dump)
    states.put("a", {"n": 3})
    states.flush()
    assert states.get("a") == {"n": 3} and states.get("a") is states.get("a")
    assert len(parsed) == 1
    # A changelog recovery rewrites the store behind the worker; after forget(), the
    # stored value is parsed afresh.
    copies["a"] = json.loads(json.dumps({"n": 7}))
    states.forget()
    assert states.get("a") == {"n": 7} and len(parsed) == 2


def test_site_state_forgets_on_revoke_and_on_recovery() -> None:
    settings = load_settings(store="memory", broker="127.0.0.1:9")
    app = faust.App("test-table-state", broker="kafka://127.0.0.1:9", store="memory://")
    parsed: list[Any] = []

    def parse(value: Any) -> dict[str, int]:
        parsed.append(value)
        return dict(value) if value else {"n": 0}

    states = site_state(app, settings, "counts", "test", parse, dict)
    states.table.data["site"] = {"n": 4}
    assert states.get("site") == {"n": 4} and len(parsed) == 1
    states.table.data["site"] = {"n": 5}  # a recovery wrote it
    assert states.get("site") == {"n": 4}  # not seen until the worker is told
    asyncio.run(states.table.call_recover_callbacks())
    assert states.get("site") == {"n": 5} and len(parsed) == 2
    states.table.data["site"] = {"n": 6}
    asyncio.run(app.on_partitions_revoked.send(set()))
    assert states.get("site") == {"n": 6} and len(parsed) == 3


def test_buffered_table_reads_its_held_writes_and_writes_each_key_once_per_flush() -> None:
    table = CountingTable()
    table["old"] = 1
    buffered = BufferedTable(table)
    buffered["a"] = 1
    buffered["a"] = 2
    buffered["old"] = 5
    assert buffered.get("a") == 2 and buffered.get("old") == 5 and buffered.get("x", 9) == 9
    assert table == {"old": 1} and table.writes == 1
    buffered.flush()
    assert table == {"old": 5, "a": 2} and table.writes == 3
    buffered.flush()
    assert table.writes == 3
