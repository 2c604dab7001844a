"""The send API's validation and rendering under hostile input (hypothesis).

Every string a client controls (subject, display names, addresses, header names and values,
filenames, content types and ids, tags, metadata, bodies) gets CR, LF, NUL, Unicode line
separators, lone surrogates and other odd characters. The property: `parse()` answers a 422
naming fields, or the email goes the way the API sends it (new_email → stored JSON → the
sender's render input → render) and comes out a message whose header block holds exactly the
header lines mailpipe writes, each within RFC 5322's limits; and everything stored is text
PostgreSQL can hold (valid UTF-8, no NUL).
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pipeline.mail.render import render
from pipeline.roles.sender import outgoing
from pipeline.store import queries
from web.problems import Problem
from web.routes.emails import new_email
from web.schemas import SendEmail
from web.validation import parse

BASE: dict[str, Any] = {
    "from_email": "Sender <sender@example.com>",
    "to": "rcpt@example.org",
    "subject": "Hello",
    "body_text": "Hi",
}

# What an attacker reaches for: line breaks of every kind, NUL, other controls, header syntax,
# RFC 2047 look-alikes, lone surrogates, invisible and astral characters.
NASTY = [
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\r\n\r\n",
    "\r\nBcc: victim@evil.test",
    "\nX-Injected: yes",
    "\u2028",
    "\u2029",
    "\x85",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\t",
    " ",
    ":",
    ";",
    ",",
    "<",
    ">",
    '"',
    "\\",
    "=?utf-8?q?X-Injected:_yes?=",
    "\ud800",
    "\udfff",
    "\u200b",
    "\ufeff",
    "\U0001f4e7",
    "é",
    "Ü",
    "日本",
    "\u0301",
    "\x80",
]
nasty_text = st.lists(
    st.one_of(st.sampled_from(NASTY), st.text(max_size=4)), min_size=1, max_size=6
).map("".join)

HEADER_FIELDS = [
    "subject",
    "from_name",
    "from_addr",
    "to_name",
    "to_addr",
    "cc",
    "bcc",
    "reply_to",
    "header_name",
    "header_value",
    "filename",
    "content_type",
    "content_id",
    "tag_name",
    "tag_value",
]
"""Fields whose text ends up in a header line (or a tag): no CR, LF or NUL."""
FIELDS = [*HEADER_FIELDS, "metadata", "body_text", "body_html"]


def with_field(field: str, evil: str) -> dict[str, Any]:
    """A valid email with `evil` put where `field` goes."""
    data = dict(BASE)
    attachment = {"filename": "a.txt", "content": base64.b64encode(b"file").decode()}
    match field:
        case "subject":
            data["subject"] = evil
        case "from_name":
            data["from_email"] = f"{evil} <sender@example.com>"
        case "from_addr":
            data["from_email"] = f"send{evil}er@example.com"
        case "to_name":
            data["to"] = [f'"{evil}" <a@example.org>', f"{evil} <b@example.org>"]
        case "to_addr":
            data["to"] = f"a{evil}@example.org"
        case "cc":
            data["cc"] = f"{evil} <c@example.org>"
        case "bcc":
            data["bcc"] = [f"{evil}@example.org"]
        case "reply_to":
            data["reply_to"] = f"{evil} <r@example.org>"
        case "header_name":
            data["headers"] = {f"X-{evil}": "v"}
        case "header_value":
            data["headers"] = {"X-Custom": evil, "List-Unsubscribe": f"<https://u.test/{evil}>"}
        case "filename":
            data["attachments"] = [{**attachment, "filename": evil}]
        case "content_type":
            data["attachments"] = [{**attachment, "content_type": evil}]
        case "content_id":
            data["body_html"] = f'<img src="cid:{evil}">'
            data["attachments"] = [{**attachment, "filename": "a.png", "content_id": evil}]
        case "tag_name":
            data["tags"] = {evil: "v"}
        case "tag_value":
            data["tags"] = {"t": evil}
        case "metadata":
            data["metadata"] = {evil: evil, "nested": [evil, {"k": evil}]}
        case "body_text":
            data["body_text"] = evil
        case "body_html":
            data["body_html"] = evil
        case _:
            raise AssertionError(field)
    return data


# Header names render() may write at the top level and in a MIME part.
TOP_HEADERS = {
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}
PART_HEADERS = {
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "mime-version",
}


def claimed_from(data: SendEmail) -> queries.Claimed:
    """What the sender would claim for this request, the content through a JSON round trip as
    through PostgreSQL's jsonb."""
    new = new_email("acc_test", data)
    stored = json.dumps(new.content)  # what psycopg's Jsonb sends
    return queries.Claimed(
        id=new.id,
        account_id=new.account_id,
        from_email=new.from_email,
        to_addrs=list(new.to),
        cc_addrs=list(new.cc),
        bcc_addrs=list(new.bcc),
        reply_to=list(new.reply_to),
        envelope_to=list(new.envelope_to),
        subject=new.subject,
        content=json.loads(stored),
        raw=None,
        message_id=new.message_id,
        attempts=1,
        created_at=datetime.now(UTC),
    )


def assert_storable(new: queries.NewEmail) -> None:
    """PostgreSQL refuses NUL in text and jsonb, and text that is not valid UTF-8 (a lone
    surrogate cannot be encoded): an accepted email must never hit either (that is a 500)."""
    strings = [
        new.from_email,
        new.subject,
        new.message_id,
        *new.to,
        *new.cc,
        *new.bcc,
        *new.reply_to,
        *new.envelope_to,
        *new.recipients,
    ]
    for value in strings:
        assert "\x00" not in value
        value.encode("utf-8")
    # What `?to=` searches: bare and lower-cased, whatever the display names.
    assert all("<" not in r and r == r.lower() for r in new.recipients), new.recipients
    for doc in (new.content, new.tags, new.metadata):
        text = json.dumps(doc, allow_nan=False, ensure_ascii=False)
        assert "\x00" not in text
        text.encode("utf-8")  # fails on a lone surrogate


def header_block(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def names_of(lines: list[bytes]) -> list[str]:
    """The field names of a header block (continuation lines belong to the line above)."""
    names = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        assert colon, f"a header line that is neither a field nor a continuation: {line!r}"
        names.append(name.decode("ascii").lower())
    return names


def assert_safe_message(raw: bytes, data: SendEmail) -> None:
    # CRLF only, 7-bit, lines within the hard limit.
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert b"\x00" not in raw
    assert raw.isascii()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))

    # Exactly the header lines mailpipe writes: its own plus the client's, each once.
    expected = TOP_HEADERS | {name.lower() for name in data.headers}
    top = names_of(header_block(raw))
    assert set(top) <= expected, set(top) - expected
    assert top.count("subject") == 1 and top.count("from") == 1
    assert "bcc" not in top
    assert len(top) == len(set(top)) + (len(data.headers) - len({n.lower() for n in data.headers}))

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        if part is msg:
            continue
        part_names = [k.lower() for k in part.keys()]
        assert set(part_names) <= PART_HEADERS, set(part_names) - PART_HEADERS
        assert len(part_names) == len(set(part_names))
    # Nothing ends the header block early: the first blank line is followed by the body the
    # structure announces.
    assert msg.defects == [] or all("Boundary" not in type(d).__name__ for d in msg.defects)


def check(data: dict[str, Any]) -> SendEmail | None:
    """The property for one request body; the parsed model when it was accepted."""
    try:
        parsed = parse(SendEmail, data)
    except Problem as problem:
        assert problem.status == 422
        assert problem.errors, "a 422 must name the bad fields"
        assert all(e["field"] and e["message"] for e in problem.errors)
        json.dumps(problem.body())  # the answer itself can be sent
        return None
    new = new_email("acc_test", parsed)
    assert_storable(new)
    raw = render(outgoing(claimed_from(parsed)))  # a ValueError here would bounce a 202
    assert_safe_message(raw, parsed)
    return parsed


@pytest.mark.parametrize("field", FIELDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evil=nasty_text)
@example(evil="\r\nBcc: victim@evil.test")
@example(evil="\x00")
@example(evil="\ud800")
@example(evil="\u2028X-Injected: yes")
def test_hostile_strings_are_refused_or_rendered_safely(field: str, evil: str) -> None:
    check(with_field(field, evil))


@pytest.mark.parametrize("field", HEADER_FIELDS)
@pytest.mark.parametrize("ctl", ["\r", "\n", "\x00", "\r\n"])
def test_cr_lf_nul_in_any_header_field_is_a_422_naming_it(field: str, ctl: str) -> None:
    with pytest.raises(Problem) as caught:
        parse(SendEmail, with_field(field, f"a{ctl}b"))
    problem = caught.value
    assert problem.status == 422
    prefix = {
        "from_name": "from_email",
        "from_addr": "from_email",
        "to_name": "to",
        "to_addr": "to",
        "header_name": "headers",
        "header_value": "headers",
        "filename": "attachments[0].filename",
        "content_type": "attachments[0].content_type",
        "content_id": "attachments[0].content_id",
        "tag_name": "tags",
        "tag_value": "tags",
    }.get(field, field)
    assert problem.errors is not None
    assert any(e["field"].startswith(prefix) for e in problem.errors), problem.errors


@pytest.mark.parametrize("field", ["body_text", "body_html", "metadata", "tag_value", "to_name"])
@pytest.mark.parametrize("bad", ["\x00", "\ud800", "\udc00x"])
def test_text_postgresql_cannot_store_is_a_422(field: str, bad: str) -> None:
    """NUL and lone surrogates (JSON allows `\\u0000` and `\\ud800`) would fail the insert."""
    with pytest.raises(Problem) as caught:
        parse(SendEmail, with_field(field, f"a{bad}b"))
    assert caught.value.status == 422


def test_non_finite_numbers_in_metadata_are_a_422() -> None:
    with pytest.raises(Problem) as caught:
        parse(SendEmail, {**BASE, "metadata": {"x": float("nan")}})
    assert [e["field"] for e in caught.value.errors or []] == ["metadata"]


@settings(max_examples=150, deadline=None)
@given(
    subject=st.text(min_size=1, max_size=200),
    name=st.text(max_size=60),
    header_value=st.text(max_size=300),
    filename=st.text(min_size=1, max_size=120),
    tag=st.text(min_size=1, max_size=30),
)
def test_any_unicode_together(
    subject: str, name: str, header_value: str, filename: str, tag: str
) -> None:
    """Arbitrary Unicode in several fields at once: refused, or a safe message whose decoded
    subject and display name are what the client sent (line-separator characters aside)."""
    data = {
        **BASE,
        "from_email": f"{json.dumps(name)} <sender@example.com>",
        "subject": subject,
        "headers": {"X-Note": header_value},
        "attachments": [{"filename": filename, "content": "aGk="}],
        "tags": {"t": tag},
    }
    parsed = check(data)
    if parsed is None:
        return
    raw = render(outgoing(claimed_from(parsed)))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assume(subject.strip() and subject.isprintable())
    assert " ".join(str(msg["Subject"]).split()) == " ".join(subject.split())


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(Problem) as caught:
        parse(
            SendEmail,
            {
                "from": "nobody",
                "to": ["ok@example.org", "bad@", "x\r\n@example.org"],
                "cc": "also bad",
                "subject": "a\nb",
                "headers": {"Subject": "x", "X-Ok": "fine"},
                "attachments": [{"filename": "a", "content": "***"}],
                "tags": {"bad name": "v"},
                "scheduled_at": (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
            },
        )
    fields = {e["field"] for e in caught.value.errors or []}
    assert {
        "from",  # named as the client spelled it (the alias)
        "to[1]",
        "to[2]",
        "cc[0]",
        "subject",
        "headers",
        "attachments[0].content",
        "tags",
        "scheduled_at",
        "body_text",
    } <= fields, fields


def test_contract_limits() -> None:
    ok = parse(SendEmail, {**BASE, "to": [f"r{i}@example.org" for i in range(50)]})
    assert len(ok.to) == 50
    with pytest.raises(Problem) as caught:
        parse(
            SendEmail,
            {
                **BASE,
                "to": [f"r{i}@example.org" for i in range(30)],
                "cc": [f"c{i}@example.org" for i in range(15)],
                "bcc": [f"b{i}@example.org" for i in range(6)],
            },
        )
    assert [e["field"] for e in caught.value.errors or []] == ["to"]
    parse(SendEmail, {**BASE, "subject": "x" * 998})
    for bad in (
        {"subject": "x" * 999},
        {"subject": ""},
        {"tags": {f"t{i}": "v" for i in range(11)}},
        {"metadata": {"k": "x" * 4100}},
        {"scheduled_at": (datetime.now(UTC) + timedelta(days=31)).isoformat()},
        {"scheduled_at": "2030-01-01T00:00:00"},  # no offset: ambiguous
        {"headers": {"From": "x@example.com"}},
        {"headers": {"content-type": "text/plain"}},
        {"headers": {"Message-ID": "<x@y>"}},
        {"headers": {"Bad Name": "v"}},
        {"headers": {"X(not-a-token)": "v"}},
        {"headers": {"X-" + "a" * 75: "v"}},
        {"attachments": [{"filename": "a", "content": "not base64!"}]},
        {"body_text": None, "body_html": None},
        {"unknown_field": 1},
    ):
        with pytest.raises(Problem):
            parse(SendEmail, {**BASE, **bad})


def test_accepted_forms() -> None:
    data = parse(
        SendEmail,
        {
            "from": "Zoë Åström <zoe@example.com>",
            "to": "Ann <ANN@Example.org>",
            "cc": ["c@example.org"],
            "reply_to": '"Support, Team" <help@example.com>',
            "subject": "Grüße",
            "body_html": "<p>hi</p>",
            "headers": {"X-Entity-Ref-ID": "42", "List-Unsubscribe": "<https://u.test/x>"},
            "attachments": [
                {"filename": "invite.ics", "content": "aGk=", "content_type": "text/calendar"},
                {
                    "filename": "cal.ics",
                    "content": "aGk=",
                    "content_type": "text/calendar; method=REQUEST",
                },
            ],
            "tags": {"campaign": "spring-2026"},
            "metadata": {"order": 17, "nested": {"a": [1, 2]}},
            "scheduled_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        },
    )
    assert data.from_email == "Zoë Åström <zoe@example.com>"
    assert data.to == ["Ann <ANN@example.org>"]
    assert data.reply_to == ['"Support, Team" <help@example.com>']
    assert data.scheduled_at is not None and data.scheduled_at.tzinfo is not None


def test_a_reply_to_header_is_accepted_but_not_twice() -> None:
    """The contract reserves From, To, Cc, Bcc, Subject, Date, Message-ID, MIME-Version and
    Content-*; Reply-To as a header works when the `reply_to` field is not also given."""
    data = parse(SendEmail, {**BASE, "headers": {"Reply-To": "Help <help@example.com>"}})
    raw = render(outgoing(claimed_from(data)))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    for bad in (
        {"headers": {"reply-to": "h@example.com"}, "reply_to": "r@example.com"},
        {"headers": {"Reply-To": "not an address"}},
    ):
        with pytest.raises(Problem) as caught:
            parse(SendEmail, {**BASE, **bad})
        assert [e["field"] for e in caught.value.errors or []] == [
            "headers." + next(iter(bad["headers"]))  # type: ignore[call-overload]
        ]
