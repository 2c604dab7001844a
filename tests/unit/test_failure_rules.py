"""Suppression rules and dead-letter bookkeeping: pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from types import MappingProxyType

import pytest

from pipeline.deadletters import Death, death_of, describe_death, jsonable
from pipeline.errors import Permanent, Temporary
from pipeline.mail.classify import RecipientsDeferred, RecipientsRefused, SmtpReply
from pipeline.suppressions import (
    canonical_address,
    hard_bounced,
    permanently_refused,
    recipients_to_suppress,
    refused_to_suppress,
)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Someone@Example.COM", "someone@example.com"),
        ("  padded@example.org ", "padded@example.org"),
        ("User@Bücher.Example", "user@bücher.example"),
        ("user@xn--bcher-kva.example", "user@bücher.example"),
        ("ÜSER@example.com", "üser@example.com"),
        ("not an address", "not an address"),
    ],
)
def test_canonical_address(given: str, canonical: str) -> None:
    assert canonical_address(given) == canonical


REFUSED = MappingProxyType(
    {
        "Gone@example.org": SmtpReply(550, "5.1.1", "5.1.1 no such user"),
        "nodomain@example.org": SmtpReply(550, "5.1.2", "5.1.2 bad domain"),
        "policy@example.org": SmtpReply(550, "5.7.1", "5.7.1 not allowed"),
        "later@example.org": SmtpReply(450, "4.2.1", "4.2.1 try later"),
        "plain@example.org": SmtpReply(550, None, "no such user (no enhanced code)"),
    }
)


def test_only_5_1_x_refusals_are_hard() -> None:
    assert hard_bounced(REFUSED) == ["Gone@example.org", "nodomain@example.org"]
    assert refused_to_suppress(REFUSED) == ["gone@example.org", "nodomain@example.org"]


def test_permanently_refused_is_every_5xx() -> None:
    assert permanently_refused(REFUSED) == [
        "Gone@example.org",
        "nodomain@example.org",
        "policy@example.org",
        "plain@example.org",
    ]


ENVELOPE = ["A@example.org", "b@example.org", "a@example.org"]


def test_a_5_1_x_to_the_whole_message_suppresses_the_envelope() -> None:
    err = Permanent("5.1.1 unknown", code=550, enhanced="5.1.1")
    assert recipients_to_suppress(err, ENVELOPE) == ["a@example.org", "b@example.org"]


@pytest.mark.parametrize(
    "err",
    [
        Permanent("5.7.1 spam", code=554, enhanced="5.7.1"),
        Permanent("no enhanced code", code=550),
        Temporary("4.1.1 later", code=450, enhanced="4.1.1"),
        Temporary("connection refused"),
    ],
)
def test_other_failures_suppress_nobody(err: Permanent | Temporary) -> None:
    assert recipients_to_suppress(err, ENVELOPE) == []


def test_refusals_at_rcpt_suppress_only_their_5_1_x_recipients() -> None:
    refused = RecipientsRefused("all refused", code=550, enhanced="5.7.1", refused=REFUSED)
    assert recipients_to_suppress(refused, ENVELOPE) == [
        "gone@example.org",
        "nodomain@example.org",
    ]
    deferred = RecipientsDeferred("some later", code=450, enhanced="4.2.1", refused=REFUSED)
    assert recipients_to_suppress(deferred, ENVELOPE) == [
        "gone@example.org",
        "nodomain@example.org",
    ]


WHEN = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def test_death_of_reads_the_latest_x_death() -> None:
    headers = {
        "x-death": [
            {"count": 1, "reason": "delivery_limit", "queue": "p.send", "time": WHEN},
            {"count": 3, "reason": "expired", "queue": "p.delay.1s", "time": WHEN},
        ],
        "x-first-death-reason": "expired",
        "x-first-death-queue": "p.delay.1s",
    }
    assert death_of(headers) == Death("delivery_limit", "p.send", 1)


def test_death_of_falls_back_to_the_first_death_headers() -> None:
    headers = {"x-first-death-reason": b"rejected", "x-first-death-queue": b"p.send"}
    assert death_of(headers) == Death("rejected", "p.send", None)
    assert death_of({}) == Death(None, None, None)
    assert death_of({"x-death": "nonsense"}) == Death(None, None, None)


@pytest.mark.parametrize(
    ("death", "text"),
    [
        (
            Death("delivery_limit", "p.send", 1),
            "delivery limit reached in p.send (redelivered too often; a crash loop?)",
        ),
        (Death("rejected", "p.send", 1), "rejected by a consumer of p.send"),
        (Death("expired", "p.retry", 1), "expired in p.retry"),
        (Death("maxlen", "p.send", 1), "p.send was full"),
        (Death("odd", None, None), "dead-lettered by the broker from an unknown queue: odd"),
        (Death(None, None, None), "dead-lettered by the broker (no x-death header)"),
    ],
)
def test_describe_death(death: Death, text: str) -> None:
    assert describe_death(death) == text


def test_jsonable_headers() -> None:
    headers = {
        "x-death": [{"time": WHEN, "routing-keys": ["send"], "count": 1}],
        "raw": b"\xff\x00",
        "text": b"plain",
        "flag": True,
        "nothing": None,
        "ratio": 0.5,
        "other": object,
    }
    out = jsonable(headers)
    assert out["x-death"] == [
        {"time": "2026-11-28T10:00:00+00:00", "routing-keys": ["send"], "count": 1}
    ]
    assert out["raw"] == {"base64": "/wA="}
    assert out["text"] == "plain"
    assert out["flag"] is True and out["nothing"] is None and out["ratio"] == 0.5
    assert out["other"] == repr(object)
