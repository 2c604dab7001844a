"""Render an accepted email into RFC 5322 bytes, once, at acceptance.

The bytes are stored and sent unchanged on every attempt, so the Message-ID and Date stay the
same across retries and a relay that saw the first attempt can spot the duplicate. Everything
is built with the standard library's `email` package under an SMTP policy: CRLF line ends,
headers folded at 78 columns (998 at worst) and RFC 2047-encoded when not ASCII, bodies 7-bit
(quoted-printable or base64), so any relay takes them without 8BITMIME or SMTPUTF8.
"""

from __future__ import annotations

import contextlib
import mimetypes
import random
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.errors import MessageError
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, getaddresses
from types import MappingProxyType

import idna

try:  # the email package's body encoder (private, present in every supported Python)
    from email.contentmanager import _encode_text  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - then every message takes the general path
    _encode_text = None

__all__ = [
    "Attachment",
    "OutgoingEmail",
    "bare_address",
    "envelope_recipients",
    "envelope_sender",
    "new_message_id",
    "render",
]

# 7-bit bodies: nothing below depends on the relay announcing 8BITMIME.
# refold_source="none": the address and free-text headers below are folded here and must be
# sent as folded (the stdlib's modern folder loses spaces between non-ASCII words).
_POLICY = email_policy.SMTP.clone(cte_type="7bit", refold_source="none")

# CR, LF and NUL could start a new header line or end the message: refused outright.
_FORBIDDEN = re.compile(r"[\r\n\x00]")
# Other controls and Unicode line separators cannot start a header line, but the email package
# refuses some of them (str.splitlines() breaks on them) and RFC 5322 allows none: made spaces.
_SANITIZE = {c: " " for c in [*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]}
_SANITIZE.update({0x85: " ", 0x2028: " ", 0x2029: " "})
# RFC 5322 field-name: printable ASCII except the colon.
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers render() writes itself; a client header may not replace or repeat them.
_RESERVED = frozenset({"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version"})

_MAX_LINE = 78  # RFC 5322 2.1.1: SHOULD
_HARD_LINE = 998  # RFC 5322 2.1.1: MUST
# dot-atom@dot-atom (RFC 5322 3.4.1): an addr-spec the header parser keeps exactly as it is.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*")
# Display names holding one of these go in a quoted-string.
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
# Client headers whose values are address lists.
_ADDRESS_HEADERS = frozenset(
    {"sender", "reply-to", "resent-from", "resent-sender", "resent-to", "resent-cc"}
)

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})
_TOKEN_WIDTH = len(repr(sys.maxsize - 1))  # as email.generator formats the boundary's token
_NEWLINES = re.compile(r"\r\n|\r|\n")  # what the generator turns into CRLF (email.generator.NLCRE)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attached file; a `content_id` makes it inline (referenced as `cid:` from the HTML)."""

    filename: str
    content: bytes
    content_type: str | None = None
    content_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingEmail:
    """Everything render() needs; keyword-only so a call site can never swap two fields.

    Addresses are `addr` or `Name <addr>` (`"Quoted, Name" <addr>` too); names may be non-ASCII.
    `date` without a time zone is taken as UTC.
    """

    from_email: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str
    body_text: str | None = None
    body_html: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY_HEADERS)
    attachments: tuple[Attachment, ...] = ()
    message_id: str
    date: datetime


def new_message_id(domain: str) -> str:
    """A fresh `<random@domain>`; 128 random bits make a collision practically impossible.

    `domain` is the sender's domain; a whole address is accepted too (its domain is used).
    """
    domain = bare_address(domain).rpartition("@")[2].strip().rstrip(".")
    if not domain or _FORBIDDEN.search(domain):
        raise ValueError("a Message-ID needs a domain without CR, LF or NUL")
    return f"<{secrets.token_hex(16)}@{_ascii_domain(domain)}>"


def bare_address(s: str) -> str:
    """The addr-spec of `addr` or `Name <addr>`, as written (no case or IDNA change)."""
    return _split_address(s)[1]


def envelope_sender(email: OutgoingEmail) -> str:
    """MAIL FROM: the sender's bare address, with an IDNA (ASCII) domain."""
    return sender_address(email.from_email)


def sender_address(from_email: str) -> str:
    """`envelope_sender` of a `from_email` value alone (no message to build first)."""
    return _ascii_address(bare_address(from_email))


def envelope_recipients(email: OutgoingEmail) -> list[str]:
    """RCPT TO: bare addresses of to + cc + bcc, ASCII domains, duplicates (any case) dropped.

    The first spelling of each address wins and the order is kept, so a recipient listed in
    both To and Bcc gets one copy.
    """
    seen: set[str] = set()
    out: list[str] = []
    for raw in (*email.to, *email.cc, *email.bcc):
        addr = _ascii_address(bare_address(raw))
        key = addr.lower()
        if key not in seen:
            seen.add(key)
            out.append(addr)
    return out


def render(email: OutgoingEmail) -> bytes:
    """The complete message as CRLF bytes, ready for DATA; Bcc is only ever in the envelope.

    Raises ValueError when a header value holds CR, LF or NUL (the API refuses these first;
    this is the second line of defence against header injection), when a client header would
    replace one render() writes, or when there is no body at all.
    """
    _check_headers(email)
    if email.body_text is None and email.body_html is None:
        raise ValueError("an email needs body_text or body_html")

    date = email.date if email.date.tzinfo is not None else email.date.replace(tzinfo=UTC)
    headers = [("From", _address_list("From", "from_email", (email.from_email,)))]
    if email.to:  # a Bcc-only email has no To (RFC 5322 does not require one)
        headers.append(("To", _address_list("To", "to", email.to)))
    if email.cc:
        headers.append(("Cc", _address_list("Cc", "cc", email.cc)))
    if email.reply_to:
        headers.append(("Reply-To", _address_list("Reply-To", "reply_to", email.reply_to)))
    headers.append(("Subject", _fold_unstructured("Subject", email.subject)))
    headers.append(("Date", format_datetime(date)))
    headers.append(("Message-ID", email.message_id.translate(_SANITIZE).strip()))
    for name, value in email.headers.items():
        headers.append((name, _client_header(name, value)))
    headers.append(("MIME-Version", "1.0"))
    if not email.attachments and _encode_text is not None:
        return _render_text_only(headers, email)
    msg = EmailMessage(policy=_POLICY)
    for name, value in headers:
        msg.set_raw(name, value)
    _fill_body(msg, email)
    return msg.as_bytes(policy=_POLICY)


def _render_text_only(headers: list[tuple[str, str]], email: OutgoingEmail) -> bytes:
    """render() without the email package's object model, for the common shapes (text, HTML,
    or both as multipart/alternative; no attachment). The bodies are encoded by the email
    package's own encoder and the boundary made by its own generator, and the result is
    byte for byte what `_fill_body` + `as_bytes` produce (a unit test holds them together):
    only the cost differs (a tenth, most of it the header folding above)."""
    head = b"".join(_raw_header(name, value) for name, value in headers)
    if email.body_text is not None and email.body_html is not None:
        parts = [_text_part("plain", email.body_text), _text_part("html", email.body_html)]
        boundary = _boundary(b"\r\n".join(parts))
        content_type = f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n'
        delimiter = b"\r\n--" + boundary.encode("ascii") + b"\r\n"
        return b"".join(
            [
                head,
                content_type.encode("ascii"),
                b"\r\n--",
                boundary.encode("ascii"),
                b"\r\n",
                delimiter.join(parts),
                b"\r\n--",
                boundary.encode("ascii"),
                b"--\r\n",
            ]
        )
    if email.body_text is not None:
        return head + _text_part("plain", email.body_text)
    assert email.body_html is not None
    return head + _text_part("html", email.body_html)


def _boundary(text: bytes) -> str:
    """The generator's boundary (`Generator._make_boundary`) without its regular expression,
    compiled anew for every message: the same random token, checked against the parts with
    a substring test that is stricter than its line match, so the answer is the same
    whenever the token does not occur; when it does, the generator decides."""
    boundary = "=" * 15 + f"{random.randrange(sys.maxsize):0{_TOKEN_WIDTH}d}" + "=="
    if b"--" + boundary.encode("ascii") in text:
        generated: str = BytesGenerator._make_boundary(text)  # type: ignore[attr-defined]
        return generated
    return boundary


def _raw_header(name: str, value: str) -> bytes:
    """A header set with `set_raw`, as the SMTP policy writes it (policy._fold)."""
    return (name + ": " + "\r\n".join(value.splitlines()) + "\r\n").encode("ascii")


def _text_part(subtype: str, body: str) -> bytes:
    """A text/* leaf as `set_content(body, subtype=...)` and the generator make it: its two
    content headers, a blank line, the encoded body with CRLF line ends."""
    assert _encode_text is not None
    cte, payload = _encode_text(body, "utf-8", None, _POLICY)
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return (head + _NEWLINES.sub("\r\n", payload)).encode("ascii", "surrogateescape")


def _client_header(name: str, value: str) -> str:
    """A client header's folded value: an address list is encoded name by name (encoding it
    whole would hide the addresses), anything else as free text."""
    if name.lower() in _ADDRESS_HEADERS and not value.isascii():
        with contextlib.suppress(ValueError):
            pairs = getaddresses([value.translate(_SANITIZE)])
            return _fold_addresses(name, f"headers.{name}", pairs)
    return _fold_unstructured(name, value)


def _check_headers(email: OutgoingEmail) -> None:
    """Refuse anything that could add a header line, before any work is done."""
    values: list[tuple[str, str]] = [
        ("from_email", email.from_email),
        ("subject", email.subject),
        ("message_id", email.message_id),
    ]
    for name in ("to", "cc", "bcc", "reply_to"):
        values.extend((name, v) for v in getattr(email, name))
    for i, att in enumerate(email.attachments):
        values.append((f"attachments[{i}].filename", att.filename))
        if att.content_type is not None:
            values.append((f"attachments[{i}].content_type", att.content_type))
        if att.content_id is not None:
            values.append((f"attachments[{i}].content_id", att.content_id))
    for field_name, value in values:
        if _FORBIDDEN.search(value):
            raise ValueError(f"{field_name} contains CR, LF or NUL")

    for name, value in email.headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"headers: {name!r} is not a valid header name")
        if _FORBIDDEN.search(value):
            raise ValueError(f"headers.{name} contains CR, LF or NUL")
        lower = name.lower()
        if lower in _RESERVED or lower.startswith("content-"):
            raise ValueError(f"headers.{name} is set by mailpipe and cannot be given")
        if lower == "reply-to" and email.reply_to:
            raise ValueError("headers.Reply-To repeats reply_to")


def _split_address(s: str) -> tuple[str, str]:
    """(display name, addr-spec) of `addr`, `Name <addr>` or `"Quoted" <addr>`."""
    s = s.strip()
    if s.endswith(">") and "<" in s:
        i = s.rindex("<")
        name, addr = s[:i].strip(), s[i + 1 : -1].strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        return name, addr
    return "", s


def _ascii_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{domain!r} is not a valid internationalized domain") from exc


def _ascii_address(addr: str) -> str:
    """The address as it goes on the wire: IDNA domain; a non-ASCII local part is refused
    because it would need SMTPUTF8, which mailpipe does not rely on."""
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{addr!r} is not an email address")
    if not local.isascii():
        raise ValueError(f"{addr!r} has a non-ASCII local part (needs SMTPUTF8)")
    return f"{local}@{_ascii_domain(domain)}"


def _address_list(header: str, field_name: str, values: Iterable[str]) -> str:
    return _fold_addresses(header, field_name, [_split_address(v) for v in values])


def _fold_addresses(header: str, field_name: str, pairs: Iterable[tuple[str, str]]) -> str:
    """An address-list value, folded by hand: one address per line, names RFC 2047-encoded
    when not ASCII (or too long to fit a line); every line stays within 78 columns unless an
    address alone is longer.

    The stdlib's modern folder mangles some non-ASCII names, hence the legacy `Header` encoder.
    """
    items: list[str] = []
    for name, addr in pairs:
        try:
            spec = _ascii_address(addr)
            if not _DOT_ATOM_ADDRESS.fullmatch(spec):  # the parser only to quote or refuse
                spec = Address(addr_spec=spec).addr_spec
        except (MessageError, IndexError, ValueError) as exc:
            raise ValueError(f"{field_name}: {addr!r} is not a valid address") from exc
        name = " ".join(name.translate(_SANITIZE).split())
        prefix = len(header) + 2 if not items else 1
        if not name:
            items.append(spec)
        elif name.isascii() and prefix + len(name) + len(spec) + 6 <= _MAX_LINE:
            if _SPECIALS.search(name):
                name = '"' + re.sub(r'(["\\])', r"\\\1", name) + '"'
            items.append(f"{name} <{spec}>")
        else:
            first = header if not items else None  # the first line also holds "Name: "
            words = Header(name, "utf-8", maxlinelen=_MAX_LINE - 2, header_name=first)
            encoded = words.encode(linesep="\n")
            last = encoded.rpartition("\n")[2]
            if len(last) + len(spec) + 4 <= _MAX_LINE:
                items.append(f"{encoded} <{spec}>")
            else:
                items.append(f"{encoded}\n <{spec}>")
    return ",\n ".join(items)


def _fold_unstructured(header: str, value: str) -> str:
    """A free-text value, folded by hand at spaces when ASCII (so URLs and tokens stay
    readable, as `List-Unsubscribe` needs), RFC 2047-encoded when not ASCII or when a single
    word would break the 998-octet line limit."""
    value = value.translate(_SANITIZE)
    if value.isascii():
        folded = _fold_ascii(len(header) + 2, value)
        if all(len(line) <= _HARD_LINE - len(header) - 2 for line in folded.split("\n")):
            return folded
    return Header(value, "utf-8", maxlinelen=_MAX_LINE, header_name=header).encode(linesep="\n")


def _fold_ascii(used: int, value: str) -> str:
    """Insert line breaks before spaces so lines stay within 78 columns where words allow.

    A break only goes before a space that follows a non-space, so no folded line is blank.
    """
    lines: list[str] = []
    start = 0
    while used + len(value) - start > _MAX_LINE:
        cut = _last_break(value, start, start + _MAX_LINE - used)
        if cut == -1:  # one word longer than the line: break after it instead
            cut = _next_break(value, start + _MAX_LINE - used)
            if cut == -1:
                break
        lines.append(value[start:cut])
        start, used = cut, 0
    lines.append(value[start:])
    return "\n".join(lines)


def _last_break(value: str, start: int, end: int) -> int:
    i = value.rfind(" ", start + 1, end + 1)
    while i > start and value[i - 1] == " ":
        i = value.rfind(" ", start + 1, i - 1)
    return i if i > start else -1


def _next_break(value: str, begin: int) -> int:
    i = value.find(" ", begin)
    while i != -1 and value[i - 1] == " ":
        i = value.find(" ", i + 1)
    return i


def _fill_body(root: EmailMessage, email: OutgoingEmail) -> None:
    """Lay out the MIME tree: mixed(alternative(text, related(html, inline...)), files...)."""
    inline = [a for a in email.attachments if a.content_id and email.body_html is not None]
    files = [a for a in email.attachments if not (a.content_id and email.body_html is not None)]

    def fill_html(part: MIMEPart) -> None:
        assert email.body_html is not None
        if not inline:
            part.set_content(email.body_html, subtype="html")
            return
        html = MIMEPart(policy=_POLICY)
        html.set_content(email.body_html, subtype="html")
        _multipart(part, "related", [html, *(_attachment(a, "inline") for a in inline)])

    def fill_content(part: MIMEPart) -> None:
        if email.body_html is None:
            assert email.body_text is not None
            part.set_content(email.body_text)
        elif email.body_text is None:
            fill_html(part)
        else:
            text, html = MIMEPart(policy=_POLICY), MIMEPart(policy=_POLICY)
            text.set_content(email.body_text)
            fill_html(html)
            _multipart(part, "alternative", [text, html])

    if not files:
        fill_content(root)
        return
    content = MIMEPart(policy=_POLICY)
    fill_content(content)
    _multipart(root, "mixed", [content, *(_attachment(a, "attachment") for a in files)])


def _multipart(part: MIMEPart, subtype: str, children: list[MIMEPart]) -> None:
    getattr(part, f"make_{subtype}")()
    for child in children:
        part.attach(child)


def _attachment(att: Attachment, disposition: str) -> MIMEPart:
    """A base64 leaf, so the bytes come back identical whatever they hold."""
    maintype, subtype, params = _content_type(att)
    part = MIMEPart(policy=_POLICY)
    cid = None
    if att.content_id:
        cid = att.content_id.strip()
        if not cid.startswith("<"):
            cid = f"<{cid}>"
    part.set_content(
        att.content,
        maintype,
        subtype,
        disposition=disposition,
        filename=att.filename.translate(_SANITIZE),
        cid=cid,
        params=params or None,
    )
    return part


def _content_type(att: Attachment) -> tuple[str, str, dict[str, str]]:
    """The given type (with its parameters), else a guess from the filename.

    multipart/* and message/* may not be base64-encoded (RFC 2046), so they go as
    application/octet-stream.
    """
    value = att.content_type or mimetypes.guess_type(att.filename)[0] or ""
    head, _, rest = value.partition(";")
    maintype, _, subtype = head.strip().lower().partition("/")
    if (
        not _TOKEN.fullmatch(maintype)
        or not _TOKEN.fullmatch(subtype)
        or maintype in ("multipart", "message")
    ):
        return "application", "octet-stream", {}
    params: dict[str, str] = {}
    if rest.strip():
        header = _POLICY.header_factory("content-type", value)
        params = {k: v for k, v in header.params.items() if k != "boundary"}
    return maintype, subtype, params
