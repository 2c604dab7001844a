"""Event webhooks: every event of an email, delivered signed to the account's endpoints.

`fanout` tails the events table and publishes one message per (event, endpoint); `delivery`
consumes them and POSTs each one (Standard Webhooks headers from `signing`) through a transport
that only connects to addresses `ssrf` allows; failures wait in the webhook delay tiers.
"""

from __future__ import annotations

EVENT_TYPES: tuple[str, ...] = (
    "email.scheduled",
    "email.queued",
    "email.sending",
    "email.sent",
    "email.deferred",
    "email.bounced",
    "email.failed",
    "email.suppressed",
    "email.canceled",
    "email.replayed",
)
"""Every event type an endpoint can subscribe to (the default subscription is all of them)."""
