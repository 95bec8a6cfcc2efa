"""Mapping ``write_shard`` over the parts of a shard set, through the engine (``core.engine``).

``run_parts`` hands each part to the engine with its slice of the table (largest parts first,
so that the workers run out of work at about the same time), shows one progress bar of records
and shards, and returns the parts' results in part order. The engine runs them in this process,
in a local process pool, or as Ray tasks; ``write_shard`` is the same pure function of a part
everywhere, so the shards are the same bytes whichever ran it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa
from tqdm import tqdm

from vsotools.core.engine import Engine, Report, Task
from vsotools.shards.plan import Part
from vsotools.shards.write import PartResult, ShardJob, write_shard


def write_part(job: ShardJob, part: Part, rows: pa.Table, report: Report) -> PartResult:
    """``write_shard`` of ``part`` from its slice of the filtered table, where the engine runs it."""
    return write_shard(job, part, rows.to_pylist(), report)


def run_parts(
    engine: Engine,
    job: ShardJob,
    table: pa.Table,
    parts: Sequence[Part],
    *,
    workers: int,
    progress: bool,
) -> list[PartResult]:
    """Write ``parts`` (with ``workers`` local processes, or on the engine's cluster); results
    in part order."""
    total = sum(len(part.rows) for part in parts)

    def tasks() -> Iterator[Task]:
        # Taken as the engine has room, so only the parts in flight hold their slice.
        for part in sorted(parts, key=lambda part: -len(part.rows)):
            rows = table.take(list(part.rows))
            yield Task(part.name, (part, rows), size=len(part.rows))

    results: dict[str, PartResult] = {}
    with tqdm(total=total, unit="img", desc="shard", disable=not progress) as bar:
        for _, result in engine.map(
            write_part,
            tasks(),
            shared=(job,),
            workers=min(workers, len(parts)),
            progress=bar.update,
        ):
            results[result.name] = result
            bar.set_postfix_str(f"shards {len(results)}/{len(parts)}")
    return [results[part.name] for part in parts]
