"""Delivering one (event, endpoint) message: sign, POST, record, and retry through the tiers.

Each attempt reads the endpoint and the event from PostgreSQL (a deleted or disabled endpoint
gets nothing more), POSTs the Standard Webhooks request through the SSRF-guarded transport with
no redirects and a `webhooks.timeout_s` deadline, and records the attempt. A 2xx is done; a 410
disables the endpoint; anything else (another status, a timeout, a refused address) waits in a
webhook delay tier and comes back to the webhooks queue as the next attempt, until the message
has been retried for RETRY_WINDOW_S. An endpoint with nothing but failures for DISABLE_AFTER_S is
disabled, and the log says so. Every attempt of an event carries the same `webhook-id`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import psycopg
from psycopg_pool import PoolTimeout

from pipeline.amqp.consumer import Delivery
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.errors import PublishNotConfirmed
from pipeline.messages import UndecodableMessage
from pipeline.resources import Deps
from pipeline.settings import WebhooksSettings
from pipeline.store import queries
from pipeline.webhooks import signing, ssrf
from pipeline.webhooks.fanout import WebhookMessage

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-mailpipe-attempt"
FIRST_ATTEMPT_HEADER = "x-mailpipe-first-attempt-at"
"""Unix seconds of the first attempt: the retry window is measured from it."""
OUR_HEADERS = (ATTEMPT_HEADER, FIRST_ATTEMPT_HEADER)

RETRY_WINDOW_S = 24 * 3600
"""A failing delivery is retried until at least this long after its first attempt."""
DISABLE_AFTER_S = 24 * 3600
"""An endpoint whose every attempt failed for this long is disabled."""
MAX_CONNECTIONS = 100
"""Open connections to all endpoints together, per process."""
RESPONSE_BYTES = 4096
"""Read at most this much of an answer (only its status matters); a longer one is cut off."""
DB_SHIELD_S = 10.0
"""Longest the recording of an attempt holds off a cancellation."""
ERROR_PAUSE_S = 1.0
"""How long a worker backs off after the database or the broker failed it."""
USER_AGENT = "mailpipe-webhooks/1"


def rfc3339(when: datetime) -> str:
    """UTC with microseconds and a Z: `2026-11-28T10:00:00.123456Z`."""
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def payload(target: queries.DeliveryTarget) -> bytes:
    """`{"type", "timestamp", "data": {"email_id", ...event data}}`: the same bytes on every
    attempt (`timestamp` is when the event happened)."""
    data = {"email_id": target.email_id}
    data.update((k, v) for k, v in target.data.items() if k != "email_id")
    body = {"type": target.event_type, "timestamp": rfc3339(target.created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def next_delay_s(
    attempt: int, elapsed_s: float, tiers_s: Sequence[int], *, window_s: float = RETRY_WINDOW_S
) -> int | None:
    """The delay tier to wait in after failed attempt `attempt` (1 = the first), or None when
    the retries are over: the tiers in order, the longest one again once they are used up,
    until `elapsed_s` since the first attempt reaches `window_s`."""
    if elapsed_s >= window_s:
        return None
    return tiers_s[min(max(attempt, 1), len(tiers_s)) - 1]


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: an HTTP status, or an error with no status."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


def http_client(settings: WebhooksSettings) -> httpx.AsyncClient:
    """The client every delivery of a process shares: guarded transport, no redirects, no
    proxies or .netrc from the environment."""
    return httpx.AsyncClient(
        transport=ssrf.GuardedTransport(
            allow_private=settings.allow_private,
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS),
        ),
        timeout=httpx.Timeout(settings.timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


async def post(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    timeout_s: float,
    allow_private: bool,
) -> Outcome:
    """POST once within `timeout_s` all told; never raises for what the endpoint does."""
    try:
        ssrf.parse_url(url, allow_private=allow_private)
        with anyio.fail_after(timeout_s):
            async with client.stream("POST", url, content=body, headers=headers) as response:
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= RESPONSE_BYTES:
                        break
                status = response.status_code
    except ssrf.UnsafeUrl as exc:
        return Outcome(None, f"refused: {exc}")
    except (TimeoutError, httpx.TimeoutException):
        return Outcome(None, f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}".rstrip(": "))
    if 200 <= status < 300:
        return Outcome(status, None)
    if 300 <= status < 400:
        return Outcome(status, f"HTTP {status}: redirects are not followed")
    return Outcome(status, f"HTTP {status}")


def _header_int(headers: Mapping[str, Any], name: str) -> int | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class Deliverer:
    """One process's delivery logic, shared by its consumer workers."""

    def __init__(
        self,
        deps: Deps,
        client: httpx.AsyncClient,
        publisher: ConfirmedPublisher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.deps = deps
        self.client = client
        self.publisher = publisher
        self.settings = deps.settings.webhooks
        self.clock = clock

    async def handle(self, delivery: Delivery) -> None:
        """One message; a database outage sends it round the shortest delay tier (the same
        attempt again, later) and pauses this worker."""
        try:
            await self.attempt(delivery)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("webhooks: database unavailable (%s); deferring and pausing", exc)
            if not delivery.settled:
                await self.postpone(delivery)
            with anyio.move_on_after(ERROR_PAUSE_S):
                await self.deps.stop.wait()

    async def postpone(self, delivery: Delivery) -> None:
        """Put the message in the shortest tier with its attempt headers as they are. Not a
        requeue: the queue's delivery limit would dead-letter it after a few seconds of outage."""
        try:
            await self.publisher.publish(
                self.deps.topology.webhook_delay_key(self.deps.topology.webhook_tiers_s[0]),
                delivery.body,
                message_id=delivery.message_id or "",
                headers={k: v for k, v in delivery.headers.items() if k in OUR_HEADERS},
            )
        except PublishNotConfirmed:
            await delivery.nack(requeue=True)
            return
        await delivery.ack()

    async def attempt(self, delivery: Delivery) -> None:
        try:
            message = WebhookMessage.decode(delivery.body)
        except UndecodableMessage as exc:
            log.error("dead-lettering a message that is not ours: %s", exc)
            await delivery.reject(requeue=False)  # to webhooks.dead
            return
        headers = delivery.headers
        now = self.clock()
        attempt = max(_header_int(headers, ATTEMPT_HEADER) or 1, 1)
        first_at = _header_int(headers, FIRST_ATTEMPT_HEADER) or int(now)
        async with self.deps.db.connection() as conn:
            target = await queries.delivery_target(conn, message.webhook_id, message.event_id)
        if target is None or not target.enabled:
            await delivery.ack()  # deleted or disabled since: nothing more to do
            return
        body = payload(target)
        signed = signing.sign_headers(
            target.secret, target.event_id, int(now), body, previous=target.previous_secret
        )
        outcome = await post(
            self.client,
            target.url,
            signed | {"content-type": "application/json"},
            body,
            timeout_s=self.settings.timeout_s,
            allow_private=self.settings.allow_private,
        )
        recorded: queries.AttemptRecorded | None = None
        with anyio.move_on_after(DB_SHIELD_S, shield=True) as recording:
            async with self.deps.db.connection() as conn:
                recorded = await queries.record_webhook_attempt(
                    conn,
                    webhook_id=target.webhook_id,
                    event_id=target.event_id,
                    event_type=target.event_type,
                    attempt=attempt,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    ok=outcome.ok,
                    gone=outcome.gone,
                    disable_after_s=DISABLE_AFTER_S,
                )
        if recording.cancelled_caught:  # the database is too slow: attempt it again later
            await self.postpone(delivery)
            return
        if recorded is not None and recorded.disabled_now:
            log.warning(
                "webhook %s (%s) disabled: %s",
                target.webhook_id,
                target.url,
                recorded.disabled_reason,
            )
        if outcome.ok or recorded is None or not recorded.enabled:
            await delivery.ack()
            return
        await self.retry(delivery, message, target, attempt, first_at, outcome, now)

    async def retry(
        self,
        delivery: Delivery,
        message: WebhookMessage,
        target: queries.DeliveryTarget,
        attempt: int,
        first_at: int,
        outcome: Outcome,
        now: float,
    ) -> None:
        """Send the message to the delay tier of its next attempt, or let it go."""
        tiers = self.deps.topology.webhook_tiers_s
        delay = next_delay_s(attempt, now - first_at, tiers)
        if delay is None:
            log.warning(
                "webhook %s: giving up on %s after %d attempts over %.1f h (last: %s)",
                target.webhook_id,
                target.event_id,
                attempt,
                (now - first_at) / 3600,
                outcome.error,
            )
            await delivery.ack()
            return
        try:
            await self.publisher.publish(
                self.deps.topology.webhook_delay_key(delay),
                delivery.body,
                message_id=message.message_id,
                headers={ATTEMPT_HEADER: attempt + 1, FIRST_ATTEMPT_HEADER: first_at},
            )
        except PublishNotConfirmed as exc:
            log.warning("webhook delay tier %d s did not confirm (%s); requeueing", delay, exc)
            with anyio.move_on_after(ERROR_PAUSE_S):
                await self.deps.stop.wait()
            await delivery.nack(requeue=True)
            return
        await delivery.ack()
