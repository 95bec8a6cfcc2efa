"""Helper processes (the shard writers' pool, the filter's word counters) that end with the
process that started them."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int) -> None:
    """Start a watchdog thread in this helper process that ends it once ``parent`` is gone
    (killed, out of memory), where a pool's process would otherwise wait for work for ever.

    ``parent`` must come from the parent itself (``os.getpid()`` there, passed along): had it
    died while this process was starting, ``os.getppid()`` here would already name whichever
    process adopted this one.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
