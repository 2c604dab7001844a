"""The group-commit batcher: batching, one bad item failing alone, errors that fail a batch."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from pipeline.batcher import Batcher, FlushTimeout

pytestmark = pytest.mark.anyio


class Store:
    """A fake all-or-nothing flush: commits every item unless one of them is bad."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.committed: list[str] = []
        self.calls: list[list[str]] = []
        self.delay_s = delay_s
        self.running = 0
        self.peak = 0
        """Most flushes running at once."""

    async def flush(self, items: Sequence[str]) -> list[str]:
        self.calls.append(list(items))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(self.delay_s)
        finally:
            self.running -= 1
        bad = [i for i in items if i.startswith("bad")]
        if bad:
            raise ValueError(f"cannot store {bad[0]}")
        self.committed.extend(items)
        return [f"ok:{i}" for i in items]


async def submit_all(batcher: Batcher[str, str], items: Sequence[str]) -> dict[str, object]:
    """Submit every item concurrently; each one's result or exception."""
    outcomes: dict[str, object] = {}

    async def one(item: str) -> None:
        try:
            outcomes[item] = await batcher.submit(item)
        except Exception as exc:
            outcomes[item] = exc

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(one, item)
    return outcomes


async def test_concurrent_items_share_one_flush() -> None:
    store = Store()
    batcher = Batcher(store.flush, max_size=100, max_wait_s=0.05)
    items = [f"e{i}" for i in range(20)]
    outcomes = await submit_all(batcher, items)
    assert outcomes == {i: f"ok:{i}" for i in items}
    assert len(store.calls) == 1 and sorted(store.calls[0]) == sorted(items)
    assert batcher.batches == 1 and batcher.items == 20


async def test_a_full_batch_goes_at_once_and_the_rest_follows() -> None:
    store = Store()
    batcher = Batcher(store.flush, max_size=8, max_wait_s=10)  # only size ends the lingering
    items = [f"e{i}" for i in range(16)]
    with anyio.fail_after(5):
        outcomes = await submit_all(batcher, items)
    assert all(outcomes[i] == f"ok:{i}" for i in items)
    assert [len(c) for c in store.calls] == [8, 8]


async def test_size_counts_the_items_weight() -> None:
    store = Store()
    batcher: Batcher[str, str] = Batcher(store.flush, max_size=4, max_wait_s=10, size=len)
    with anyio.fail_after(5):
        outcomes = await submit_all(batcher, ["aa", "bb", "cc", "dd"])
    assert set(outcomes.values()) == {"ok:aa", "ok:bb", "ok:cc", "ok:dd"}
    assert [len(c) for c in store.calls] == [2, 2]


async def test_one_bad_item_fails_alone() -> None:
    store = Store()
    batcher = Batcher(store.flush, max_size=100, max_wait_s=0.05)
    items = [f"e{i}" for i in range(31)]
    items.insert(17, "bad-row")
    outcomes = await submit_all(batcher, items)

    error = outcomes.pop("bad-row")
    assert isinstance(error, ValueError) and "bad-row" in str(error)
    assert outcomes == {i: f"ok:{i}" for i in items if i != "bad-row"}
    # Every good item committed exactly once, the bad one never.
    assert sorted(store.committed) == sorted(i for i in items if i != "bad-row")
    # Halving finds it in about 2 log2(n) flushes, not one per item.
    assert len(store.calls) <= 2 + 2 * 5


async def test_several_bad_items_each_fail_alone() -> None:
    store = Store()
    batcher = Batcher(store.flush, max_size=100, max_wait_s=0.05)
    items = ["bad-1", "e1", "e2", "bad-2", "e3", "e4", "e5", "bad-3"]
    outcomes = await submit_all(batcher, items)
    assert {k for k, v in outcomes.items() if isinstance(v, ValueError)} == {
        "bad-1",
        "bad-2",
        "bad-3",
    }
    assert sorted(store.committed) == ["e1", "e2", "e3", "e4", "e5"]


async def test_an_error_returned_in_an_items_place_fails_only_that_item() -> None:
    calls: list[list[str]] = []

    async def flush(items: Sequence[str]) -> list[str | Exception]:
        calls.append(list(items))
        return [KeyError(i) if i == "odd" else f"ok:{i}" for i in items]

    batcher: Batcher[str, str] = Batcher(flush, max_size=100, max_wait_s=0.05)
    outcomes = await submit_all(batcher, ["a", "odd", "b"])
    assert isinstance(outcomes.pop("odd"), KeyError)
    assert outcomes == {"a": "ok:a", "b": "ok:b"}
    assert len(calls) == 1  # no retry: the others' work is done


async def test_an_error_about_no_item_fails_the_batch_without_splitting() -> None:
    calls: list[int] = []

    async def down(items: Sequence[str]) -> list[str]:
        calls.append(len(items))
        raise ConnectionError("database unreachable")

    batcher = Batcher(
        down,
        max_size=100,
        max_wait_s=0.05,
        splittable=lambda exc: not isinstance(exc, ConnectionError),
    )
    outcomes = await submit_all(batcher, [f"e{i}" for i in range(10)])
    assert all(isinstance(v, ConnectionError) for v in outcomes.values())
    assert calls == [10]


async def test_a_cancelled_leader_still_flushes_for_the_others() -> None:
    store = Store(delay_s=0.05)
    batcher = Batcher(store.flush, max_size=100, max_wait_s=0.05)
    results: list[str] = []

    async def follower(item: str) -> None:
        results.append(await batcher.submit(item))

    leader_scope = anyio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await batcher.submit("leader")

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await anyio.lowlevel.checkpoint()  # the leader has opened the batch
        for i in range(3):
            tg.start_soon(follower, f"f{i}")
        await anyio.sleep(0.01)
        leader_scope.cancel()
    assert sorted(results) == ["ok:f0", "ok:f1", "ok:f2"]
    # The cancelled caller's item was flushed too: the outcome of a cancelled request is
    # whatever its batch did, exactly as when it is cancelled during its own commit.
    assert sorted(store.committed) == ["f0", "f1", "f2", "leader"]


async def test_a_flush_that_hangs_fails_its_batch_after_the_timeout() -> None:
    async def hang(items: Sequence[str]) -> list[str]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    batcher = Batcher(hang, max_size=10, flush_timeout_s=0.05)
    with anyio.fail_after(5):
        outcomes = await submit_all(batcher, ["a", "b"])
    assert all(isinstance(v, FlushTimeout) for v in outcomes.values())


async def test_sequential_callers_each_get_a_batch() -> None:
    store = Store()
    batcher = Batcher(store.flush, max_size=10)
    assert await batcher.submit("a") == "ok:a"
    assert await batcher.submit("b") == "ok:b"
    assert store.calls == [["a"], ["b"]]


async def test_batches_fill_while_a_flush_runs() -> None:
    """Without any lingering, an item that comes while a flush runs waits for it to end, and
    so does every item after it: they go together in the next flush."""
    store = Store(delay_s=0.05)
    batcher = Batcher(store.flush, max_size=100)
    outcomes: dict[str, object] = {}

    async def one(item: str) -> None:
        outcomes[item] = await batcher.submit(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "first")
        await anyio.sleep(0.01)  # "first" is being flushed alone
        for i in range(10):
            tg.start_soon(one, f"e{i}")
            await anyio.sleep(0.001)
    assert outcomes == {i: f"ok:{i}" for i in ["first", *(f"e{i}" for i in range(10))]}
    assert [len(c) for c in store.calls] == [1, 10]


async def test_max_concurrent_flushes_overlap() -> None:
    store = Store(delay_s=0.05)
    batcher = Batcher(store.flush, max_size=2, max_concurrent=3)
    with anyio.fail_after(5):
        await submit_all(batcher, [f"e{i}" for i in range(12)])
    assert len(store.calls) == 6 and store.peak == 3


async def test_one_flush_at_a_time_by_default() -> None:
    store = Store(delay_s=0.01)
    batcher = Batcher(store.flush, max_size=2)
    with anyio.fail_after(5):
        await submit_all(batcher, [f"e{i}" for i in range(12)])
    assert store.peak == 1 and sorted(store.committed) == sorted(f"e{i}" for i in range(12))


async def test_lingering_only_under_load() -> None:
    """A lone item goes at once, however long `max_wait_s` is; once batches have company,
    leaders wait for more (here: until the batch is full)."""
    store = Store()
    batcher = Batcher(store.flush, max_size=4, max_wait_s=60)
    with anyio.fail_after(5):
        assert await batcher.submit("alone") == "ok:alone"  # no lingering when idle
        await submit_all(batcher, ["a", "b"])  # ready together: one batch, now busy
        await submit_all(batcher, ["c", "d", "e", "f"])  # lingers until full
    assert store.calls == [["alone"], ["a", "b"], ["c", "d", "e", "f"]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(Store().flush, max_size=0)
    with pytest.raises(ValueError):
        Batcher(Store().flush, max_concurrent=0)
    with pytest.raises(ValueError):
        Batcher(Store().flush, max_wait_s=-1)
