"""DKIM: a signed message verifies with dkimpy against the public key, for both key types."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import dkim
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.errors import ConfigError
from pipeline.mail.dkim import load_signers, sign_for
from pipeline.mail.render import OutgoingEmail, new_message_id, render
from pipeline.settings import DkimKey


def message() -> bytes:
    return render(
        OutgoingEmail(
            from_email="Sender <sender@example.com>",
            to=("rcpt@example.org",),
            subject="Signed",
            body_text="hello\n",
            body_html="<p>hello</p>",
            message_id=new_message_id("example.com"),
            date=datetime.now(UTC),
        )
    )


def rsa_keys(tmp_path: Path) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def ed25519_keys(tmp_path: Path) -> tuple[Path, bytes]:
    key = nacl.signing.SigningKey.generate()
    path = tmp_path / "ed.key"
    path.write_bytes(base64.b64encode(bytes(key)))
    return path, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(key.verify_key))


@pytest.mark.parametrize("make_keys", [rsa_keys, ed25519_keys])
def test_signed_message_verifies(tmp_path: Path, make_keys: object) -> None:
    path, dns_record = make_keys(tmp_path)  # type: ignore[operator]
    signers = load_signers({"example.com": DkimKey(selector="mail", private_key_file=str(path))})
    signed = sign_for(signers, "example.com", message())
    assert signed.startswith(b"DKIM-Signature:")
    assert b"c=relaxed/relaxed" in signed.split(b"\r\n\r\n")[0].replace(b"\r\n ", b" ")

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mail._domainkey.example.com."
        return dns_record

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    tampered = signed.replace(b"Subject: Signed", b"Subject: Changed")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_other_domains_are_left_unsigned(tmp_path: Path) -> None:
    path, _ = rsa_keys(tmp_path)
    signers = load_signers({"example.com": DkimKey("mail", str(path))})
    raw = message()
    assert sign_for(signers, "other.example", raw) == raw


def test_bad_key_files_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dkim\.example\.com\.private_key_file: cannot read"):
        load_signers({"example.com": DkimKey("mail", str(tmp_path / "missing.pem"))})
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a usable key"):
        load_signers({"example.com": DkimKey("mail", str(bad))})
