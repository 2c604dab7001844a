"""render()'s fast path (no attachment) gives byte for byte what the email package gives."""

from __future__ import annotations

import email.generator
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.mail import render as render_module
from pipeline.mail.render import Attachment, OutgoingEmail, render

DATE = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
TOKEN = 123456789
BOUNDARY = f"==============={TOKEN:019d}=="


@pytest.fixture(autouse=True)
def fixed_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator's boundary comes from random.randrange: fixed, both paths agree."""
    monkeypatch.setattr(email.generator.random, "randrange", lambda _n: TOKEN)


def make(**kwargs: object) -> OutgoingEmail:
    fields: dict[str, object] = {
        "from_email": "Sender <sender@example.com>",
        "to": ("rcpt@example.org",),
        "subject": "Hello",
        "body_text": "Hello there",
        "message_id": "<abc123@example.com>",
        "date": DATE,
    }
    fields.update(kwargs)
    return OutgoingEmail(**fields)  # type: ignore[arg-type]


def both(message: OutgoingEmail) -> tuple[bytes, bytes]:
    """(fast path, general path) renders of `message`."""
    fast = render(message)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(render_module, "_encode_text", None)
        general = render(message)
    return fast, general


@pytest.mark.parametrize(
    "bodies",
    [
        {"body_text": "Hello there"},
        {"body_text": None, "body_html": "<p>Hi</p>"},
        {"body_text": "Hi", "body_html": "<p>Hi</p>"},
        {"body_text": "", "body_html": ""},
        {"body_text": "a\nb\r\nc\rd\n\n"},
        {"body_text": "é" * 300, "body_html": "<p>" + "x" * 2000 + "</p>"},
        {"body_text": "\n".join(["line"] * 30) + "ü"},
        {"body_text": "— Ünïcödé —\n" * 12, "body_html": "<p>ÿ</p>\n" * 3},
        {"body_text": f"--{BOUNDARY}\n--{BOUNDARY}--\n", "body_html": f"--{BOUNDARY}.0"},
        {"body_text": "From the start\n.\n..\nend", "body_html": None},
    ],
)
def test_the_common_shapes_match(bodies: dict[str, str | None]) -> None:
    fast, general = both(make(**bodies))
    assert fast == general


def test_headers_of_every_kind_match() -> None:
    message = make(
        from_email='"Ünïcode, Sender" <sender@bücher.example>',
        to=("a@example.org", "Bob Example <bob@example.org>", "Zoë <zoe@example.org>"),
        cc=("c@example.org",),
        bcc=("hidden@example.org",),
        reply_to=("Support <support@example.com>",),
        subject="A long subject " * 12 + "with ünïcode at the end",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://example.com/u?id=1>"},
        body_html="<p>hi</p>",
    )
    fast, general = both(message)
    assert fast == general


def test_attachments_take_the_general_path() -> None:
    message = make(attachments=(Attachment("a.txt", b"hello", "text/plain"),))
    fast, general = both(message)
    assert fast == general


_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=400
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(st.none(), _text),
    html=st.one_of(st.none(), _text),
    subject=st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"),
        min_size=1,
        max_size=120,
    ),
)
def test_any_bodies_match(text: str | None, html: str | None, subject: str) -> None:
    if text is None and html is None:
        text = ""
    fast, general = both(make(body_text=text, body_html=html, subject=subject))
    assert fast == general
