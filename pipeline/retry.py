"""The backoff policy and the choice of delay tier: pure functions, tested without I/O.

Attempt n (1-based, the first included) failed temporarily; the next one waits
base x 2^(n-1), capped at max, times a jitter in [0.75, 1]. The jitter spreads a burst of
failures apart without ever letting a later wait undercut an earlier one. The wait is then
rounded up to the smallest delay tier that covers it (the largest tier when none does), because
a message can only wait as long as some tier queue's TTL.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

JITTER_LOW = 0.75


@dataclass(frozen=True)
class RetryPolicy:
    base_delay_s: float
    max_delay_s: float
    max_attempts: int
    tiers_s: Sequence[int]


def backoff_s(
    attempt: int, *, base_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based)."""
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    exponent = min(attempt - 1, 64)  # 2**64 x anything is past any cap; keeps floats finite
    ceiling = min(max_s, base_s * 2.0**exponent)
    return ceiling * (JITTER_LOW + (1 - JITTER_LOW) * rand())


def choose_tier(delay_s: float, tiers_s: Sequence[int]) -> int:
    """The smallest tier that waits at least `delay_s`; the largest when none is long enough."""
    if not tiers_s:
        raise ValueError("no delay tiers configured")
    ordered = sorted(tiers_s)
    for tier in ordered:
        if tier >= delay_s:
            return tier
    return ordered[-1]


def exhausted(attempts: int, max_attempts: int) -> bool:
    """True when `attempts` made so far leave no attempt to try."""
    return attempts >= max_attempts


def next_wait_s(
    attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> int:
    """The tier the email waits in after failed attempt `attempt`."""
    delay = backoff_s(attempt, base_s=policy.base_delay_s, max_s=policy.max_delay_s, rand=rand)
    return choose_tier(delay, policy.tiers_s)
