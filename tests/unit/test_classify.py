"""SMTP outcome classification: what is retried, what bounces, what is a hard bounce."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from pipeline.errors import DeliveryError, Permanent, Temporary
from pipeline.mail.classify import (
    RecipientsDeferred,
    RecipientsRefused,
    SmtpReply,
    classify_exception,
    is_hard_bounce,
    parse_enhanced,
)


@pytest.mark.parametrize(
    ("code", "message", "enhanced"),
    [
        (550, "5.1.1 <x@example.com>: Recipient address rejected", "5.1.1"),
        (451, "4.7.1 Try again later", "4.7.1"),
        (250, "2.0.0 Ok: queued as 12345", "2.0.0"),
        (552, "5.3.4 Message size exceeds fixed limit", "5.3.4"),
        (550, "  5.7.1 leading spaces", "5.7.1"),
        (550, "5.7.26 multi-digit detail", "5.7.26"),
        (550, "5.1.1\nsecond line 5.1.1", "5.1.1"),
        (550, "No such user here", None),
        (550, "4.7.1 class disagrees with the reply code", None),
        (550, "5.1 too short", None),
        (550, "5.1.1.1 too long", None),
        (550, "15.1.1 not at the start", None),
        (None, "4.4.1 no reply code", "4.4.1"),
        (550, "", None),
    ],
)
def test_parse_enhanced(code: int | None, message: str, enhanced: str | None) -> None:
    assert parse_enhanced(code, message) == enhanced


def test_reply_to_json() -> None:
    reply = SmtpReply.parse(451, "4.7.1 try later")
    assert reply == SmtpReply(451, "4.7.1", "4.7.1 try later")
    assert reply.to_json() == {"code": 451, "enhanced": "4.7.1", "message": "4.7.1 try later"}
    assert SmtpReply(None, None, "connection refused").to_json() == {
        "code": None,
        "enhanced": None,
        "message": "connection refused",
    }


@pytest.mark.parametrize(
    ("exc", "kind", "code", "enhanced"),
    [
        (aiosmtplib.SMTPDataError(451, "4.7.1 greylisted"), Temporary, 451, "4.7.1"),
        (aiosmtplib.SMTPDataError(550, "5.1.1 no such user"), Permanent, 550, "5.1.1"),
        (aiosmtplib.SMTPDataError(552, "5.3.4 too big"), Permanent, 552, "5.3.4"),
        (aiosmtplib.SMTPDataError(554, "rejected"), Permanent, 554, None),
        (aiosmtplib.SMTPSenderRefused(553, "5.7.1 not yours", "a@b.c"), Permanent, 553, "5.7.1"),
        (aiosmtplib.SMTPSenderRefused(421, "4.4.2 timeout", "a@b.c"), Temporary, 421, "4.4.2"),
        (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 nope", "x@y.z"), Permanent, 550, "5.1.1"),
        # About the session, not the message: never a bounce.
        (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad creds"), Temporary, 535, "5.7.8"),
        (aiosmtplib.SMTPHeloError(501, "5.5.2 bad helo"), Temporary, 501, "5.5.2"),
        (aiosmtplib.SMTPConnectResponseError(554, "no service"), Temporary, 554, None),
        (aiosmtplib.SMTPResponseException(554, "5.7.0 no TLS for you"), Temporary, 554, "5.7.0"),
        (aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line"), Temporary, -1, None),
        (aiosmtplib.SMTPConnectError("refused"), Temporary, None, None),
        (aiosmtplib.SMTPConnectTimeoutError("timed out"), Temporary, None, None),
        (aiosmtplib.SMTPServerDisconnected("gone"), Temporary, None, None),
        (aiosmtplib.SMTPReadTimeoutError("slow"), Temporary, None, None),
        (aiosmtplib.SMTPException("STARTTLS extension not supported"), Temporary, None, None),
        (ssl.SSLCertVerificationError("bad cert"), Temporary, None, None),
        (ConnectionRefusedError(111, "refused"), Temporary, None, None),
        (TimeoutError(), Temporary, None, None),
        (aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported"), Permanent, None, None),
        (ValueError("Address contains prohibited characters"), Permanent, None, None),
        (RuntimeError("surprise"), Temporary, None, None),
    ],
)
def test_classify_exception(
    exc: BaseException, kind: type[DeliveryError], code: int | None, enhanced: str | None
) -> None:
    err = classify_exception(exc)
    assert isinstance(err, kind)
    assert (err.code, err.enhanced) == (code, enhanced)
    assert err.message


def test_reply_errors_keep_the_relays_text() -> None:
    err = classify_exception(aiosmtplib.SMTPDataError(550, "5.1.1 <x@y.z>: unknown user"))
    assert err.message == "5.1.1 <x@y.z>: unknown user"
    assert SmtpReply.from_error(err) == SmtpReply(550, "5.1.1", "5.1.1 <x@y.z>: unknown user")


def test_delivery_errors_pass_through() -> None:
    err = Temporary("already classified", code=451)
    assert classify_exception(err) is err


def refusal(code: int, message: str, rcpt: str) -> aiosmtplib.SMTPRecipientRefused:
    return aiosmtplib.SMTPRecipientRefused(code, message, rcpt)


def test_all_recipients_refused_with_5xx_is_permanent() -> None:
    exc = aiosmtplib.SMTPRecipientsRefused(
        [refusal(550, "5.1.1 no such user", "a@x.y"), refusal(554, "5.7.1 denied", "b@x.y")]
    )
    err = classify_exception(exc)
    assert isinstance(err, RecipientsRefused) and isinstance(err, Permanent)
    assert (err.code, err.enhanced) == (550, "5.1.1")
    assert err.refused == {
        "a@x.y": SmtpReply(550, "5.1.1", "5.1.1 no such user"),
        "b@x.y": SmtpReply(554, "5.7.1", "5.7.1 denied"),
    }
    assert "a@x.y" in err.message and "b@x.y" in err.message
    assert is_hard_bounce(err.refused["a@x.y"]) and not is_hard_bounce(err.refused["b@x.y"])


def test_all_recipients_refused_with_any_4xx_is_temporary() -> None:
    exc = aiosmtplib.SMTPRecipientsRefused(
        [refusal(550, "5.1.1 no such user", "a@x.y"), refusal(450, "4.2.1 busy", "b@x.y")]
    )
    err = classify_exception(exc)
    assert isinstance(err, RecipientsDeferred) and isinstance(err, Temporary)
    assert (err.code, err.enhanced) == (450, "4.2.1")
    assert set(err.refused) == {"a@x.y", "b@x.y"}


@pytest.mark.parametrize(
    ("err", "hard"),
    [
        (Permanent("x", code=550, enhanced="5.1.1"), True),
        (Permanent("x", code=550, enhanced="5.1.10"), True),
        (Permanent("x", code=553, enhanced="5.1.3"), True),
        (Permanent("x", code=550, enhanced="5.7.1"), False),
        (Permanent("x", code=552, enhanced="5.2.2"), False),  # mailbox full: soft
        (Permanent("x", code=550, enhanced=None), False),
        (Temporary("x", code=450, enhanced="4.1.1"), False),
        (SmtpReply(550, "5.1.1", "x"), True),
        (SmtpReply(450, "4.1.1", "x"), False),
    ],
)
def test_is_hard_bounce(err: DeliveryError | SmtpReply, hard: bool) -> None:
    assert is_hard_bounce(err) is hard
