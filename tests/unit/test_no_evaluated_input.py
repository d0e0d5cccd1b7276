"""No input is ever evaluated or passed to a shell: the product's code has no eval, exec,
shell, pickle or unsafe YAML, and its one subprocess (the embedded broker) is started
from an argument list. A static check over the source tree, so a new use is caught."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "ingest", "processors", "sinks")
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {
    ("os", "system"),
    ("os", "popen"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
}


def _calls() -> list[tuple[Path, ast.Call]]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            found += [(path, node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return found


def test_no_input_is_evaluated_or_given_to_a_shell() -> None:
    calls = _calls()
    assert len(calls) > 1000  # the walk saw the code
    offending = []
    for path, call in calls:
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        func = call.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
            offending.append(f"{where} {func.id}()")
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in FORBIDDEN_ATTRIBUTES
        ):
            offending.append(f"{where} {func.value.id}.{func.attr}()")
        for keyword in call.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                offending.append(f"{where} shell=")
    assert offending == []


def test_the_one_subprocess_is_started_from_an_argument_list() -> None:
    popens = [
        (path, call)
        for path, call in _calls()
        if isinstance(call.func, ast.Attribute)
        and call.func.attr in {"Popen", "run", "call"}
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "subprocess"
    ]
    assert [path.name for path, _ in popens] == ["local.py"]
    ((_, popen),) = popens
    assert not isinstance(popen.args[0], ast.Constant | ast.JoinedStr), "a command line string"
