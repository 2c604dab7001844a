"""Opening an AMQP connection with a deadline and a typed, password-free error."""

from __future__ import annotations

import aiormq
import aiormq.abc
import anyio
from aiormq.tools import censor_url
from yarl import URL

from pipeline.errors import BrokerError


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and error messages."""
    try:
        return str(censor_url(URL(url)))
    except ValueError:
        return "<unparsable AMQP URL>"


async def connect(url: str, *, timeout_s: float = 5) -> aiormq.abc.AbstractConnection:
    """Connect within `timeout_s` or raise BrokerError.

    aiormq has no connect timeout of its own: a broker that accepts the TCP connection but
    never answers the handshake would otherwise hang the caller forever.
    """
    where = safe_url(url)
    try:
        with anyio.fail_after(timeout_s):
            connection = aiormq.Connection(url)
            try:
                await connection.connect()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await connection.close()
                raise
    except TimeoutError:
        raise BrokerError(f"AMQP connect to {where} timed out after {timeout_s:g} s") from None
    except (aiormq.AMQPError, OSError) as e:
        # str(e) of aiormq errors carries the broker's reply text or the socket error,
        # never the URL, so it is safe to show.
        reason = str(e) or type(e).__name__
        raise BrokerError(f"AMQP connect to {where} failed: {type(e).__name__}: {reason}") from e
    return connection
