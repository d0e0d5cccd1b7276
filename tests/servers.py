"""Real servers for integration tests, run as local subprocesses (there is no Docker here).

Each server listens on 127.0.0.1 on ports picked when the object is made, keeps
its data in a temporary directory, and is stopped by its process id. ``stop()``
then ``start()`` brings it back on the same ports with the same data, which is
how the outage tests take a server away and give it back.

A missing binary is an error, never a skip: ``make test`` installs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.local import die_with_parent, free_port

# How long a server may take to answer after exec. Both answer in ~0.2 s on
# these machines; 20 s leaves room for a loaded CI runner, and a server that
# never answers still fails the session quickly.
_START_TIMEOUT_S = 20.0
# InfluxDB flushes its WAL on SIGTERM; a few seconds is plenty, then SIGKILL.
_STOP_TIMEOUT_S = 10.0


def _binary(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name!r} not found on PATH: run `make test` (it installs Debian's {debian_package})"
        )
    return path


class ServerProcess:
    """A server subprocess with a readiness probe; subclasses give the command and probe."""

    name = "server"

    def __init__(self, data_dir: Path | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix=f"wattstream-{self.name}-"))
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / f"{self.name}.log"

    # -- what subclasses provide ------------------------------------------------------

    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        """True once the server answers its health endpoint."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> Self:
        if self.running:
            return self
        command = list(self.command())
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # never outlive a killed test run
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._process.returncode}: {self._log_tail()}"
                )
            if self.probe():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(
            f"{self.name} did not answer at {self.url} within {timeout_s} s: {self._log_tail()}"
        )

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop the process (SIGTERM, then SIGKILL); data and ports are kept. Safe twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop and delete the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _status(self, path: str) -> int | None:
        """HTTP status of a GET, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=1) as response:  # noqa: S310 - our own http:// URL
                status: int = response.status
                return status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def _request(self, path: str, data: bytes | None = None, timeout_s: float = 30.0) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=data)  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body: bytes = response.read()
            return body


class InfluxDB1(ServerProcess):
    """InfluxDB 1.x (Debian ``influxdb``, 1.6.7): v1 HTTP API and InfluxQL."""

    name = "influxdb"

    def __init__(self, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.binary = _binary("influxd", "influxdb")
        # The RPC (backup/restore) port defaults to 8088 on all interfaces: move it too.
        self.rpc_port = free_port(self.host)
        self.config_path = self.data_dir / "influxdb.conf"

    def command(self) -> Sequence[str]:
        tmp = self.data_dir
        self.config_path.write_text(
            f"""reporting-enabled = false
bind-address = "{self.host}:{self.rpc_port}"
[meta]
  dir = "{tmp / "meta"}"
[data]
  dir = "{tmp / "data"}"
  wal-dir = "{tmp / "wal"}"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
[continuous_queries]
  enabled = false
"""
        )
        return [self.binary, "-config", str(self.config_path)]

    def probe(self) -> bool:
        return self._status("/ping") == 204

    def query(self, influxql: str, db: str | None = None) -> dict[str, Any]:
        """Run InfluxQL (POST, so it may also write: CREATE/DROP); times are epoch ms."""
        params = {"q": influxql, "epoch": "ms", **({"db": db} if db else {})}
        body = self._request("/query", urllib.parse.urlencode(params).encode())
        result: dict[str, Any] = json.loads(body)
        for statement in result.get("results", []):
            if "error" in statement:
                raise RuntimeError(f"InfluxQL {influxql!r} failed: {statement['error']}")
        return result

    def rows(self, influxql: str, db: str) -> list[dict[str, Any]]:
        """The first statement's rows as dicts (column -> value), across all series."""
        rows: list[dict[str, Any]] = []
        statement = self.query(influxql, db)["results"][0]
        for series in statement.get("series", []):
            tags = series.get("tags", {})
            rows.extend(
                {**tags, **dict(zip(series["columns"], values, strict=True))}
                for values in series["values"]
            )
        return rows

    def write(self, lines: str, db: str) -> None:
        """Write line protocol (ms precision) straight to the server, as a fixture would."""
        self._request(
            "/write?" + urllib.parse.urlencode({"db": db, "precision": "ms"}), lines.encode()
        )


class VictoriaMetrics(ServerProcess):
    """VictoriaMetrics (Debian ``victoria-metrics``): takes the InfluxDB v2 write API."""

    name = "victoria-metrics"

    def __init__(self, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.binary = _binary("victoria-metrics", "victoria-metrics")

    def command(self) -> Sequence[str]:
        return [
            self.binary,
            f"-storageDataPath={self.data_dir / 'storage'}",
            f"-httpListenAddr={self.host}:{self.port}",
            # The default retention (1 month) silently drops replayed history.
            "-retentionPeriod=100y",
            "-loggerLevel=ERROR",
        ]

    def probe(self) -> bool:
        return self._status("/health") == 200

    def force_flush(self) -> None:
        """Make just-written samples visible to reads (they are buffered for ~1 s)."""
        self._request("/internal/force_flush")

    def export(self, match: str) -> list[dict[str, Any]]:
        """Raw samples of every series matching a selector, e.g. ``{__name__=~"decision_.*"}``.

        One dict per series: ``metric`` (labels), ``values``, ``timestamps`` (ms).
        """
        self.force_flush()
        body = self._request("/api/v1/export?" + urllib.parse.urlencode({"match[]": match}))
        return [json.loads(line) for line in body.splitlines() if line.strip()]
