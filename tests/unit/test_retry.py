"""The backoff policy and the choice of delay tier: pure functions, no I/O."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.retry import (
    JITTER_LOW,
    RetryPolicy,
    backoff_s,
    choose_tier,
    exhausted,
    next_wait_s,
)

DEFAULT_TIERS = (1, 5, 30, 120, 600, 3600)
DEFAULT = RetryPolicy(base_delay_s=30, max_delay_s=3600, max_attempts=8, tiers_s=DEFAULT_TIERS)


def lowest() -> float:
    return 0.0


def highest() -> float:
    return 1.0


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 30), (2, 60), (3, 120), (4, 240), (7, 1920)])
def test_backoff_doubles_from_the_base(attempt: int, ceiling: float) -> None:
    assert backoff_s(attempt, base_s=30, max_s=3600, rand=highest) == ceiling
    assert backoff_s(attempt, base_s=30, max_s=3600, rand=lowest) == ceiling * JITTER_LOW


def test_backoff_is_capped() -> None:
    assert backoff_s(8, base_s=30, max_s=3600, rand=highest) == 3600
    assert backoff_s(8, base_s=30, max_s=3600, rand=lowest) == 3600 * JITTER_LOW


def test_huge_attempt_numbers_stay_finite() -> None:
    value = backoff_s(10_000, base_s=30, max_s=3600, rand=highest)
    assert math.isfinite(value) and value == 3600


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        backoff_s(attempt, base_s=1, max_s=10)


@given(
    attempt=st.integers(1, 40),
    base=st.floats(0.1, 100),
    ratio=st.floats(1, 1e6),
    r=st.floats(0, 1),
)
def test_backoff_stays_within_jitter_of_its_ceiling(
    attempt: int, base: float, ratio: float, r: float
) -> None:
    max_s = base * ratio
    ceiling = min(max_s, base * 2 ** (attempt - 1))
    value = backoff_s(attempt, base_s=base, max_s=max_s, rand=lambda: r)
    assert ceiling * JITTER_LOW <= value <= ceiling * (1 + 1e-12)


@given(attempt=st.integers(1, 30), base=st.floats(0.1, 100), r1=st.floats(0, 1), r2=st.floats(0, 1))
def test_jitter_never_lets_a_later_wait_undercut_an_earlier_one_below_the_cap(
    attempt: int, base: float, r1: float, r2: float
) -> None:
    huge = base * 2.0**40
    now = backoff_s(attempt, base_s=base, max_s=huge, rand=lambda: r1)
    later = backoff_s(attempt + 1, base_s=base, max_s=huge, rand=lambda: r2)
    assert later >= now


@pytest.mark.parametrize(
    ("delay", "tier"),
    [(0, 1), (0.5, 1), (1, 1), (1.01, 5), (5, 5), (29.9, 30), (121, 600), (3600, 3600)],
)
def test_choose_tier_is_the_smallest_that_covers_the_delay(delay: float, tier: int) -> None:
    assert choose_tier(delay, DEFAULT_TIERS) == tier


def test_choose_tier_falls_back_to_the_largest() -> None:
    assert choose_tier(99_999, DEFAULT_TIERS) == 3600


def test_choose_tier_does_not_need_sorted_tiers() -> None:
    assert choose_tier(3, (30, 1, 5)) == 5


def test_choose_tier_needs_tiers() -> None:
    with pytest.raises(ValueError, match="no delay tiers"):
        choose_tier(1, ())


def test_exhausted_counts_every_attempt_the_first_included() -> None:
    assert not exhausted(0, 3)
    assert not exhausted(2, 3)
    assert exhausted(3, 3)
    assert exhausted(4, 3)


def test_default_schedule() -> None:
    """What the README documents: the waits after attempts 1..7 under the default config."""
    for rand in (lowest, highest):
        waits = [next_wait_s(n, DEFAULT, rand=rand) for n in range(1, 8)]
        assert waits == [30, 120, 120, 600, 600, 3600, 3600]


def test_test_schedule() -> None:
    """The second-scale schedule the integration tests use: waits grow 1 s, 2 s, 4 s."""
    policy = RetryPolicy(base_delay_s=1, max_delay_s=4, max_attempts=4, tiers_s=(1, 2, 4))
    for rand in (lowest, highest):
        assert [next_wait_s(n, policy, rand=rand) for n in (1, 2, 3)] == [1, 2, 4]


@given(
    attempt=st.integers(1, 50),
    tiers=st.lists(st.integers(1, 100_000), min_size=1, max_size=8, unique=True),
    base=st.floats(0.1, 1000),
    r=st.floats(0, 1),
)
def test_the_wait_is_always_a_configured_tier(
    attempt: int, tiers: list[int], base: float, r: float
) -> None:
    policy = RetryPolicy(base, base * 100, 10, tuple(sorted(tiers)))
    assert next_wait_s(attempt, policy, rand=lambda: r) in tiers


@given(attempt=st.integers(1, 30), r1=st.floats(0, 1), r2=st.floats(0, 1))
def test_tier_waits_never_shrink_below_the_cap(attempt: int, r1: float, r2: float) -> None:
    policy = RetryPolicy(1, 2.0**40, 10, (1, 2, 4, 8, 16, 60, 3600, 86400))
    assert next_wait_s(attempt + 1, policy, rand=lambda: r2) >= next_wait_s(
        attempt, policy, rand=lambda: r1
    )
