"""Request and response models: handlers validate with them; /openapi.json is built from them."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from web.addresses import check_address

MAX_RECIPIENTS = 50
_CTL = re.compile(r"[\r\n\x00]")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _address(value: Any) -> Any:
    return check_address(value) if isinstance(value, str) else value


Address = Annotated[str, BeforeValidator(_address)]
AddressList = Annotated[list[Address], BeforeValidator(_as_list)]


class SendEmail(BaseModel):
    """One email to accept. `to`, `cc`, `bcc` take one address or a list."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_email: Address = Field(
        validation_alias=AliasChoices("from_email", "from"),
        description="Sender: `addr` or `Name <addr>`; `from` is accepted as an alias.",
    )
    to: AddressList = Field(min_length=1, description="One address or a list.")
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list)
    subject: str = Field(min_length=1, max_length=998)
    body_text: str | None = None
    body_html: str | None = None

    @field_validator("subject")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if _CTL.search(value):
            raise ValueError("must not contain CR, LF or NUL")
        return value

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
