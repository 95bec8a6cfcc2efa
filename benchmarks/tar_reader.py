"""Reading shards: vsotools' tar reader against webdataset's, in one run.

vsotools writes shards with Python's ``tarfile`` (``vsotools.shards.write``, GNU headers) and
reads them with a small reader of its own (``vsotools.shards.tar_reader.read_shard``: a few slices
per header, checksums checked), which the training loader and ``vsotools verify`` share. This
measures whether the reader earns its place: samples per second of grouping the members of the
same shards into samples, with the member bytes in memory and no decoding, for

- webdataset: ``tariterators.tar_file_expander`` + ``group_by_keys`` (the reference);
- Python's ``tarfile`` streaming (``r|``), grouped by key;
- vsotools: ``read_shard`` (the comparison with the manifest is the loader's, not run here),
  and with images skipped over (what a text model reads).

The shards are written here with webdataset's ``TarWriter`` (GNU format, mtime 0, no encoding),
not with vsotools' writer: 256-pixel JPEGs of generated pictures, short texts, and the member
kinds (``jpg``, ``txt``, ``json``, ``cls``) of a ``vsotools shard`` sample, so the readers see
the same layout of GNU headers and member bytes.

    .venv/bin/python benchmarks/tar_reader.py [--samples 4000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from vsotools.shards.tar_reader import read_shard


def write_shards(folder: Path, samples: int, per_shard: int = 500) -> list[Path]:
    rng = random.Random(0)
    paths = []
    for start in range(0, samples, per_shard):
        path = folder / f"train-{start // per_shard:06d}.tar"
        with path.open("wb") as fh:
            writer = TarWriter(fh, encoder=False, mtime=0, format="GNU_FORMAT")
            for i in range(start, min(start + per_shard, samples)):
                image = Image.effect_noise((256 + rng.randint(0, 128), 256), 40).convert("RGB")
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                writer.write(
                    {
                        "__key__": str(10**9 + i),
                        "jpg": buffer.getvalue(),
                        "txt": f"a happy day by the sea number {i}".encode(),
                        "json": b'{"label": "positive"}',
                        "cls": b"1",
                    }
                )
            writer.close()
        paths.append(path)
    return paths


def webdataset_reader(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        with path.open("rb") as stream:
            for _ in group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])):
                count += 1
    return count


def tarfile_reader(paths: list[Path]) -> int:
    count = 0
    for path in paths:
        key, members = None, {}
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                name, _, extension = member.name.partition(".")
                if name != key and key is not None:
                    count += 1
                    members = {}
                key = name
                handle = tar.extractfile(member)
                members[extension] = handle.read() if handle else b""
        count += key is not None
    return count


def vsotools_reader(paths: list[Path], skip_images: bool = False) -> int:
    return sum(1 for path in paths for _ in read_shard(str(path), skip_images=skip_images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_shards(Path(folder), args.samples)
        size = sum(p.stat().st_size for p in paths) / 1e6
        readers = {
            "webdataset (reference)": webdataset_reader,
            "tarfile, streaming": tarfile_reader,
            "vsotools read_shard": vsotools_reader,
            "vsotools read_shard, images skipped": lambda p: vsotools_reader(p, True),
        }
        rates = {}
        for name, read in readers.items():
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                assert read(paths) == args.samples, name
                seconds.append(time.perf_counter() - started)
            rates[name] = args.samples / statistics.median(seconds)
    reference = rates["webdataset (reference)"]
    print(f"{args.samples} samples in {len(paths)} shards, {size:.0f} MB, median of {args.repeats}")
    print(f"{'':40}{'samples/s':>11}{'x webdataset':>14}")
    for name, value in rates.items():
        print(f"{name:40}{value:>11,.0f}{value / reference:>14.2f}")


if __name__ == "__main__":
    main()
