"""Samples per second of `vsotools shard` against the floor: Pillow decoding, resizing, encoding.

Generates photo-like JPEGs of 500x375 to 1024x768 pixels and a filtered.parquet for them (kept
in --data and reused), then, pinned to --cores CPUs, alternates for --repeats rounds:

- floor: the same images through a tight loop of ``images.load_rgb`` (with JPEG draft mode),
  ``resize_shorter_side`` and ``encode_jpeg``, in one process per core, timed once the processes
  are up (nothing else: no tar, no checksum, no Parquet, no start-up);
- naive floor: the same loop decoding at full size (no draft mode), for reference;
- shard: the real command, ``vsotools shard DATA --out TMP --workers CORES``, timed from the
  start of the process to its exit (interpreter start-up, planning and the manifest included).

Prints the median samples/s of each and the ratio floor/shard (the goal is at most 1.3), and the
same ratio in CPU seconds per sample, which other processes competing for the cores disturb less.

    .venv/bin/python benchmarks/shard_throughput.py --images 3000 --cores 2
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

from vsotools.core import images
from vsotools.core.config import FetchConfig
from vsotools.core.schema import FILTERED_SCHEMA, LABEL_NAMES

MAX_PIXELS = FetchConfig().max_pixels


def make_image(seed: int) -> bytes:
    rng = random.Random(seed)
    width = rng.randint(500, 1024)
    height = min(768, max(375, round(width * rng.choice([0.75, 0.5625, 1.0, 1.33]))))
    if rng.random() < 0.3:
        width, height = height, width  # portrait
    noise = Image.effect_noise((width, height), rng.uniform(30, 80))
    texture = noise.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 2.0)))
    gradient = Image.linear_gradient("L").rotate(rng.randint(0, 359)).resize((width, height))
    radial = Image.radial_gradient("L").resize((width, height))
    picture = Image.merge("RGB", (Image.blend(gradient, texture, 0.5), texture, radial))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=rng.choice([80, 85, 90, 95]))
    return buffer.getvalue()


def make_dataset(root: Path, count: int, workers: int) -> list[Path]:
    """The dataset folder with ``count`` images, created once and reused."""
    paths = [root / "images" / f"{i:06d}.jpg" for i in range(count)]
    if (root / "filtered.parquet").exists() and all(p.exists() for p in paths):
        return paths
    (root / "images").mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        images_made = pool.imap(make_image, range(count), chunksize=16)
        for path, data in zip(paths, images_made, strict=True):
            path.write_bytes(data)
    rows = []
    for i, path in enumerate(paths):
        label = i % 3 != 0
        rows.append(
            {
                "photo_id": str(10_000_000 + i),
                "text": f"benchmark photo number {i} with a few words of text",
                "words": 9,
                "label": int(label),
                "label_name": LABEL_NAMES[label],
                "split": "test" if i % 5 == 0 else "train",
                "anps": ["happy_dog" if label else "sad_dog"],
                "anp_scores": [1.5 if label else -1.2],
                "owner": f"{i % 97}@N00",
                "license": "4",
                "image_url": f"https://example.org/{i}.jpg",
                "image_path": str(path.relative_to(root)),
                "sha256": None,
            }
        )
    table = pa.Table.from_pylist(rows, schema=FILTERED_SCHEMA)
    pq.write_table(table, root / "filtered.parquet")
    return paths


def reencode(paths: list[str], size: int, draft: bool) -> float:
    """CPU seconds this process spent re-encoding ``paths``."""
    start = time.process_time()
    for path in paths:
        data = Path(path).read_bytes()
        if draft:
            picture = images.load_rgb(data, shorter_side_at_least=size, max_pixels=MAX_PIXELS)
        else:
            picture = images.load_rgb(data, max_pixels=MAX_PIXELS)
        images.encode_jpeg(images.resize_shorter_side(picture, size), 90)
    return time.process_time() - start


def floor(paths: list[Path], cores: int, size: int, draft: bool) -> tuple[float, float]:
    """Wall and CPU seconds for ``cores`` processes to re-encode ``paths``, once they are up."""
    chunks = [[str(p) for p in paths[i::cores]] for i in range(cores)]
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.starmap(reencode, [([str(paths[0])], size, draft)] * cores)  # warm up
        start = time.perf_counter()
        cpu = pool.starmap(reencode, [(chunk, size, draft) for chunk in chunks])
        return time.perf_counter() - start, sum(cpu)


def shard_command(data: Path, cores: int, size: int) -> tuple[float, float]:
    """Wall and CPU seconds of one ``vsotools shard`` run (its workers included), start to exit."""
    out = Path(tempfile.mkdtemp(prefix="vsotools-bench-"))
    exe = Path(sys.executable).with_name("vsotools")
    command = [str(exe), "-q", "shard", str(data), "--out", str(out / "set")]
    command += ["--workers", str(cores), "--image-size", str(size)]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu
    finally:
        shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vsotools-bench")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)  # children inherit it
    print(f"pinned to CPUs {cpus}; {os.cpu_count()} on the machine")
    data = args.data / f"n{args.images}"
    paths = make_dataset(data, args.images, args.cores)
    megapixels = sum(Image.open(p).width * Image.open(p).height for p in paths) / 1e6
    print(f"{len(paths)} JPEGs, {megapixels / len(paths):.2f} Mpx each on average, in {data}")

    runs: dict[str, list[tuple[float, float]]] = {"floor": [], "vsotools shard": []}
    for _ in range(args.repeats):
        runs["floor"].append(floor(paths, args.cores, args.image_size, draft=True))
        runs["vsotools shard"].append(shard_command(data, args.cores, args.image_size))
    runs["naive floor"] = [floor(paths, args.cores, args.image_size, draft=False)]
    rate, cpu_ms = {}, {}
    for name, measured in runs.items():
        rate[name] = len(paths) / statistics.median(wall for wall, _ in measured)
        cpu_ms[name] = 1000 * statistics.median(cpu for _, cpu in measured) / len(paths)
        walls = ", ".join(f"{wall:.2f}" for wall, _ in measured)
        print(
            f"{name:<15} {rate[name]:7.1f} samples/s {cpu_ms[name]:6.2f} CPU ms/sample"
            f"   (wall: {walls} s)"
        )
    paired = statistics.median(
        shard[0] / floor_[0]
        for floor_, shard in zip(runs["floor"], runs["vsotools shard"], strict=True)
    )
    print(
        f"ratio floor / vsotools shard: {rate['floor'] / rate['vsotools shard']:.2f} in samples/s"
        f" (goal <= 1.3; {paired:.2f} as the median of each round's pair),"
        f" {cpu_ms['vsotools shard'] / cpu_ms['floor']:.2f} in CPU per sample"
    )
    print(f"load average after the runs: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
