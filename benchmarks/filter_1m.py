"""Benchmark: `vsotools filter` on synthetic photo records: wall time and peak memory.

Generates N photo records (default 1,000,000) shaped like a Flickr crawl (descriptions of 0 to
200 words with HTML and URLs, about a third empty, bulk uploads, repeated images) in Parquet parts
as fetch writes them, then runs, each in a fresh process:

- `filter`: vsotools.dataset.filter.filter_dataset with the paper's recipe;
- `reference`: the obvious pandas approach: read all records into one DataFrame and count words
  with nltk's TweetTokenizer row by row (no labels, no split, no output);
- `floor`: the same word counting alone, on the texts held in a list, in one process.

Prints the wall time and peak RSS of each and the ratios filter / reference.

    .venv/bin/python benchmarks/filter_1m.py [--rows 1000000] [--workdir /tmp/vso-filter-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

VOCAB = (
    "the a sunset beach walk with friends under blue sky today my dog cat happy sad old city "
    "night light street tree flower river mountain cloud rain snow winter summer love beautiful "
    "dark lonely storm quiet morning evening family trip holiday photo camera nikon canon"
).split()
ANPS = ["beautiful_sky", "happy_dog", "dark_night", "lonely_tree", "sad_rain", "old_city"]
SCORES = {"beautiful_sky": 2.0, "happy_dog": 1.5, "dark_night": -1.41, "lonely_tree": -1.1,
          "sad_rain": -1.3, "old_city": 0.3}  # fmt: skip


def generate(workdir: Path, rows: int, part_rows: int = 100_000) -> Path:
    from vsotools.core import schema

    data = workdir / "data"
    marker = data / "metadata" / f".rows-{rows}"
    if marker.exists():
        return data
    (data / "metadata").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for part, start in enumerate(range(0, rows, part_rows)):
        records = []
        for i in range(start, min(rows, start + part_rows)):
            n = 0 if rng.random() < 0.35 else int(rng.expovariate(1 / 40))
            words = [rng.choice(VOCAB) for _ in range(n)]
            if words and rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), "<a href='http://x.org/p'>link</a>")
            if words and rng.random() < 0.2:
                words.append("http://flic.kr/p/" + str(i))
            bulk = rng.random() < 0.05
            records.append(
                {
                    "photo_id": str(10_000_000_000 + i),
                    "source": "flickr",
                    "anps": rng.sample(ANPS, 1 if rng.random() < 0.9 else 2),
                    "label": None,
                    "title": "IMG_" + str(i),
                    "description": "bulk upload of my holiday photos" if bulk else " ".join(words),
                    "tags": " ".join(rng.sample(VOCAB, 3)),
                    "owner": f"{rng.randrange(rows // 20)}@N0{i % 9}",
                    "owner_name": "someone",
                    "license": str(rng.randrange(11)),
                    "date_upload": 1_300_000_000 + i,
                    "date_taken": "2014-05-01 12:00:00",
                    "image_url": f"https://live.staticflickr.com/65535/{i}_abc_z.jpg",
                    "image_path": f"images/{i // 5000:05d}/{i}.jpg",
                    "status": "ok" if rng.random() < 0.95 else "failed",
                    "error": None,
                    "sha256": f"{rng.randrange(rows * 50):064x}",
                    "image_bytes": 40_000,
                    "width": 640,
                    "height": 480,
                }
            )
        table = pa.Table.from_pylist(records, schema=schema.PHOTO_SCHEMA)
        pq.write_table(table, data / "metadata" / f"part-{part:05d}.parquet")
    (workdir / "anps.csv").write_text(
        "anp,adjective,noun,sentiment\n"
        + "".join(f"{a},{a.split('_')[0]},{a.split('_')[1]},{s}\n" for a, s in SCORES.items())
    )
    marker.touch()
    return data


def run_filter(workdir: Path) -> dict:
    from vsotools.core.config import Recipe
    from vsotools.dataset.filter import filter_dataset
    from vsotools.dataset.folder import DatasetFolder

    recipe = Recipe().override({"anps.manifest": str(workdir / "anps.csv")})
    # An earlier run's output would be current for these inputs and left as it is: measured is
    # the filtering, so its report goes first.
    DatasetFolder(workdir / "data").report_file("filter").unlink(missing_ok=True)
    report = filter_dataset(workdir / "data", recipe)
    assert not report.already_complete
    return {"kept": report.kept, "input": report.input}


def run_reference(workdir: Path) -> dict:
    import pandas as pd
    from nltk.tokenize import TweetTokenizer

    tokenizer = TweetTokenizer()
    frame = pd.read_parquet(workdir / "data" / "metadata")
    counts = (
        frame["description"]
        .fillna("")
        .map(lambda t: sum(1 for w in tokenizer.tokenize(t) if any(c.isalnum() for c in w)))
    )
    return {"input": len(frame), "in_bounds": int(((counts >= 5) & (counts <= 150)).sum())}


def run_floor(workdir: Path) -> dict:
    from vsotools.core.text import count_words

    texts = pq.read_table(workdir / "data" / "metadata", columns=["description"])
    texts = [t or "" for t in texts.column("description").to_pylist()]
    started = time.perf_counter()
    total = sum(count_words(t) for t in texts)
    return {"words": total, "count_seconds": round(time.perf_counter() - started, 2)}


def measure(mode: str, workdir: Path) -> dict:
    """Run one mode in a fresh process; its wall time, and the peak RSS it reports of itself."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--workdir", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {"mode": mode, "seconds": round(time.perf_counter() - started, 2), **json.loads(out)}


def _peaks() -> dict:
    """Peak RSS of this process and of the largest worker process it started, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mb": round(own), "worker_peak_mb": round(workers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vso-filter-bench"))
    parser.add_argument("--child", choices=("filter", "reference", "floor"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = {"filter": run_filter, "reference": run_reference, "floor": run_floor}[args.child]
        print(json.dumps({**run(args.workdir), **_peaks()}))
        return

    started = time.perf_counter()
    generate(args.workdir, args.rows)
    print(f"generated {args.rows:,} records in {time.perf_counter() - started:.0f} s")
    results = [measure(mode, args.workdir) for mode in ("floor", "filter", "reference")]
    for r in results:
        print(json.dumps(r))
    by = {r["mode"]: r for r in results}
    print(
        f"filter / reference: time {by['filter']['seconds'] / by['reference']['seconds']:.2f}x,"
        f" peak memory {by['filter']['peak_mb'] / by['reference']['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
