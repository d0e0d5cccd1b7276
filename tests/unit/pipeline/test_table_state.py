"""TableState: parse a table's JSON state only when the table no longer holds what we wrote."""

from __future__ import annotations

import json
from typing import Any

from pipeline.streams import TableState


def test_state_is_parsed_once_while_the_table_holds_our_value_and_again_when_replaced() -> None:
    table: dict[str, Any] = {}
    parsed: list[Any] = []

    def parse(value: Any) -> dict[str, int]:
        parsed.append(value)
        return dict(value) if value else {"n": 0}

    states = TableState(table, parse, dump=lambda state: dict(state))
    state = states.get("site")
    state["n"] += 1
    states.put("site", state)
    assert table["site"] == {"n": 1}
    again = states.get("site")
    assert again is state and len(parsed) == 1  # no parse while the value is ours
    # A changelog recovery (or another writer) puts a different object: parsed afresh.
    table["site"] = json.loads(json.dumps({"n": 7}))
    assert states.get("site") == {"n": 7} and len(parsed) == 2
    # A store that returns a copy on every read (RocksDB) parses every time.
    copies: Any = type(
        "Copies", (dict,), {"get": lambda self, k: dict(self[k]) if k in self else None}
    )()
    states = TableState(copies, parse, dump=lambda state: dict(state))
    states.put("a", {"n": 3})
    assert states.get("a") == {"n": 3} and states.get("a") == {"n": 3}
    assert len(parsed) == 4
