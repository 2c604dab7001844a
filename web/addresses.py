"""Address syntax checks for the API: `addr` or `Name <addr>`, IDNA included, no DNS lookups.

Every address of every accepted email goes through here, several per request, so the common
shape (an ASCII dot-atom at an ASCII host name) takes a fast path that gives exactly what
email-validator gives (a property test holds the two together); anything else goes to
email-validator itself.
"""

from __future__ import annotations

import re
from email.headerregistry import Address

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON's `"\ud800"`: not text, cannot be stored
_NAMED = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^"<>]*?))\s*<([^<>]+)>\s*$')

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_LOCAL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# Host-name labels with no `--` anywhere (that would need the IDNA rules), under a TLD of
# letters only (email-validator wants a domain ending in a letter).
_PLAIN_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
_SPECIAL_USE = tuple(SPECIAL_USE_DOMAIN_NAMES)
_SPECIAL_USE_SUFFIXES = tuple("." + d for d in SPECIAL_USE_DOMAIN_NAMES)
# What makes email.headerregistry quote a display name (email._header_value_parser.SPECIALS).
_SPECIALS = frozenset('()<>@,:;.\\"[]')


def _plain(addr: str) -> str | None:
    """The normalised form of an address in the common shape (what email-validator would
    give: the local part as it is, the domain lower-cased), or None for any other shape."""
    local, at, domain = addr.rpartition("@")
    if not at or len(addr) > 254 or len(local) > 64 or not domain.isascii():
        return None
    domain = domain.lower()
    if (
        "--" in domain
        or len(domain) > 253
        or not _PLAIN_LOCAL.fullmatch(local)
        or not _PLAIN_DOMAIN.fullmatch(domain)
        or domain in _SPECIAL_USE
        or domain.endswith(_SPECIAL_USE_SUFFIXES)
    ):
        return None
    return f"{local}@{domain}"


def validated(addr: str) -> tuple[str, str]:
    """(normalised, ASCII) forms of a bare address; EmailNotValidError when it is not one.
    The ASCII form has the domain in IDNA, for the SMTP envelope."""
    plain = _plain(addr)
    if plain is not None:
        return plain, plain
    valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    return valid.normalized, valid.ascii_email or valid.normalized


def display(name: str, addr: str) -> str:
    """`Name <addr>` as email.headerregistry.Address writes it (the name quoted when needed),
    for an address `_plain` accepted (the header parser would keep it as it is)."""
    if not _SPECIALS.isdisjoint(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def check_address(value: str) -> str:
    """Normalise one address; ValueError with a message fit for the client when it is bad."""
    if _FORBIDDEN.search(value):
        raise ValueError("must not contain CR, LF or NUL")
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    match = _NAMED.match(value)
    if match:
        quoted, plain, addr = match.groups()
        name = (quoted if quoted is not None else plain or "").strip()
        if quoted is not None:
            name = re.sub(r"\\(.)", r"\1", name)
    else:
        name, addr = "", value.strip()
    if not addr:
        raise ValueError("is empty")
    fast = _plain(addr)
    if fast is not None:
        return display(name, fast) if name else fast
    try:
        valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    bare = valid.normalized
    if not name:
        return bare
    return str(Address(display_name=name, addr_spec=bare))


def bare(value: str) -> str:
    """The addr-spec of a normalised address (what goes in the SMTP envelope)."""
    match = _NAMED.match(value)
    return match.group(3).strip() if match else value.strip()


def envelope_address(value: str) -> str:
    """The address as the SMTP envelope wants it: the domain in IDNA (ASCII) form when possible."""
    addr = bare(value)
    try:
        return validated(addr)[1]
    except EmailNotValidError:
        return addr
