"""Suppression rules: which address a suppression names, and which recipients a bounce suppresses.

An address is kept in one canonical form, so that the API, acceptance and hard bounces agree on
it whatever spelling reached them: the bare address, domain in Unicode (an IDNA `xn--` domain
is decoded), all lower-cased (no mailbox provider treats case as significant in practice).

What goes on the list (DESIGN.md, "Delivery guarantees"): a permanent refusal with enhanced
status 5.1.x (bad mailbox or domain) suppresses the refused recipients; other 5xx bounce without
suppressing; 4xx never suppress. Pure functions, tested without I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from email_validator import EmailNotValidError, validate_email

from pipeline.errors import DeliveryError
from pipeline.mail.classify import RecipientsDeferred, RecipientsRefused, SmtpReply, is_hard_bounce

__all__ = [
    "canonical_address",
    "hard_bounced",
    "permanently_refused",
    "recipients_to_suppress",
    "refused_to_suppress",
]


_PLAIN_ASCII = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
"""An unquoted ASCII address: validated or not, its canonical form is itself lower-cased."""


def canonical_address(address: str) -> str:
    """The form a suppression is stored and looked up in (`User@Bücher.example` and
    `user@xn--bcher-kva.example` are the same entry). Something that is not an address at all
    is only trimmed and lower-cased: it can never match, but it is not an error here.

    A plain ASCII address without an IDNA label skips the validator (it runs on every
    recipient of every accepted email): valid, it normalizes to itself with a lower-case
    domain; invalid, it is lower-cased as it is. Lower-cased whole, both are `text.lower()`."""
    text = address.strip()
    if _PLAIN_ASCII.fullmatch(text) and "xn--" not in text.lower():
        return text.lower()
    try:
        valid = validate_email(text, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return text.lower()
    return valid.normalized.lower()


def _canonical_unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(canonical_address(a) for a in addresses))


def hard_bounced(refused: Mapping[str, SmtpReply]) -> list[str]:
    """The recipients (as given) whose own refusal is a hard bounce (5.1.x)."""
    return [addr for addr, reply in refused.items() if is_hard_bounce(reply)]


def permanently_refused(refused: Mapping[str, SmtpReply]) -> list[str]:
    """The recipients (as given) refused with a 5xx: no later attempt will reach them."""
    return [addr for addr, r in refused.items() if r.code is not None and 500 <= r.code <= 599]


def recipients_to_suppress(err: DeliveryError, envelope: Sequence[str]) -> list[str]:
    """Canonical addresses a failed attempt puts on the suppression list.

    Refusals at RCPT name their recipients, so only those refused with 5.1.x are suppressed
    (also when others were only deferred). A 5.1.x to the message as a whole (at DATA, or at
    MAIL) cannot tell recipients apart, so every one of the envelope is suppressed.
    """
    if isinstance(err, RecipientsRefused | RecipientsDeferred):
        return _canonical_unique(hard_bounced(err.refused))
    if is_hard_bounce(err):
        return _canonical_unique(envelope)
    return []


def refused_to_suppress(refused: Mapping[str, SmtpReply]) -> list[str]:
    """Canonical addresses of the recipients refused with 5.1.x while others got the email."""
    return _canonical_unique(hard_bounced(refused))
