"""DKIM signing with dkimpy: relaxed/relaxed, rsa-sha256 or ed25519-sha256, per sender domain.

Keys are read once at start (a missing or unreadable key fails the start, naming the file), and
each message is signed once, when it is first rendered; the signed bytes are what every attempt
sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dkim

from pipeline.errors import ConfigError
from pipeline.settings import DkimKey


@dataclass(frozen=True)
class DkimSigner:
    domain: str
    selector: str
    private_key: bytes
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"

    def sign(self, raw: bytes) -> bytes:
        """`raw` with a DKIM-Signature header prepended."""
        header = dkim.sign(
            raw,
            self.selector.encode(),
            self.domain.encode(),
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=self.algorithm,
        )
        return bytes(header) + raw


def key_algorithm(key: bytes) -> bytes:
    """PEM (RSA) keys sign with rsa-sha256; a bare base64 32-byte seed with ed25519-sha256
    (the format dkimpy's `dknewkey --ktype ed25519` writes)."""
    return b"rsa-sha256" if key.lstrip().startswith(b"-----BEGIN") else b"ed25519-sha256"


def load_signers(keys: Mapping[str, DkimKey]) -> dict[str, DkimSigner]:
    """One signer per configured domain (lower-cased); ConfigError naming a bad key file."""
    signers = {}
    for domain, spec in keys.items():
        path = Path(spec.private_key_file)
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"dkim.{domain}.private_key_file: cannot read {path}: {exc.strerror}"
            ) from None
        signer = DkimSigner(domain.lower(), spec.selector, key.strip(), key_algorithm(key))
        try:
            signer.sign(b"From: a@" + domain.encode() + b"\r\nSubject: t\r\n\r\nt\r\n")
        except dkim.DKIMException as exc:
            raise ConfigError(
                f"dkim.{domain}.private_key_file: {path} is not a usable key: {exc}"
            ) from None
        signers[signer.domain] = signer
    return signers


def sign_for(signers: Mapping[str, DkimSigner], from_domain: str, raw: bytes) -> bytes:
    """Sign with the sender domain's key when one is configured; otherwise unchanged."""
    signer = signers.get(from_domain.lower().rstrip("."))
    return signer.sign(raw) if signer else raw
