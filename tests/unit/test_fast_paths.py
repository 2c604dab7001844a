"""Fast paths give exactly what the general paths give: render() without attachments (byte for
byte what the email package writes), its dot-atom addresses, and canonical_address() of plain
ASCII addresses."""

from __future__ import annotations

import email.generator
from email.headerregistry import Address

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.mail import render as render_module
from pipeline.mail.render import Attachment, OutgoingEmail, render
from pipeline.suppressions import canonical_address
from tests.unit.test_render import make
from web import addresses

TOKEN = 123456789
BOUNDARY = f"==============={TOKEN:019d}=="


@pytest.fixture(autouse=True)
def fixed_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator's boundary comes from random.randrange: fixed, both paths agree."""
    monkeypatch.setattr(email.generator.random, "randrange", lambda _n: TOKEN)


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


def validator_canonical(address: str) -> str:
    """canonical_address() without its fast path."""
    text = address.strip()
    try:
        valid = validate_email(text, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return text.lower()
    return valid.normalized.lower()


@pytest.mark.parametrize(
    "address",
    [
        "User@Example.COM",
        " a.b+tag@sub.example.org ",
        "x@y",
        "a..b@example.com",
        ".a@example.com",
        "a@-example.com",
        "a@example.com.",
        "a@example..com",
        "A!#$%&'*+/=?^_`{|}~-@EXAMPLE.com",
        "a@" + "x" * 70 + ".com",
        "a" * 65 + "@example.com",
        "a@xn--bcher-kva.example",
        "a@XN--BCHER-KVA.example",
        "üser@bücher.example",
        '"quoted"@example.com',
        "Name <a@example.com>",
        "a@[127.0.0.1]",
        "",
        "@",
        "a@",
    ],
)
def test_canonical_address_matches_the_validator(address: str) -> None:
    assert canonical_address(address) == validator_canonical(address)


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,20}@[A-Za-z0-9.-]{1,30}", fullmatch=True))
def test_canonical_address_of_plain_addresses(address: str) -> None:
    assert canonical_address(address) == validator_canonical(address)


_ATEXT = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}"


@settings(max_examples=300, deadline=None)
@given(st.from_regex(rf"{_ATEXT}(\.{_ATEXT}){{0,3}}@{_ATEXT}(\.{_ATEXT}){{0,3}}", fullmatch=True))
def test_dot_atom_addresses_are_what_the_header_parser_makes_them(address: str) -> None:
    """render() skips the header parser for these: it would keep them as they are."""
    assert render_module._DOT_ATOM_ADDRESS.fullmatch(address)
    assert Address(addr_spec=address).addr_spec == address


def validator_forms(address: str) -> tuple[str, str] | None:
    """What email-validator makes of a bare address: (normalised, ASCII), or None."""
    try:
        valid = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return None
    return valid.normalized, valid.ascii_email or valid.normalized


def fast_forms(address: str) -> tuple[str, str] | None:
    try:
        return addresses.validated(address)
    except EmailNotValidError:
        return None


@pytest.mark.parametrize(
    "address",
    [
        "User@Example.COM",
        "a.b+tag@sub.example.org",
        "x@y",
        "a@localhost",
        "a@b.test",
        "a@printer.local",
        "a@1.2.3.4",
        "a@example.c0m",
        "a@example.123",
        "a@ab--cd.example",
        "a@xn--bcher-kva.example",
        "a@\u212aexample.com",  # KELVIN SIGN lower-cases to an ASCII k
        "a@example.com.",
        "a@-example.com",
        "a..b@example.com",
        "a" * 64 + "@example.com",
        "a" * 65 + "@example.com",
        "a@" + "x" * 63 + ".com",
        "a@" + "x" * 64 + ".com",
        "a@" + ".".join(["x" * 60] * 4) + ".com",
        "üser@bücher.example",
        '"quoted"@example.com',
        "a@[127.0.0.1]",
    ],
)
def test_validated_matches_the_validator(address: str) -> None:
    assert fast_forms(address) == validator_forms(address)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.from_regex(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\"() -]{1,20}@[A-Za-z0-9.\u212a_-]{1,30}", fullmatch=True
    )
)
def test_validated_matches_the_validator_on_plain_shapes(address: str) -> None:
    assert fast_forms(address) == validator_forms(address)


def general_check(value: str) -> str | Exception:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(addresses, "_plain", lambda _addr: None)
        try:
            return addresses.check_address(value)
        except ValueError as exc:
            return exc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.one_of(st.just(""), st.text(st.characters(exclude_characters="\r\n\x00"), max_size=12)),
    address=st.from_regex(rf"{_ATEXT}(\.{_ATEXT}){{0,2}}@[a-z0-9.-]{{1,20}}", fullmatch=True),
)
def test_check_address_fast_path_matches_the_general_one(name: str, address: str) -> None:
    value = f"{name} <{address}>" if name else address
    expected = general_check(value)
    try:
        got: str | Exception = addresses.check_address(value)
    except ValueError as exc:
        got = exc
    if isinstance(expected, Exception):
        assert isinstance(got, ValueError)
    else:
        assert got == expected


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.characters(exclude_characters="\r\n\x00"), min_size=1, max_size=16))
def test_display_names_are_quoted_as_the_header_registry_quotes_them(name: str) -> None:
    addr = "someone@example.com"
    assert addresses.display(name, addr) == str(Address(display_name=name, addr_spec=addr))
