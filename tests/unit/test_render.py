"""render(): MIME layout, encodings, limits and the refusal of header injection."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mail.render import (
    Attachment,
    OutgoingEmail,
    bare_address,
    envelope_recipients,
    envelope_sender,
    new_message_id,
    render,
)

DATE = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


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


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text(part: object) -> str:
    """A text part's content with the wire's CRLF line ends made LF."""
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_text_only() -> None:
    raw = render(make(body_text="Hello there\nsecond line"))
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain"
    assert text(msg) == "Hello there\nsecond line\n"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<abc123@example.com>"
    assert msg["Date"].datetime == DATE
    assert msg["From"].addresses[0].addr_spec == "sender@example.com"
    assert msg["From"].addresses[0].display_name == "Sender"


def test_crlf_everywhere() -> None:
    raw = render(make(body_text="a\nb\r\nc\rd"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_html_only() -> None:
    msg = parse(render(make(body_text=None, body_html="<p>Hi</p>")))
    assert msg.get_content_type() == "text/html"
    assert text(msg) == "<p>Hi</p>\n"


def test_text_and_html_are_alternatives() -> None:
    msg = parse(render(make(body_text="Hi", body_html="<p>Hi</p>")))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert text(msg.get_body(("plain",))) == "Hi\n"
    assert text(msg.get_body(("html",))) == "<p>Hi</p>\n"


def test_no_body_is_refused() -> None:
    with pytest.raises(ValueError, match="body"):
        render(make(body_text=None, body_html=None))


def test_attachments_come_back_byte_identical() -> None:
    blob = bytes(range(256)) * 300 + b"\r\n.\r\n\x00"
    text = b"line one\nline two\r\n"
    msg = parse(
        render(
            make(
                body_html="<p>see attached</p>",
                attachments=(
                    Attachment("data.bin", blob, "application/octet-stream", None),
                    Attachment("notes.txt", text, None, None),
                    Attachment("résumé.pdf", b"%PDF-1.4", "application/pdf", None),
                ),
            )
        )
    )
    assert msg.get_content_type() == "multipart/mixed"
    body, *files = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [(f.get_filename(), f.get_content_type()) for f in files] == [
        ("data.bin", "application/octet-stream"),
        ("notes.txt", "text/plain"),  # guessed from the name
        ("résumé.pdf", "application/pdf"),
    ]
    assert [f.get_payload(decode=True) for f in files] == [blob, text, b"%PDF-1.4"]
    assert all(f.get_content_disposition() == "attachment" for f in files)


def test_inline_parts_are_related_to_the_html() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    msg = parse(
        render(
            make(
                body_text="logo",
                body_html='<img src="cid:logo">',
                attachments=(
                    Attachment("logo.png", png, "image/png", "logo"),
                    Attachment("terms.pdf", b"pdf", "application/pdf", None),
                ),
            )
        )
    )
    assert msg.get_content_type() == "multipart/mixed"
    alternative, pdf = msg.iter_parts()
    assert pdf.get_filename() == "terms.pdf"
    plain, related = alternative.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html, image = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == png


def test_non_ascii_subject_and_names_round_trip() -> None:
    subject = "Grüße aus Köln, 日本語のテスト " * 4
    raw = render(
        make(
            from_email="Jöhn Dœ <john@example.com>",
            to=('"Doe, Jane" <jane@example.org>', "Zoë Ñandú <zoe@example.org>"),
            cc=("Ünïcödé <u@example.org>",),
            reply_to=("Réponse <reply@example.com>",),
            subject=subject,
        )
    )
    assert raw.isascii()
    msg = parse(raw)
    assert str(msg["Subject"]) == subject
    assert msg["From"].addresses[0].display_name == "Jöhn Dœ"
    assert [a.display_name for a in msg["To"].addresses] == ["Doe, Jane", "Zoë Ñandú"]
    assert [a.addr_spec for a in msg["To"].addresses] == ["jane@example.org", "zoe@example.org"]
    assert msg["Cc"].addresses[0].display_name == "Ünïcödé"
    assert msg["Reply-To"].addresses[0].addr_spec == "reply@example.com"


def test_long_non_ascii_name_is_valid_rfc2047() -> None:
    # Longer than one encoded word holds. The stdlib's modern parser wrongly puts a space
    # between adjacent encoded words in a display name, so decode with the RFC 2047 decoder.
    name = "株式会社テストカンパニー日本支社・東京本店"
    raw = render(make(to=(f"{name} <cjk@example.jp>",)))
    head = raw.split(b"\r\n\r\n", 1)[0].decode() + "\r\n"
    found = re.search(r"^To: (.*?)\r\n(?! )", head, re.S | re.M)
    assert found is not None and found.group(1).count("=?utf-8?") > 1
    assert str(make_header(decode_header(found.group(1)))) == f"{name} <cjk@example.jp>"


def test_bcc_never_in_headers() -> None:
    raw = render(make(bcc=("hidden@example.net", "Secret <secret@example.net>")))
    assert b"hidden@example.net" not in raw
    assert b"secret@example.net" not in raw
    assert parse(raw)["Bcc"] is None


def test_lines_within_rfc5322_limits() -> None:
    raw = render(
        make(
            subject="word " * 150 + "x" * 200,
            body_text="a" * 5000 + "\n" + "ü " * 2000,
            body_html="<p>" + "b" * 5000 + "</p>",
            headers={
                "X-Long": "y" * 1500,
                "List-Unsubscribe": "<https://example.com/u/" + "t" * 150 + ">",
            },
            to=tuple(f"Recipient Number {i} <r{i}@example.org>" for i in range(50)),
            attachments=(Attachment("big.bin", bytes(10_000), None, None),),
        )
    )
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    headers = header_lines(raw)
    # 78 is a SHOULD: only an unbreakable ASCII token passes it (kept readable, as a URL must).
    assert [h for h in headers if len(h) > 78] == [
        b" " + b"x" * 200,
        b"List-Unsubscribe: <https://example.com/u/" + b"t" * 150 + b">",
    ]
    msg = parse(raw)
    assert str(msg["Subject"]) == "word " * 150 + "x" * 200
    assert str(msg["X-Long"]) == "y" * 1500
    assert str(msg["List-Unsubscribe"]) == "<https://example.com/u/" + "t" * 150 + ">"
    assert len(msg["To"].addresses) == 50
    assert text(msg.get_body(("plain",))).startswith("a" * 5000)


def test_client_headers_added_as_given() -> None:
    msg = parse(render(make(headers={"X-Campaign": "spring", "X-Note": "café ☕"})))
    assert msg["X-Campaign"] == "spring"
    assert str(msg["X-Note"]) == "café ☕"


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\x00b", "a\r\nBcc: x@evil.example"])
@pytest.mark.parametrize(
    "field",
    ["subject", "header", "from_email", "to", "cc", "bcc", "reply_to", "filename", "message_id"],
)
def test_cr_lf_nul_in_a_header_is_refused(field: str, bad: str) -> None:
    kwargs: dict[str, object]
    if field == "header":
        kwargs = {"headers": {"X-Inject": bad}}
    elif field == "filename":
        kwargs = {"attachments": (Attachment(bad, b"x", None, None),)}
    elif field in ("to", "cc", "bcc", "reply_to"):
        kwargs = {field: (f"{bad} <x@example.com>",)}
    else:
        kwargs = {field: bad}
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        render(make(**kwargs))


@pytest.mark.parametrize("name", ["Bcc", "to", "Content-Type", "MIME-Version", "Message-ID"])
def test_reserved_client_headers_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="set by mailpipe"):
        render(make(headers={name: "x"}))


def test_bad_header_name_is_refused() -> None:
    with pytest.raises(ValueError, match="header name"):
        render(make(headers={"X Bad:": "x"}))


def test_unicode_line_separators_become_spaces() -> None:
    msg = parse(render(make(subject="one\u2028two\x0bthree")))
    assert str(msg["Subject"]) == "one two three"


def test_idna_domains_are_encoded() -> None:
    e = make(to=("Ünï <user@bücher.example>",))
    assert parse(render(e))["To"].addresses[0].domain == "xn--bcher-kva.example"
    assert envelope_recipients(e) == ["user@xn--bcher-kva.example"]


def test_envelope_recipients_dedupe_case_insensitively_in_order() -> None:
    e = make(
        to=("A <a@example.com>", "b@example.com"),
        cc=("A@Example.com", "c@example.com"),
        bcc=("B@EXAMPLE.COM", "d@example.com", "Dee <d@example.com>"),
    )
    assert envelope_recipients(e) == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
    ]


def test_envelope_sender() -> None:
    assert envelope_sender(make(from_email="Héllo <me@exämple.com>")) == "me@xn--exmple-cua.com"


@pytest.mark.parametrize(
    ("given", "bare"),
    [
        ("a@example.com", "a@example.com"),
        ("  a@example.com ", "a@example.com"),
        ("Name <a@example.com>", "a@example.com"),
        ('"Doe, J" <a@example.com>', "a@example.com"),
        ("Jöhn <A@Example.com>", "A@Example.com"),
    ],
)
def test_bare_address(given: str, bare: str) -> None:
    assert bare_address(given) == bare


def test_new_message_id() -> None:
    a, b = new_message_id("example.com"), new_message_id("Sender <x@Exämple.com>")
    assert a.startswith("<") and a.endswith("@example.com>")
    assert b.endswith("@xn--exmple-cua.com>")
    assert a != new_message_id("example.com")
    msg = parse(render(make(message_id=a)))
    assert msg["Message-ID"] == a


def test_naive_date_is_utc() -> None:
    msg = parse(render(make(date=datetime(2026, 1, 2, 3, 4, 5))))
    assert msg["Date"].datetime == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_bcc_only_email_has_no_to_header() -> None:
    raw = render(make(to=(), bcc=("hidden@example.net",)))
    assert parse(raw)["To"] is None
    assert b"hidden" not in raw


# Printable text: controls and Unicode line separators are made spaces (tested above).
_PRINTABLE = st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="\x85\u2028\u2029"
)


@settings(max_examples=300, deadline=None, database=None)  # no .hypothesis/ in the tree
@given(
    subject=st.text(_PRINTABLE, min_size=1, max_size=200),
    name=st.text(_PRINTABLE, max_size=30).filter(lambda n: not set(n) & set('"\\<>')),
)
def test_any_subject_and_short_name_round_trip(subject: str, name: str) -> None:
    raw = render(make(subject=subject, from_email=f"{name} <a@example.com>"))
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    msg = parse(raw)
    # Folding whitespace at the very start or end of a header is not significant.
    assert str(msg["Subject"]).strip(" \t") == subject.strip(" \t")
    if len(name.encode()) <= 40:  # one encoded word (see test_long_non_ascii_name_...)
        assert msg["From"].addresses[0].display_name == " ".join(name.split())
