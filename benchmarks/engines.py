"""Benchmark: the local engine against the Ray engine on this machine, in one run.

Serves N generated JPEGs (500x375, about 46 KB each) from a local HTTP/1.1 server in its own
process, writes a pairs file of their URLs, then runs the same work with each engine:

- ``fetch --pairs``: every image downloaded, checked, hashed and stored, records written;
- ``shard``: the filtered dataset (filtered once, locally) re-encoded into tar shards.

The Ray engine runs on a cluster of this machine started once (``ray.init(num_cpus=CORES)``);
its start-up is timed and reported apart, and its throughput is measured past it, so that the
ratio (Ray / local, images per second) is what a long run on a cluster sees per node. The
outputs of both engines are compared byte for byte.

    python benchmarks/engines.py --images 10000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from PIL import Image

from vsotools.core.config import Recipe
from vsotools.dataset.filter import filter_dataset
from vsotools.fetch.stage import fetch
from vsotools.shards.stage import write_shards

DISTINCT = 200


def make_jpeg(rng: random.Random) -> bytes:
    coarse = Image.frombytes("RGB", (32, 24), rng.randbytes(32 * 24 * 3))
    coarse = coarse.resize((500, 375), Image.Resampling.BICUBIC)
    grain = Image.frombytes("L", (500, 375), rng.randbytes(500 * 375)).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(coarse, grain, 0.06).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    images: ClassVar[list[bytes]] = []

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        # Every URL serves its own bytes: a few bytes after the end-of-image marker.
        body = self.images[int(name) % DISTINCT] + f"\n{name}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(url_out) -> None:
    rng = random.Random(0)
    _Handler.images = [make_jpeg(rng) for _ in range(DISTINCT)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.request_queue_size = 512
    url_out.send(f"http://127.0.0.1:{server.server_address[1]}/")
    server.serve_forever()


def write_pairs(path: Path, url: str, n: int) -> None:
    words = ("sunny", "beach", "walk", "friends", "blue", "sky", "sad", "rain", "grey", "alone")
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(words[(i + k) % len(words)] for k in range(6 + i % 9)) + f" {i}"
            label = ("positive", "negative")[i % 2]
            row = {"id": f"{i:07d}", "text": text, "label": label, "image": f"{url}{i}.jpg"}
            fh.write(json.dumps(row) + "\n")


def digest(root: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for path in sorted(root.glob(pattern)):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = args.work or Path(tempfile.mkdtemp(prefix="vsotools-engines-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(send,), daemon=True)
    server.start()
    url = receive.recv()
    pairs = work / "pairs.jsonl"
    write_pairs(pairs, url, args.images)

    base = {
        "fetch.pairs": str(pairs),
        "fetch.allowed_hosts": ["127.0.0.1:*"],
        "shard.workers": args.cores,
        "filter.workers": args.cores,
    }
    local = Recipe().override(base)
    on_ray = Recipe().override({**base, "engine.kind": "ray"})

    import ray

    startup = timed(lambda: ray.init(num_cpus=args.cores, logging_level=logging.WARNING))
    rows = []
    try:
        # Fetch, each engine into its own folder; then the same filtered input for both shards.
        fetch_local = timed(lambda: fetch(local, work / "local"))
        fetch_ray = timed(lambda: fetch(on_ray, work / "ray"))
        same_records = digest(work / "local", "metadata/*") == digest(work / "ray", "metadata/*")
        same_images = digest(work / "local", "images/**/*") == digest(work / "ray", "images/**/*")
        filter_dataset(work / "local", local)
        kept = json.loads((work / "local" / "filter-report.json").read_text())["kept"]
        shard_local = timed(lambda: write_shards(local, work / "local", work / "shards-local"))
        shard_ray = timed(lambda: write_shards(on_ray, work / "local", work / "shards-ray"))
        same_shards = digest(work / "shards-local", "*.tar") == digest(work / "shards-ray", "*.tar")
    finally:
        ray.shutdown()
        server.terminate()
    rows = [
        ("fetch --pairs", args.images, fetch_local, fetch_ray, same_records and same_images),
        ("shard", kept, shard_local, shard_ray, same_shards),
    ]
    print(f"{args.images:,} pairs, {args.cores} cores; Ray start-up (ray.init): {startup:.2f} s")
    print(f"{'stage':<15}{'items':>8}{'local/s':>10}{'ray/s':>10}{'ray/local':>11}  identical")
    for name, items, here, there, same in rows:
        print(
            f"{name:<15}{items:>8,}{items / here:>10.1f}{items / there:>10.1f}"
            f"{here / there:>10.2f}x  {'yes' if same else 'NO'}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
