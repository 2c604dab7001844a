"""Group commit: concurrent callers' items share one flush (one round trip, one commit).

    batcher = Batcher(flush, max_size=64)
    result = await batcher.submit(item)      # this item's own result, or its own error

The first caller to find no open batch leads it; the others join it and wait for their result.
At most `max_concurrent` flushes run at once: while they do, the open batch keeps filling, and
its leader flushes it as soon as one of them ends. So an idle batcher adds no wait (a lone item
is flushed at once), and under load batches grow with the load (as a database's group commit
does), up to `max_size`. Under load (the previous batch had company) a leader also lingers
up to `max_wait_s` for more before it flushes: fewer, bigger flushes for a little latency, which
an idle batcher never pays. No background task exists: there is nothing to start or stop.

`flush` returns one result per item, in order; an exception in an item's place fails that item
alone, with no retry (for what went wrong with one item after the batch's commit). When `flush`
raises, it must have been all or nothing: nothing of the batch took effect. The batch is then
split in halves and each half flushed again, down to single items, so one bad item fails alone
(with its own error) while the others still succeed; a batch of n items with one bad item costs
about 2·log2(n) extra flushes. An error that says nothing about the items (the database is down:
`splittable(error)` is False) fails the whole batch at once instead.

The leader's part (waiting for a turn, and the flush) is shielded from cancellation and bounded
by `flush_timeout_s`: a caller that goes away must neither leave the others of its batch waiting
forever nor cut their flush in two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[Sequence[T]], Awaitable[Sequence["R | Exception"]]]


class FlushTimeout(TimeoutError):
    """A flush took longer than `flush_timeout_s`; its outcome is unknown."""


def _always(_: Exception) -> bool:
    return True


def about_the_rows(exc: Exception) -> bool:
    """For a database flush: whether its failure may be one bad row's fault (worth splitting
    the batch), rather than the database's (unreachable, too slow: every row would fail)."""
    import psycopg
    from psycopg_pool import PoolTimeout

    return not isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError | PoolTimeout | OSError
    )


@dataclass(eq=False)
class _Batch(Generic[T, R]):
    items: list[T] = field(default_factory=list)
    size: int = 0
    full: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    outcomes: list[R | Exception] = field(default_factory=list)


class Batcher(Generic[T, R]):
    """Gathers concurrent `submit` calls into batches of at most `max_size` (counted with
    `size`, one per item by default), flushed at most `max_concurrent` at a time."""

    def __init__(
        self,
        flush: Flush[T, R],
        *,
        max_size: int = 64,
        max_concurrent: int = 1,
        max_wait_s: float = 0.0,
        size: Callable[[T], int] = lambda _: 1,
        splittable: Callable[[Exception], bool] = _always,
        flush_timeout_s: float = 30.0,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._flush = flush
        self._max_size = max_size
        self._slots = anyio.Semaphore(max_concurrent)
        self._max_wait_s = max_wait_s
        self._size = size
        self._splittable = splittable
        self._flush_timeout_s = flush_timeout_s
        self._open: _Batch[T, R] | None = None
        self._busy = False
        """The last batch closed had more than one item: linger."""
        self.batches = 0
        """Batches flushed so far (a split batch counts once)."""
        self.flushes = 0
        """Calls of `flush`, splits included."""
        self.items = 0
        """Items submitted so far."""

    async def submit(self, item: T) -> R:
        """This item's result once its batch is flushed; raises the item's own error."""
        batch = self._open
        leader = batch is None
        if batch is None:
            batch = self._open = _Batch()
        index = len(batch.items)
        batch.items.append(item)
        batch.size += self._size(item)
        self.items += 1
        if batch.size >= self._max_size:
            self._close(batch)
        if leader:
            with anyio.CancelScope(shield=True):
                await self._lead(batch)
        else:
            await batch.done.wait()
        outcome = batch.outcomes[index]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _lead(self, batch: _Batch[T, R]) -> None:
        """Let the batch fill (lingering, then while every flush slot is taken), flush it,
        and hand every item its outcome."""
        try:
            with anyio.fail_after(self._flush_timeout_s):
                if self._busy and self._max_wait_s > 0:
                    with anyio.move_on_after(self._max_wait_s):
                        await batch.full.wait()
                else:
                    await anyio.lowlevel.checkpoint()  # callers ready now join first
                async with self._slots:
                    self._close(batch)
                    self._busy = len(batch.items) > 1
                    batch.outcomes = await self._run(batch.items)
        except TimeoutError:
            error = FlushTimeout(f"flush not done within {self._flush_timeout_s:g} s")
            batch.outcomes = [error] * len(batch.items)
        finally:
            self._close(batch)
            if not batch.outcomes:  # only a bug gets here: never leave the others hanging
                failed = RuntimeError("the batch's flush failed")
                batch.outcomes = [failed] * len(batch.items)
            self.batches += 1
            batch.done.set()

    def _close(self, batch: _Batch[T, R]) -> None:
        """No item joins `batch` from now on; its leader stops waiting."""
        if self._open is batch:
            self._open = None
        batch.full.set()

    async def _run(self, items: Sequence[T]) -> list[R | Exception]:
        """Flush `items`; when that fails, flush each half on its own, down to single items."""
        self.flushes += 1
        try:
            results = list(await self._flush(items))
            if len(results) != len(items):
                raise RuntimeError(f"flush returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(items) == 1 or not self._splittable(exc):
                return [exc] * len(items)
            middle = len(items) // 2
            return [*await self._run(items[:middle]), *await self._run(items[middle:])]
        return list(results)
