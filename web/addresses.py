"""Address syntax checks for the API: `addr` or `Name <addr>`, IDNA included, no DNS lookups."""

from __future__ import annotations

import re
from email.headerregistry import Address

from email_validator import EmailNotValidError, validate_email

_FORBIDDEN = re.compile(r"[\r\n\x00]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON's `"\ud800"`: not text, cannot be stored
_NAMED = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^"<>]*?))\s*<([^<>]+)>\s*$')


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
        valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError:
        return addr
    return valid.ascii_email or valid.normalized
