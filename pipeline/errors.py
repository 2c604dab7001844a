"""The typed error tree: one root, a subtree per subsystem.

Callers branch on types, never on message text. `Temporary` and `Permanent` say whether an
outcome is worth another attempt.
"""

from __future__ import annotations


class MailpipeError(Exception):
    """Root of every error mailpipe raises on purpose."""


class ConfigError(MailpipeError):
    """The configuration is invalid; the message names the key."""


class StoreError(MailpipeError):
    """PostgreSQL could not do what was asked."""


class BrokerError(MailpipeError):
    """RabbitMQ could not do what was asked."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm a publish (nack, return, timeout or lost connection)."""


class DeliveryError(MailpipeError):
    """An SMTP attempt did not end in a 2xx reply."""

    def __init__(self, message: str, *, code: int | None = None, enhanced: str | None = None):
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced
        self.message = message


class Temporary(DeliveryError):
    """Worth another attempt later: 4xx, connection trouble, timeouts."""


class Permanent(DeliveryError):
    """Never worth another attempt: 5xx."""


class CliError(MailpipeError):
    """A command-line request that cannot be carried out; printed as one line."""


class DeadLetterError(MailpipeError):
    """A dead letter cannot be replayed."""


class UnknownDeadLetter(DeadLetterError):
    """No dead letter with that id (in that account)."""


class NotReplayable(DeadLetterError):
    """The dead letter's email is no longer `failed` (it was replayed already)."""


class IdempotencyError(MailpipeError):
    """An `Idempotency-Key` cannot be honoured for this request."""


class IdempotencyMismatch(IdempotencyError):
    """The key was first used with another request body."""


class IdempotencyInProgress(IdempotencyError):
    """The first request with this key is still being processed."""


class ProcessError(MailpipeError):
    """The child processes of `mailpipe run --processes N` could not be kept running."""
