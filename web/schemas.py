"""Request and response models: handlers validate with them; /openapi.json is built from them."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from pipeline.suppressions import canonical_address
from web.addresses import bare, check_address

MAX_RECIPIENTS = 50
_CTL = re.compile(r"[\r\n\x00]")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _address(value: Any) -> Any:
    return check_address(value) if isinstance(value, str) else value


Address = Annotated[str, BeforeValidator(_address)]
AddressList = Annotated[list[Address], BeforeValidator(_as_list)]


RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "reply-to"}
)
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name: printable, no colon
_TAG_NAME = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
MAX_TAGS = 10
MAX_METADATA_BYTES = 4096
MAX_SCHEDULE_AHEAD = timedelta(days=30)


def _no_ctl(value: str) -> str:
    if _CTL.search(value):
        raise ValueError("must not contain CR, LF or NUL")
    return value


SafeText = Annotated[str, AfterValidator(_no_ctl)]


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
        if value is not None and not _MEDIA_TYPE.match(value):
            raise ValueError("not a media type like 'application/pdf'")
        return value

    @field_validator("content_id")
    @classmethod
    def _cid(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip("<>") or re.search(r"[\s<>]", value.strip("<>"))):
            raise ValueError("must be a non-empty token without spaces or angle brackets")
        return value


class SendEmail(BaseModel):
    """One email to accept. `to`, `cc`, `bcc` and `reply_to` take one address or a list."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_email: Address = Field(
        validation_alias=AliasChoices("from_email", "from"),
        description="Sender: `addr` or `Name <addr>`; `from` is accepted as an alias.",
    )
    to: AddressList = Field(min_length=1, description="One address or a list.")
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list, description="Only in the SMTP envelope.")
    reply_to: AddressList = Field(default_factory=list)
    subject: SafeText = Field(min_length=1, max_length=998)
    body_text: str | None = None
    body_html: str | None = None
    headers: dict[str, SafeText] = Field(
        default_factory=dict,
        description="Extra headers. Reserved ones (From, To, Cc, Bcc, Subject, Date, "
        "Message-ID, MIME-Version, Reply-To, Content-*) are refused.",
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
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
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
            if not _TAG_NAME.match(name):
                raise ValueError(f"tag name {name!r}: letters, digits, _ and - only (1..256)")
            if not 1 <= len(tag_value) <= 256 or _CTL.search(tag_value):
                raise ValueError(f"tag {name!r}: value must be 1..256 characters without CR/LF/NUL")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value).encode()) > MAX_METADATA_BYTES:
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
        return errors


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
            if not sep or not _TAG_NAME.match(name) or not tag_value:
                raise ValueError("use name:value")
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
