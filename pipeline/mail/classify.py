"""Turn SMTP outcomes into typed errors: `Temporary` is retried, `Permanent` bounces.

The sender branches on the error's type, never on reply text. The rule (DESIGN.md, "Delivery
guarantees"): 4xx, connection trouble and timeouts are temporary; 5xx about the message or its
recipients is permanent; an enhanced status 5.1.x (bad mailbox or domain) is a hard bounce
whose recipients go on the suppression list.

Refusals that are about the session rather than the message (authentication, EHLO, the
greeting, STARTTLS) are temporary even when 5xx: bouncing an email because the relay credentials are
wrong would lose it, while retrying ends as a replayable dead letter once the operator fixes
the configuration.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import aiosmtplib

from pipeline.errors import DeliveryError, Permanent, Temporary

__all__ = [
    "RecipientsDeferred",
    "RecipientsRefused",
    "SmtpReply",
    "classify_exception",
    "is_hard_bounce",
    "parse_enhanced",
]

# RFC 3463: class "." subject "." detail, at the start of the reply text.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def parse_enhanced(code: int | None, message: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of `message` ("5.1.1"), or None.

    Its class must agree with the reply code's first digit (RFC 2034); a mismatch means the
    text only happens to start with something that looks like one.
    """
    m = _ENHANCED.match(message.lstrip())
    if m is None:
        return None
    if code is not None and str(code)[:1] != m.group(1):
        return None
    return m.group(0)


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One SMTP reply as recorded in events and `last_response` (code is None when the
    failure had no reply, e.g. a refused connection)."""

    code: int | None
    enhanced: str | None
    message: str

    @classmethod
    def parse(cls, code: int | None, message: str) -> SmtpReply:
        """A reply with its enhanced code extracted from the text."""
        return cls(code, parse_enhanced(code, message), message)

    @classmethod
    def from_error(cls, err: DeliveryError) -> SmtpReply:
        return cls(err.code, err.enhanced, err.message)

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "enhanced": self.enhanced, "message": self.message}


class _EveryRecipientRefused(DeliveryError):
    """Every recipient was refused at RCPT; `refused` has each one's reply."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        refused: Mapping[str, SmtpReply] = MappingProxyType({}),
    ):
        super().__init__(message, code=code, enhanced=enhanced)
        self.refused = refused


class RecipientsRefused(_EveryRecipientRefused, Permanent):
    """Every recipient was refused at RCPT, all with 5xx; `refused` has each one's reply."""


class RecipientsDeferred(_EveryRecipientRefused, Temporary):
    """Every recipient was refused at RCPT, at least one with 4xx, so the whole email is
    worth another attempt; `refused` has each one's reply."""


# Replies about this message (MAIL FROM, RCPT TO, DATA). Every other reply (greeting, EHLO,
# STARTTLS, AUTH, RSET, a malformed reply) is about the session and never bounces the email.
_MESSAGE_REFUSALS = (
    aiosmtplib.SMTPSenderRefused,
    aiosmtplib.SMTPRecipientRefused,
    aiosmtplib.SMTPDataError,
)


def classify_exception(exc: BaseException) -> DeliveryError:
    """The `Temporary` or `Permanent` error an SMTP attempt's exception stands for.

    Anything unrecognised is temporary: a retry that fails again ends as a visible, replayable
    dead letter, while a wrong permanent verdict would silently drop the email.
    """
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return _all_refused(exc)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # The message is the relay's text as given, so it can be shown as `last_response`.
        reply = SmtpReply.parse(exc.code, exc.message)
        if 500 <= exc.code <= 599 and isinstance(exc, _MESSAGE_REFUSALS):
            return Permanent(reply.message, code=reply.code, enhanced=reply.enhanced)
        # 4xx; a session refusal; a malformed reply (aiosmtplib's code -1).
        return Temporary(reply.message, code=reply.code, enhanced=reply.enhanced)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # e.g. SMTPUTF8 needed but not offered: the relay will never take this message.
        return Permanent(f"relay cannot take this message: {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Temporary(f"timed out: {_text(exc)}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return Temporary(f"relay disconnected: {_text(exc)}")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return Temporary(f"cannot connect to relay: {_text(exc)}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return Temporary(f"TLS failed: {_text(exc)}")
    if isinstance(exc, OSError):
        return Temporary(f"network error: {_text(exc)}")
    if isinstance(exc, aiosmtplib.SMTPException):
        # STARTTLS or AUTH not offered, and other session-level trouble.
        return Temporary(f"SMTP error: {_text(exc)}")
    if isinstance(exc, UnicodeError | ValueError):
        # aiosmtplib refuses an address it cannot put on the wire safely.
        return Permanent(f"message cannot be sent: {_text(exc)}")
    return Temporary(f"unexpected error: {_text(exc)}")


def is_hard_bounce(err: DeliveryError | SmtpReply) -> bool:
    """True for a permanent failure with enhanced status 5.1.x (bad mailbox, bad domain):
    the recipient will never accept mail and is suppressed. Every other 5xx is a soft bounce
    (policy, content, size, a full mailbox): bounced, but not suppressed."""
    if isinstance(err, DeliveryError) and not isinstance(err, Permanent):
        return False
    return err.enhanced is not None and err.enhanced.startswith("5.1.")


def _all_refused(exc: aiosmtplib.SMTPRecipientsRefused) -> DeliveryError:
    refused = {r.recipient: SmtpReply.parse(r.code, r.message) for r in exc.recipients}
    text = "all recipients refused: " + "; ".join(
        f"{addr}: {reply.code} {reply.message}" for addr, reply in refused.items()
    )
    frozen = MappingProxyType(refused)
    temporary = [r for r in refused.values() if r.code is None or not 500 <= r.code <= 599]
    if temporary or not refused:
        first = temporary[0] if temporary else SmtpReply(None, None, "")
        return RecipientsDeferred(text, code=first.code, enhanced=first.enhanced, refused=frozen)
    first = next(iter(refused.values()))
    return RecipientsRefused(text, code=first.code, enhanced=first.enhanced, refused=frozen)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
