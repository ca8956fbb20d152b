"""One kept thread pool for splitting a frame's work (pasting masks, drawing) over cores.

OpenCV and NumPy release the GIL in their loops, so a frame's per-detection calls can run in
several threads at once. Starting threads per frame would cost more than small frames' work, so
the pool is kept and grown on demand; the calling thread always does a share itself.
"""
from __future__ import annotations

import concurrent.futures
import threading

_pool: tuple[concurrent.futures.ThreadPoolExecutor, int] | None = None
_pool_lock = threading.Lock()


def worker_pool(count: int) -> concurrent.futures.ThreadPoolExecutor:
    """A kept pool of at least ``count`` threads (a larger pool replaces a smaller one; work
    already given to the old one still runs)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[1] < count:
            if _pool is not None:
                _pool[0].shutdown(wait=False)
            _pool = (concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="maskrt-frame"), count)
        return _pool[0]
