"""The analysis' agreement blocks as Ray tasks (``analysis.agreement``' ``map_blocks``), for the sweep's analysis
stage on a cluster: the ``analysis`` package never imports Ray, so the mapping lives here.

Each block (one site's slices of a few cases, every member's packed masks) is a task with one CPU; at most
``window`` run at once and the results come back in the blocks' order, so that the matrices sum the same way
on every run and the driver holds at most ``window`` blocks' sums.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator


def ray_block_map(window: int | None = None) -> Callable[[Callable, Iterable], Iterator] | None:
    """A ``map_blocks`` that runs each block as a Ray task; None when this process is not connected to Ray
    (``oodsweep analyze`` then computes in-process)."""
    import sys

    ray = sys.modules.get("ray")  # not imported: not connected (and `oodsweep analyze` stays without Ray)
    if ray is None or not ray.is_initialized():
        return None

    def run(fn: Callable, tasks: Iterable) -> Iterator:
        remote = ray.remote(num_cpus=1, max_retries=1)(fn)
        n = window or max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        for task in tasks:
            pending.append(remote.remote(task))
            if len(pending) >= n:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    return run
