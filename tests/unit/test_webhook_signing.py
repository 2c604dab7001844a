"""Standard Webhooks signing and verification, and the `mailpipe webhooks verify` command."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.webhooks import signing

# The Standard Webhooks reference test vector (standard-webhooks/libraries, every language).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def independent_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The spec's recipe, written out here rather than borrowed from the project."""
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_the_reference_vector() -> None:
    assert signing.signature(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    assert independent_signature(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_a_new_secret_is_whsec_and_at_least_24_random_bytes() -> None:
    secrets = {signing.new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24


def test_headers_match_an_independent_hmac() -> None:
    secret = signing.new_secret()
    body = json.dumps({"type": "email.sent", "data": {"email_id": "msg_x"}}).encode()
    headers = signing.sign_headers(secret, "evt_abc", 1_800_000_000, body)
    assert headers == {
        "webhook-id": "evt_abc",
        "webhook-timestamp": "1800000000",
        "webhook-signature": independent_signature(secret, "evt_abc", 1_800_000_000, body),
    }


def spec_headers(**override: str) -> dict[str, str]:
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    headers.update(override)
    return headers


def test_verify_accepts_the_genuine_request() -> None:
    signing.verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 10)
    # Header names in any case; one good signature among several (a secret rotation).
    mixed = {
        "Webhook-Id": SPEC_ID,
        "WEBHOOK-TIMESTAMP": str(SPEC_TIMESTAMP),
        "Webhook-Signature": "v1,bm90IGl0 " + SPEC_SIGNATURE + " v2,whatever",
    }
    signing.verify(SPEC_SECRET, mixed, SPEC_BODY, now=SPEC_TIMESTAMP)
    signing.verify(SPEC_SECRET.removeprefix("whsec_"), spec_headers(), SPEC_BODY, tolerance_s=None)


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = b'{"type":"email.sent"}'
    headers = signing.sign_headers(new, "evt_1", 1_800_000_000, body, previous=old)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (new, old):
        signing.verify(secret, headers, body, now=1_800_000_000)
    with pytest.raises(signing.SignatureError):
        signing.verify(signing.new_secret(), headers, body, now=1_800_000_000)
    alone = signing.sign_headers(new, "evt_1", 1_800_000_000, body)
    assert alone["webhook-signature"] == headers["webhook-signature"].split()[0]


@pytest.mark.parametrize(
    ("secret", "headers", "body", "why"),
    [
        (SPEC_SECRET, spec_headers(), b'{"test": 2432232315}', "matches"),
        (signing.new_secret(), spec_headers(), SPEC_BODY, "matches"),
        (SPEC_SECRET, spec_headers(**{"webhook-id": "msg_other"}), SPEC_BODY, "matches"),
        (SPEC_SECRET, spec_headers(**{"webhook-timestamp": "1614265331"}), SPEC_BODY, "matches"),
        (SPEC_SECRET, spec_headers(**{"webhook-signature": "v2," + SPEC_SIGNATURE[3:]}), SPEC_BODY,
         "matches"),
        (SPEC_SECRET, spec_headers(**{"webhook-timestamp": "soon"}), SPEC_BODY, "whole number"),
        (SPEC_SECRET, {"webhook-id": SPEC_ID, "webhook-timestamp": "1"}, SPEC_BODY, "missing"),
        ("whsec_not base64!", spec_headers(), SPEC_BODY, "base64"),
    ],
)  # fmt: skip
def test_verify_refuses_anything_else(
    secret: str, headers: dict[str, str], body: bytes, why: str
) -> None:
    with pytest.raises(signing.SignatureError, match=why):
        signing.verify(secret, headers, body, now=SPEC_TIMESTAMP)


def test_verify_refuses_a_stale_or_future_timestamp() -> None:
    for now in (SPEC_TIMESTAMP + 301, SPEC_TIMESTAMP - 301):
        with pytest.raises(signing.SignatureError, match="tolerance"):
            signing.verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=now)
    signing.verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TIMESTAMP + 300)


def run_cli(*args: str) -> int:
    try:
        main(["webhooks", "verify", *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "body.json"
    payload.write_bytes(SPEC_BODY)
    as_lines = tmp_path / "headers.txt"
    as_lines.write_text(
        "POST /hooks HTTP/1.1\r\nHost: example.com\r\nContent-Type: application/json\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in spec_headers().items())
    )
    as_json = json.dumps(spec_headers())
    for headers in (str(as_lines), as_json):
        code = run_cli(
            "--secret", SPEC_SECRET, "--payload", str(payload), "--headers", headers,
            "--tolerance", "0",
        )  # fmt: skip
        out = capsys.readouterr()
        assert code == 0, out.err
        assert out.out.strip() == f"valid: webhook-id {SPEC_ID}"

    payload.write_bytes(SPEC_BODY + b" ")
    code = run_cli(
        "--secret", SPEC_SECRET, "--payload", str(payload), "--headers", as_json,
        "--tolerance", "0",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == "mailpipe: invalid: no v1 signature in webhook-signature matches"

    # The default tolerance is 5 minutes: the vector's 2021 timestamp is far outside it.
    payload.write_bytes(SPEC_BODY)
    code = run_cli("--secret", SPEC_SECRET, "--payload", str(payload), "--headers", as_json)
    assert code == 1
    assert "tolerance" in capsys.readouterr().err
