"""Mapping ``write_shard`` over the parts of a shard set: in this process, or a process pool.

``run_parts`` writes the given parts with a local pool of spawned processes, each fed a few parts
at a time (its slice of the table), reporting to one progress bar; a worker whose parent dies
exits, leaving only a temporary file that the next run removes. To spread the work over several
machines, map ``shards.write.write_shard`` over the same parts with an existing engine instead.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from vsotools.core.processes import exit_with_parent
from vsotools.shards.errors import ShardError
from vsotools.shards.plan import Part
from vsotools.shards.write import PartResult, ShardJob, write_shard

_progress_queue: Any = None


def _init_worker(progress_queue: Any, parent: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # A worker left behind by a killed run leaves only a temporary file, which the next removes.
    exit_with_parent(parent)


class _QueueCounter:
    """``on_record`` for a worker process: reports to the parent's progress bar in batches."""

    def __init__(self, progress_queue: Any, part: str, every: int = 16) -> None:
        self.queue, self.part, self.every, self.pending = progress_queue, part, every, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.queue is not None:
            self.queue.put((self.part, self.pending))
        self.pending = 0


def _write_shard_in_worker(job: ShardJob, part: Part, table: pa.Table) -> PartResult:
    counter = _QueueCounter(_progress_queue, part.name)
    try:
        return write_shard(job, part, table.to_pylist(), counter)
    finally:
        counter.flush()


class _Progress:
    """The progress bar: records processed, shards done; exact in whatever order reports come."""

    def __init__(self, bar: tqdm, parts: Sequence[Part]) -> None:
        self.bar = bar
        self.sizes = {part.name: len(part.rows) for part in parts}
        self.reported: Counter[str] = Counter()
        self.done: set[str] = set()

    def records(self, part: str, n: int) -> None:
        if part not in self.done:  # a late report of a finished part is already counted
            self.reported[part] += n
            self.bar.update(n)

    def shard_done(self, part: str) -> None:
        self.done.add(part)
        self.bar.update(self.sizes[part] - self.reported[part])
        self.bar.set_postfix_str(f"shards {len(self.done)}/{len(self.sizes)}")


def run_parts(
    job: ShardJob, table: pa.Table, parts: Sequence[Part], *, workers: int, progress: bool
) -> list[PartResult]:
    """Write ``parts`` with ``workers`` processes (in this one when 1); results in part order."""
    total = sum(len(part.rows) for part in parts)
    results: dict[str, PartResult] = {}
    with tqdm(total=total, unit="img", desc="shard", disable=not progress) as bar:
        tracker = _Progress(bar, parts)
        if workers == 1 or len(parts) <= 1:
            for part in parts:
                records = table.take(list(part.rows)).to_pylist()
                on_record = functools.partial(tracker.records, part.name)
                results[part.name] = write_shard(job, part, records, on_record)
                tracker.shard_done(part.name)
        else:
            for result in _run_in_pool(job, table, parts, workers, tracker):
                results[result.name] = result
                tracker.shard_done(result.name)
    return [results[part.name] for part in parts]


def _run_in_pool(
    job: ShardJob, table: pa.Table, parts: Sequence[Part], workers: int, tracker: _Progress
) -> Iterator[PartResult]:
    """Results of ``parts`` as the worker processes finish them."""
    # spawn, not fork: the parent may hold threads (Arrow's pool, s3fs's event loop).
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    # Largest parts first, so that the processes run out of work at about the same time.
    todo = iter(sorted(parts, key=lambda part: -len(part.rows)))
    pending: set[Future[PartResult]] = set()
    pool = ProcessPoolExecutor(
        min(workers, len(parts)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress_queue, os.getpid()),
    )

    def submit_next() -> None:
        # A few parts in flight at a time: each carries its slice of the table.
        part = next(todo, None)
        if part is not None:
            rows = table.take(list(part.rows))
            pending.add(pool.submit(_write_shard_in_worker, job, part, rows))

    try:
        for _ in range(2 * workers):
            submit_next()
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress_queue, tracker)
            for future in done:
                yield future.result()
                submit_next()
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        raise ShardError(
            "a shard writer process died (out of memory? killed?); run the shard stage again to"
            " finish the set"
        ) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _drain(progress_queue: Any, tracker: _Progress) -> None:
    while True:
        try:
            part, n = progress_queue.get_nowait()
        except queue.Empty:
            return
        tracker.records(part, n)
