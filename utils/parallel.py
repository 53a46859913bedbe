"""Running a function over a large collection on a thread pool, in order, with a bounded number of items in flight."""

from __future__ import annotations

from collections import deque


def ordered_map(pool, fn, items, ahead: int):
    """Yield fn(item) for each of *items* in order, run on the executor *pool*, with at most *ahead* items submitted
    and not yet yielded. Executor.map submits every item at once: a future of ~1.6 kB an item held until the end
    (160 MB for a collection of 100k photos, 200 times the result kept of each). On an error the items not started
    are cancelled, as Executor.map does."""
    pending = deque()
    try:
        for item in items:
            if len(pending) >= ahead:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
