"""Request and response models: handlers validate with them; /openapi.json is built from them."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from typing import Annotated, Any, Literal

from annotated_types import MinLen
from pydantic import (
    AfterValidator,
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pipeline.suppressions import canonical_address
from pipeline.webhooks import EVENT_TYPES, ssrf
from web.addresses import bare, check_address

MAX_RECIPIENTS = 50
_CTL = re.compile(r"[\r\n\x00]")
# JSON can carry lone surrogates (`"\ud800"`): not Unicode text, and PostgreSQL cannot store them.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _address(value: Any) -> Any:
    return check_address(value) if isinstance(value, str) else value


Address = Annotated[str, BeforeValidator(_address)]
# The documented input is what clients may send: one address, or a list.
AddressList = Annotated[
    list[Address], BeforeValidator(_as_list, json_schema_input_type=str | list[str])
]
Recipients = Annotated[
    list[Address],
    BeforeValidator(_as_list, json_schema_input_type=str | Annotated[list[str], MinLen(1)]),
]


# The headers render() writes itself (Content-* too). Reply-To is not among them: as a header
# it is taken as the `reply_to` field.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version"}
)
# Patterns used with fullmatch (a `$` would let a trailing newline through).
# Header names are tokens (RFC 9110 tchar), within what RFC 5322 allows and a line can hold.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,76}")
_TAG_NAME = re.compile(r"[A-Za-z0-9_-]{1,256}")
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
# type/subtype with optional parameters (`text/calendar; method=REQUEST`), RFC 2045 tokens.
_MEDIA_TYPE = re.compile(
    rf'{_TOKEN}/{_TOKEN}(?:\s*;\s*{_TOKEN}=(?:{_TOKEN}|"(?:[ !#-\[\]-~]|\\[ -~])*"))*\s*'
)
# RFC 2392 content ids are msg-ids: printable ASCII without spaces or angle brackets.
_CONTENT_ID = re.compile(r"[!-;=?-~]{1,250}")
MAX_TAGS = 10
MAX_METADATA_BYTES = 4096
MAX_SCHEDULE_AHEAD = timedelta(days=30)


def _unicode(value: str) -> str:
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    return value


def _no_ctl(value: str) -> str:
    if _CTL.search(value):
        raise ValueError("must not contain CR, LF or NUL")
    return _unicode(value)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return _unicode(value)


SafeText = Annotated[str, AfterValidator(_no_ctl)]
"""Text that goes in a header: no CR, LF or NUL (nothing can start a header line)."""
BodyText = Annotated[str, AfterValidator(_no_nul)]
"""Free text that PostgreSQL must be able to store: no NUL, no lone surrogate."""


MAX_METADATA_DEPTH = 64


def _json_problem(value: Any) -> str | None:
    """Why a JSON value cannot be stored as jsonb (NUL or a lone surrogate in a string or key,
    NaN or Infinity) or nests deeper than MAX_METADATA_DEPTH (which would only exhaust the
    encoders' recursion), or None."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return f"nested at most {MAX_METADATA_DEPTH} levels deep"
        if isinstance(item, str):
            if "\x00" in item:
                return "strings must not contain NUL"
            if _SURROGATE.search(item):
                return "strings must be valid Unicode text (one holds a lone surrogate)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite (no NaN or Infinity)"
        elif isinstance(item, dict):
            stack.extend((k, depth) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None


def _reply_to_headers(headers: Any) -> list[tuple[str, Any]]:
    """The `Reply-To` entries (any case) of a raw `headers` object."""
    if not isinstance(headers, dict):
        return []
    return [(k, v) for k, v in headers.items() if isinstance(k, str) and k.lower() == "reply-to"]


def _address_list(value: str) -> list[str]:
    """The addresses of an address-list header value, each normalised like a `reply_to` entry;
    ValueError naming the first bad one."""
    pairs = getaddresses([value])
    if not pairs:
        raise ValueError("is not an address list")
    out = []
    for name, addr in pairs:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        out.append(check_address(f'"{quoted}" <{addr}>' if name else addr))
    return out


class AttachmentIn(BaseModel):
    """A file: base64 `content`; a `content_id` makes it inline (`cid:` in the HTML)."""

    model_config = ConfigDict(extra="forbid")

    filename: SafeText = Field(min_length=1, max_length=255)
    content: str = Field(description="The file's bytes, base64-encoded.")
    content_type: SafeText | None = Field(
        default=None, description="Guessed from the filename when absent."
    )
    content_id: SafeText | None = Field(default=None, max_length=255)

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        return value

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, value: str | None) -> str | None:
        if value is not None and not _MEDIA_TYPE.fullmatch(value):
            raise ValueError("not a media type like 'application/pdf'")
        return value

    @field_validator("content_id")
    @classmethod
    def _cid(cls, value: str | None) -> str | None:
        if value is not None and not _CONTENT_ID.fullmatch(
            value.strip().removeprefix("<").removesuffix(">")
        ):
            raise ValueError(
                "must be printable ASCII without spaces or angle brackets (`logo@example.com`)"
            )
        return value


SEND_EXAMPLE: dict[str, Any] = {
    "from_email": "Acme <hello@example.com>",
    "to": ["Ann Example <ann@example.org>"],
    "subject": "Your order has shipped",
    "body_text": "It is on its way.",
    "body_html": '<p>It is on its way.</p><img src="cid:logo@example.com">',
    "headers": {"X-Entity-Ref-ID": "order-42"},
    "attachments": [
        {"filename": "logo.png", "content": "iVBORw0KGgo=", "content_id": "logo@example.com"}
    ],
    "tags": {"campaign": "shipping"},
    "metadata": {"order_id": 42},
}
"""Shown in /docs, and sent as is by the schemathesis run in the tests."""


class SendEmail(BaseModel):
    """One email to accept. `to`, `cc`, `bcc` and `reply_to` take one address or a list."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"examples": [SEND_EXAMPLE]},
    )

    from_email: Address = Field(
        validation_alias=AliasChoices("from_email", "from"),
        description="Sender: `addr` or `Name <addr>`; `from` is accepted as an alias.",
    )
    to: Recipients = Field(min_length=1, description="One address or a list.")
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list, description="Only in the SMTP envelope.")
    reply_to: AddressList = Field(default_factory=list)
    subject: SafeText = Field(min_length=1, max_length=998)
    body_text: BodyText | None = None
    body_html: BodyText | None = None
    headers: dict[str, SafeText] = Field(
        default_factory=dict,
        description="Extra headers: names are tokens (letters, digits and !#$%&'*+-.^_`|~, "
        "at most 76), values have no CR, LF or NUL. Reserved ones (From, To, Cc, Bcc, "
        "Subject, Date, Message-ID, MIME-Version, Content-*) are refused; Reply-To is taken "
        "as `reply_to`.",
    )
    attachments: list[AttachmentIn] = Field(default_factory=list)
    tags: dict[str, str] = Field(
        default_factory=dict,
        description=f"At most {MAX_TAGS} pairs; names of letters, digits, _ and -; "
        "searchable with `?tag=name:value`.",
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Any JSON object up to 4 KiB, returned as given."
    )
    scheduled_at: AwareDatetime | None = Field(
        default=None, description="RFC 3339; in the future, at most 30 days ahead."
    )

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (a token of at most 76)")
            lower = name.lower()
            if lower in RESERVED_HEADERS or lower.startswith("content-"):
                raise ValueError(f"{name!r} is reserved; use the matching field")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        for name, tag_value in value.items():
            if not _TAG_NAME.fullmatch(name):
                raise ValueError(f"tag name {name!r}: letters, digits, _ and - only (1..256)")
            if (
                not 1 <= len(tag_value) <= 256
                or _CTL.search(tag_value)
                or _SURROGATE.search(tag_value)
            ):
                raise ValueError(
                    f"tag {name!r}: value must be 1..256 characters of text without CR/LF/NUL"
                )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        problem = _json_problem(value)
        if problem is not None:
            raise ValueError(problem)
        if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"at most {MAX_METADATA_BYTES} bytes of JSON")
        return value

    @field_validator("scheduled_at")
    @classmethod
    def _schedule(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        now = datetime.now(UTC)
        if value <= now:
            raise ValueError("must be in the future")
        if value > now + MAX_SCHEDULE_AHEAD:
            raise ValueError("must be at most 30 days ahead")
        return value.astimezone(UTC)

    @classmethod
    def cross_field_errors(cls, data: Any) -> list[dict[str, str]]:
        """Rules over several fields, checked on the raw body so they are reported together
        with the per-field errors."""
        if not isinstance(data, dict):
            return []
        errors = []
        if data.get("body_text") is None and data.get("body_html") is None:
            errors.append({"field": "body_text", "message": "body_text or body_html is required"})
        count = sum(
            len(v) if isinstance(v, list) else 1
            for k in ("to", "cc", "bcc")
            if (v := data.get(k)) is not None
        )
        if count > MAX_RECIPIENTS:
            errors.append(
                {
                    "field": "to",
                    "message": f"at most {MAX_RECIPIENTS} recipients in to, cc and bcc together",
                }
            )
        reply_to = _reply_to_headers(data.get("headers"))
        for name, value in reply_to:
            field = f"headers.{name}"
            if data.get("reply_to") or len(reply_to) > 1:
                errors.append({"field": field, "message": "give Reply-To once: here or reply_to"})
            elif isinstance(value, str) and not _CTL.search(value):  # else a per-field error
                try:
                    _address_list(value)
                except ValueError as exc:
                    errors.append({"field": field, "message": str(exc)})
        return errors

    @model_validator(mode="after")
    def _reply_to_header(self) -> SendEmail:
        """A `Reply-To` header becomes the `reply_to` field, so it is rendered (and encoded)
        like one; cross_field_errors reports what is wrong with it."""
        found = _reply_to_headers(self.headers)
        if len(found) == 1 and not self.reply_to:
            name, value = found[0]
            try:
                self.reply_to = _address_list(value)
            except ValueError:
                return self
            self.headers = {k: v for k, v in self.headers.items() if k != name}
        return self


class IdempotencyHeaders(BaseModel):
    """Request headers of the accepting endpoints (documented; checked by the handler)."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="1 to 256 printable characters. A repeat with the same key and body within "
        "24 h returns the first answer (with `Idempotent-Replayed: true`) and sends nothing; "
        "another body with the key, or a repeat while the first is in progress, is 409.",
    )


class EmailAccepted(BaseModel):
    id: str
    status: Literal["queued", "scheduled", "suppressed"]
    created_at: datetime


MAX_BATCH = 100


class BatchRequest(BaseModel):
    """Up to 100 emails, each validated and accepted on its own."""

    emails: list[SendEmail] = Field(min_length=1, max_length=MAX_BATCH)


class BatchItemAccepted(BaseModel):
    id: str
    status: Literal["queued", "scheduled", "suppressed"]


class BatchItemError(BaseModel):
    error: ProblemDetails


class BatchResult(BaseModel):
    """One result per email, in request order."""

    data: list[BatchItemAccepted | BatchItemError]


class SmtpResponse(BaseModel):
    code: int | None
    enhanced: str | None
    message: str


class Email(BaseModel):
    id: str
    status: str
    from_email: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    tags: dict[str, str]
    metadata: Any | None
    scheduled_at: datetime | None
    attempts: int
    last_response: SmtpResponse | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None


class EmailList(BaseModel):
    data: list[Email]
    has_more: bool
    next_cursor: str | None


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    after: str | None = Field(default=None, description="`next_cursor` of the previous page.")


EMAIL_STATUSES = (
    "scheduled",
    "queued",
    "sending",
    "deferred",
    "sent",
    "bounced",
    "failed",
    "suppressed",
    "canceled",
)


class EmailListQuery(ListQuery):
    status: Literal[EMAIL_STATUSES] | None = None  # type: ignore[valid-type]
    to: Address | None = Field(default=None, description="Any of to, cc and bcc.")
    tag: str | None = Field(default=None, description="`name:value`")
    since: AwareDatetime | None = Field(default=None, description="Created at or after (RFC 3339).")
    until: AwareDatetime | None = Field(default=None, description="Created before (RFC 3339).")

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None:
            name, sep, tag_value = value.partition(":")
            if not sep or not _TAG_NAME.fullmatch(name) or not tag_value:
                raise ValueError("use name:value")
            _no_ctl(tag_value)
        return value

    def tag_pair(self) -> tuple[str, str] | None:
        if self.tag is None:
            return None
        name, _, value = self.tag.partition(":")
        return name, value


class Event(BaseModel):
    id: str
    type: str
    created_at: datetime
    data: dict[str, Any]


class EventList(BaseModel):
    data: list[Event]


class FieldError(BaseModel):
    field: str
    message: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; `errors` names every bad field of a validation failure."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


def _suppression_address(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return canonical_address(bare(check_address(value)))


class SuppressionCreate(BaseModel):
    """An address to suppress: `addr` or `Name <addr>`; stored bare and lower-cased."""

    model_config = ConfigDict(extra="forbid")

    email: Annotated[str, BeforeValidator(_suppression_address)] = Field(
        description="The address to leave out of every envelope from now on."
    )


class Suppression(BaseModel):
    email: str
    reason: Literal["hard_bounce", "manual"]
    created_at: datetime
    source_email_id: str | None = Field(
        description="The email whose hard bounce put the address here; null when added by hand."
    )


class SuppressionList(BaseModel):
    data: list[Suppression]
    has_more: bool
    next_cursor: str | None


class DeadLetter(BaseModel):
    id: str
    email_id: str
    reason: str
    attempts: int
    last_response: SmtpResponse | None
    created_at: datetime
    replayed_at: datetime | None


class DeadLetterList(BaseModel):
    data: list[DeadLetter]
    has_more: bool
    next_cursor: str | None


def _webhook_url(value: str) -> str:
    try:  # the syntax only; the address rules are checked (with DNS) by the handler
        ssrf.parse_url(value, allow_private=True)
    except ssrf.UnsafeUrl as exc:
        raise ValueError(str(exc)) from None
    return value


class WebhookCreate(BaseModel):
    """An endpoint to deliver events to, signed with a secret shown once in the answer."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=ssrf.MAX_URL_LENGTH,
        description="https:// URL of a public host; plain http:// and private, loopback or "
        "link-local addresses only where `webhooks.allow_private` is true (development).",
    )
    events: list[Literal[EVENT_TYPES]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1, description="Event types to deliver; default: all of them."
    )
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _webhook_url(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


class WebhookUpdate(BaseModel):
    """What to change on an endpoint; a field left out stays as it is. `enabled: true` turns
    an endpoint disabled by a 410 or a 24 h failing streak back on."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None,
        max_length=ssrf.MAX_URL_LENGTH,
        description="As for creation: checked (DNS included) before it is saved.",
    )
    events: list[Literal[EVENT_TYPES]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1, description="Event types to deliver."
    )
    enabled: bool | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _webhook_url(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))


class Webhook(BaseModel):
    id: str
    url: str
    events: list[str]
    enabled: bool = Field(description="False once disabled (410 Gone, or failing for 24 h).")
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str = Field(
        description="whsec_…: the signing secret (Standard Webhooks); shown only this once."
    )


class WebhookSecretRotated(BaseModel):
    id: str
    secret: str = Field(description="whsec_…: the new signing secret, shown only this once.")
    previous_secret_expires_at: datetime = Field(
        description="Until then every request carries a second signature, by the old secret."
    )


class WebhookList(BaseModel):
    data: list[Webhook]
    has_more: bool
    next_cursor: str | None


class WebhookDelivery(BaseModel):
    id: str
    event_id: str = Field(description="Also the request's `webhook-id`.")
    event_type: str
    attempt: int = Field(description="1 for the first try of the event, then 2, 3, ...")
    status_code: int | None = Field(description="null when no HTTP answer came.")
    error: str | None = Field(description="null on a 2xx.")
    created_at: datetime


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDelivery]
    has_more: bool
    next_cursor: str | None
