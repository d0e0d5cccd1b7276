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
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.local import LocalProcess, free_port


def _binary(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name!r} not found on PATH: run `make test` (it installs Debian's {debian_package})"
        )
    return path


class ServerProcess(LocalProcess):
    """An HTTP server subprocess on loopback with its data in a (temporary) directory."""

    name = "server"

    def __init__(self, data_dir: Path | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix=f"wattstream-{self.name}-"))
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        super().__init__(self.data_dir / f"{self.name}.log")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop and delete the data directory if this object created it."""
        super().close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

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

    def command(self) -> list[str]:
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

    def ready(self) -> bool:
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

    def command(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.data_dir / 'storage'}",
            f"-httpListenAddr={self.host}:{self.port}",
            # The default retention (1 month) silently drops replayed history.
            "-retentionPeriod=100y",
            "-loggerLevel=ERROR",
        ]

    def ready(self) -> bool:
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


class Mosquitto(ServerProcess):
    """Mosquitto 2.0 (Debian ``mosquitto``): MQTT 3.1.1 and 5 on one loopback listener.

    ``persistence true`` keeps persistent sessions and their queued QoS 1 messages in
    the data directory across ``stop()`` / ``start()`` (it writes them on SIGTERM).
    """

    name = "mosquitto"

    def __init__(self, data_dir: Path | None = None, *, allow_anonymous: bool = True) -> None:
        super().__init__(data_dir)
        self.allow_anonymous = allow_anonymous
        # Debian installs it in /usr/sbin, which is not on every user's PATH.
        path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
        self.binary = path or _binary("mosquitto", "mosquitto")
        self.config_path = self.data_dir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # As root, mosquitto otherwise drops to user `mosquitto`, which cannot write
        # the persistence file in our temporary directory.
        self.config_path.write_text(
            f"""listener {self.port} {self.host}
allow_anonymous {str(self.allow_anonymous).lower()}
persistence true
persistence_location {self.data_dir}/
user root
log_dest stdout
"""
        )
        return [self.binary, "-c", str(self.config_path)]

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class Prometheus(ServerProcess):
    """Prometheus (Debian ``prometheus``) scraping ``targets`` (``host:port``) every second.

    ``query`` runs an instant PromQL query through the HTTP API, as Grafana does.
    """

    name = "prometheus"

    def __init__(self, targets: list[str], data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.binary = _binary("prometheus", "prometheus")
        self.targets = targets
        self.config_path = self.data_dir / "prometheus.yml"

    def command(self) -> list[str]:
        self.config_path.write_text(
            json.dumps(  # YAML is a superset of JSON
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "wattstream", "static_configs": [{"targets": self.targets}]}
                    ],
                }
            )
        )
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        return self._status("/-/ready") == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query: ``[{"metric": {...}, "value": [t, "v"]}]``."""
        body = self._request("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus: {promql}: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def query_range(
        self, promql: str, start_s: float, end_s: float, step_s: float = 1.0
    ) -> list[dict[str, Any]]:
        """The matrix of a range query, as Grafana asks for a panel's time range."""
        params = {"query": promql, "start": start_s, "end": end_s, "step": step_s}
        body = self._request("/api/v1/query_range?" + urllib.parse.urlencode(params))
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus: {promql}: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single number an instant query gives (None: no series)."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def target_health(self) -> list[str]:
        """The health of each scrape target: ``up``, ``down`` or ``unknown``."""
        answer = json.loads(self._request("/api/v1/targets"))
        return [t["health"] for t in answer["data"]["activeTargets"]]
