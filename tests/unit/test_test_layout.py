"""The test tree itself: pytest imports test files by basename (the folders are not
packages), so two test files with one name break collection of the whole suite while
each passes alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_its_own_basename() -> None:
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert len(names) > 50  # the walk found the suite
    assert [name for name, count in names.items() if count > 1] == []
