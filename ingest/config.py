"""What every connector's configuration shares: one table of a TOML file, unique devices."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Protocol, Self

from pydantic import BaseModel


class TomlConfig(BaseModel):
    """A connector configuration read from one table of a TOML file.

    ``ingest/<name>.sample.toml`` beside each connector shows every key.
    """

    toml_table: ClassVar[str | None] = None
    """The table read when the caller names none."""

    @classmethod
    def from_toml(cls, path: Path, table: str | None = None) -> Self:
        name = table or cls.toml_table
        if name is None:
            raise ValueError(f"{cls.__name__}: name the TOML table to read")
        with path.open("rb") as file:
            data = tomllib.load(file)
        return cls.model_validate(data.get(name, {}))


class _Device(Protocol):
    @property
    def site(self) -> str: ...
    @property
    def device(self) -> str: ...


def check_unique_devices(devices: Iterable[_Device]) -> None:
    """A device configured twice would be polled or commanded twice: refuse it."""
    seen: set[tuple[str, str]] = set()
    for d in devices:
        if (d.site, d.device) in seen:
            raise ValueError(f"devices: {d.site}/{d.device} is configured twice")
        seen.add((d.site, d.device))
