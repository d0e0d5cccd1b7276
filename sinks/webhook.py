"""Alert webhooks: the alerts topic -> signed HTTP POSTs, at least once, never silently lost.

Each alert event (firing, then resolved, under one ``alert_id``) is delivered at
most once per sink (a bounded memory of what was delivered; across restarts the
``X-Wattstream-Delivery`` header, a deterministic id, lets the receiver drop a
repeat), and only if it passes the filter: ``min_severity``, and a cooldown per
site, device and alert type, so an alert storm sends one webhook, not hundreds
(the resolution of a suppressed alert is suppressed with it).

**Signature** (after Stripe's and GitHub's): header ``X-Wattstream-Signature:
t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``. Signing the
timestamp with the body lets a receiver refuse replays older than a few
minutes; :func:`verify` is the receiving side, in constant time.

**Delivery**: 2xx is done; 408, 429, 5xx, timeouts and connection errors are
retried with capped exponential backoff and jitter (honouring ``Retry-After``)
up to ``max_attempts``; any other answer, or the last failed attempt, is a
permanent failure: the alert goes to the dead-letter topic with the reason.
Offsets are committed only after an alert's outcome (sent, suppressed or
dead-lettered) is final, so a crash re-sends rather than loses. Alerts are
delivered in order, one at a time; at most ``queue_size`` are read ahead and
the rest waits in Kafka, so a slow receiver slows the sink, not the pipeline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from pipeline import codec, kafka, logs, metrics, topics
from pipeline.backoff import Backoff
from pipeline.schemas import Alert, AlertStatus, DeadLetter, Severity, stable_id
from pipeline.settings import Settings, WebhookSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Wattstream-Signature"
DELIVERY_HEADER = "X-Wattstream-Delivery"
SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
_REMEMBERED = 10_000  # delivered and suppressed alert events kept for de-duplication


def sign(secret: bytes, timestamp_s: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def verify(
    secret: bytes, header: str, body: bytes, tolerance_s: float = 300.0, now_s: float | None = None
) -> bool:
    """The receiving side: a valid signature made less than ``tolerance_s`` ago."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp_s = int(parts["t"])
        signature = parts["v1"]
    except (KeyError, ValueError):
        return False
    now_s = time.time() if now_s is None else now_s
    if abs(now_s - timestamp_s) > tolerance_s:
        return False
    expected = sign(secret, timestamp_s, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, signature)


def payload(alert: Alert, template: str) -> bytes:
    if template == "slack":
        icon = {"critical": ":rotating_light:", "warning": ":warning:"}.get(
            alert.severity.value, ":information_source:"
        )
        state = "RESOLVED" if alert.status is AlertStatus.RESOLVED else alert.severity.value.upper()
        where = f"{alert.site}/{alert.device}" if alert.device else alert.site
        text = f"{icon} [{state}] {alert.subject} ({where}): {alert.message}"
        return orjson.dumps({"text": text})
    return codec.encode(alert)


class AlertFilter:
    """Which alert events to send: severity, de-duplication and cooldown. Plain Python."""

    def __init__(self, webhook: WebhookSettings) -> None:
        self.min_rank = SEVERITY_RANK[Severity(webhook.min_severity)]
        self.cooldown = timedelta(seconds=webhook.cooldown_s)
        self._seen: OrderedDict[tuple[str, str], str] = OrderedDict()
        """(alert_id, status) -> "sent" or "suppressed"."""
        self._last_firing: dict[tuple[str, str | None, str], datetime] = {}

    def decide(self, alert: Alert) -> str | None:
        """None to send, or why not."""
        event = (alert.alert_id, alert.status.value)
        if event in self._seen:
            return "duplicate"
        if SEVERITY_RANK[alert.severity] < self.min_rank:
            return self._remember(event, "below min_severity")
        if alert.status is AlertStatus.RESOLVED:
            if self._seen.get((alert.alert_id, AlertStatus.FIRING.value)) == "suppressed":
                return self._remember(event, "its firing was suppressed")
            return None
        key = (alert.site, alert.device, alert.alert_type)
        last = self._last_firing.get(key)
        if last is not None and timedelta(0) <= alert.start - last < self.cooldown:
            return self._remember(event, f"cooldown ({self.cooldown.total_seconds():g} s)")
        self._last_firing[key] = alert.start
        return None

    def delivered(self, alert: Alert) -> None:
        self._remember((alert.alert_id, alert.status.value), "sent")

    def _remember(self, event: tuple[str, str], outcome: str) -> str:
        self._seen[event] = "sent" if outcome == "sent" else "suppressed"
        self._seen.move_to_end(event)
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        return outcome


class PermanentDeliveryError(Exception):
    pass


class RetriableDeliveryError(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class WebhookStats:
    received: int = 0
    sent: int = 0
    suppressed: int = 0
    retries: int = 0
    dead_lettered: int = 0
    last_error: str | None = None


class WebhookSink:
    """Consumes the alerts topic with its own group and delivers each alert event."""

    def __init__(self, settings: Settings, group_id: str | None = None) -> None:
        if settings.webhook.url is None or settings.webhook.secret is None:
            raise ValueError("webhook.url and webhook.secret are required for the webhook sink")
        self.settings = settings
        self.webhook = settings.webhook
        self.url = settings.webhook.url
        self.secret = settings.webhook.secret.get_secret_value().encode()
        self.group_id = group_id or f"{settings.app_id}-sink-webhook"
        self.topic = settings.topic(topics.ALERTS)
        self.filter = AlertFilter(settings.webhook)
        self.stats = WebhookStats()
        self._consumer: AIOKafkaConsumer = None
        self._producer: AIOKafkaProducer = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._run_exited = asyncio.Event()
        self._running = False
        self._started = False
        self._failing: str | None = None

    def failing(self) -> str | None:
        """Why the endpoint cannot be reached now (None once a delivery succeeded again):
        what readiness reports. A refusal is an answer, not an outage."""
        return self._failing

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        metrics.WEBHOOKS.stats.append(self.stats)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.webhook.timeout_s)
        )
        self._producer = kafka.producer(self.settings)
        await self._producer.start()
        self._consumer = kafka.consumer(self.settings, self.topic, group_id=self.group_id)
        await self._consumer.start()
        # Only the host: a webhook URL often carries its secret in the path (Slack's do).
        host = urlsplit(self.url).netloc.rsplit("@", 1)[-1]
        log.info("webhook sink: group %s, %s -> %s", self.group_id, self.topic, host)

    async def run(self) -> None:
        """Deliver until :meth:`stop`; what is not finished stays uncommitted."""
        await self.start()
        self._running = True
        try:
            while not self._stopping.is_set():
                records = await self._consumer.getmany(
                    timeout_ms=500, max_records=self.webhook.queue_size
                )
                for tp, messages in records.items():
                    for message in messages:
                        if self._stopping.is_set():
                            return  # the rest stays uncommitted and is read again
                        with logs.batch(logs.batch_id(message)):
                            handled = await self._handle(message)
                        if not handled:
                            return
                        await self._commit(tp, message.offset + 1)
        finally:
            self._running = False
            self._run_exited.set()

    async def _handle(self, message: ConsumerRecord) -> bool:
        """Deliver, suppress or dead-letter one record; False if the sink stopped meanwhile."""
        self.stats.received += 1
        try:
            alert = codec.decode(Alert, message.value or b"")
        except codec.DecodeError as error:
            await self._dead_letter(message, f"not an alert: {error.reason}", error.error_type)
            return True
        why_not = self.filter.decide(alert)
        if why_not is not None:
            self.stats.suppressed += 1
            log.info("webhook: %s %s not sent: %s", alert.alert_id, alert.status.value, why_not)
            return True
        body = payload(alert, self.webhook.template)
        delivery_id = stable_id("wh", alert.alert_id, alert.status.value)
        backoff = Backoff(self.webhook.retry_initial_s, self.webhook.retry_max_s)
        for attempt in range(1, self.webhook.max_attempts + 1):
            try:
                await self._post(body, delivery_id)
                self._failing = None
                self.stats.sent += 1
                self.filter.delivered(alert)
                return True
            except PermanentDeliveryError as error:
                await self._dead_letter(message, f"webhook refused: {error}", "WebhookRefused")
                return True
            except RetriableDeliveryError as error:
                self.stats.last_error = self._failing = str(error)
                if attempt == self.webhook.max_attempts:
                    await self._dead_letter(
                        message,
                        f"webhook failed {attempt} times, last: {error}",
                        "WebhookDeliveryFailed",
                    )
                    return True
                self.stats.retries += 1
                wait_s = error.retry_after_s
                if wait_s is None:
                    wait_s = backoff.next_delay_s()
                log.warning(
                    "webhook: %s attempt %d failed (%s); retry in %.1f s",
                    delivery_id,
                    attempt,
                    error,
                    wait_s,
                )
                if not await self._wait(wait_s):
                    return False
        return True  # pragma: no cover - the loop always returns

    async def _post(self, body: bytes, delivery_id: str) -> None:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, int(time.time()), body),
            DELIVERY_HEADER: delivery_id,
        }
        try:
            async with self._session.post(self.url, data=body, headers=headers) as response:
                if response.status < 300:
                    return
                text = (await response.text())[:300]
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise RetriableDeliveryError(f"{type(error).__name__}: {error}") from None
        if status in (408, 429) or status >= 500:
            try:
                retry_after_s = float(retry_after) if retry_after else None
            except ValueError:
                retry_after_s = None
            raise RetriableDeliveryError(f"{status}: {text}", retry_after_s)
        raise PermanentDeliveryError(f"{status}: {text}")

    async def _wait(self, seconds: float) -> bool:
        """Wait before a retry while staying in the consumer group (it must keep polling).

        Partitions are paused, so polling fetches nothing; records of partitions a
        rebalance hands over meanwhile are put back (seek), never skipped.
        """
        paused = set(self._consumer.assignment())
        self._consumer.pause(*paused)
        try:
            deadline = time.monotonic() + seconds
            while (remaining := deadline - time.monotonic()) > 0:
                if self._stopping.is_set():
                    return False
                records = await self._consumer.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
                for tp, messages in records.items():
                    self._consumer.seek(tp, messages[0].offset)
                    self._consumer.pause(tp)
                    paused.add(tp)
            return not self._stopping.is_set()
        finally:
            assigned = self._consumer.assignment()
            self._consumer.resume(*(tp for tp in paused if tp in assigned))

    async def _dead_letter(self, message: ConsumerRecord, reason: str, error_type: str) -> None:
        self.stats.dead_lettered += 1
        self.stats.last_error = reason
        letter = DeadLetter(
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            key=(message.key or b"").decode("utf-8", "replace") or None,
            raw=(message.value or b"").decode("utf-8", "backslashreplace"),
            reason=reason,
            error_type=error_type,
            component=__name__,
            received_at=datetime.now(UTC),
        )
        await self._producer.send_and_wait(
            self.settings.topic(topics.DEAD_LETTERS),
            codec.encode(letter),
            key=message.topic.encode(),
        )
        log.error("webhook: dead-lettered offset %d: %s", message.offset, reason)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self._consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError) as error:
            log.warning("webhook sink: commit skipped after a rebalance: %s", error)

    async def stop(self) -> None:
        self._stopping.set()
        if self._running:
            await self._run_exited.wait()
        if not self._started:
            return
        self._started = False
        if self.stats in metrics.WEBHOOKS.stats:
            metrics.WEBHOOKS.stats.remove(self.stats)
        await self._consumer.stop()
        await self._producer.stop()
        if self._session is not None:
            await self._session.close()
