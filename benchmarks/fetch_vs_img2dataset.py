"""Benchmark: ``vsotools fetch --pairs`` against img2dataset 1.47 on the same local image server.

Serves N generated JPEGs (500x375, about 48 KB each) from a local HTTP/1.1 keep-alive server that
never drops a connection, then times, in the same run and one after the other:

- ``vsotools fetch --pairs pairs.jsonl`` (the image column holds the URLs): every image is
  downloaded, checked (status, type, size, decoded at 1/8 scale, pixel bounds), hashed and
  stored as served, with its record in Parquet;
- ``img2dataset`` with its defaults (resize to 256 with border, re-encode) and with
  ``--resize_mode no`` (download, check, store), 2 processes, 32 threads each, 4 shards.

Reports images per second (wall), CPU milliseconds per image (user + system of the process and
its children) and peak RSS; vsotools also at 4N images, to show that its memory stays flat.

img2dataset pins webdataset < 0.3, so it lives in its own virtual environment: ``--img2dataset``
names its executable; by default ``.venv-img2dataset`` at the repository root, created (with
``pip install img2dataset==1.47.0``) when missing.

    python benchmarks/fetch_vs_img2dataset.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMG2DATASET_VERSION = "1.47.0"


@dataclass
class Run:
    name: str
    images: int
    ok: int
    wall: float
    cpu: float
    max_rss_mb: float

    @property
    def rate(self) -> float:
        return self.ok / self.wall

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu / max(self.ok, 1)


# --- the images and their server ------------------------------------------------------------


def make_jpeg(rng: random.Random) -> bytes:
    """A 500x375 JPEG of smooth colour fields with grain: about 45 KB at quality 85."""
    coarse = Image.frombytes("RGB", (32, 24), rng.randbytes(32 * 24 * 3))
    coarse = coarse.resize((500, 375), Image.Resampling.BICUBIC)
    grain = Image.frombytes("L", (500, 375), rng.randbytes(500 * 375)).convert("RGB")
    buffer = io.BytesIO()
    Image.blend(coarse, grain, 0.06).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_images(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    distinct = [make_jpeg(rng) for _ in range(min(n, 200))]
    # Every URL serves its own bytes: a few bytes after the end-of-image marker make each file
    # unique (decoders ignore them).
    return [distinct[i % len(distinct)] + f"\n{i}".encode() for i in range(n)]


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def __init__(self, images: list[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _ImageHandler)
        self.images = images
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"


class _ImageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for
    # the client's delayed ACK of the headers (40 ms on Linux), as no real image host lets it.
    disable_nagle_algorithm = True
    server: ImageServer

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if not name.isdigit() or int(name) >= len(self.server.images):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.images[int(name)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve_images(n: int, url_out: multiprocessing.connection.Connection) -> None:
    """Serve ``n`` generated images until killed (run in its own process, so that neither the
    images nor the serving count in the measured tools' memory)."""
    server = ImageServer(make_images(n))
    url_out.send(server.url)
    server.serve_forever()


# --- running the tools ----------------------------------------------------------------------


def measure(name: str, command: list[str], images: int, count_ok, env: dict | None = None) -> Run:
    """Run ``command`` to completion; wall time, CPU and peak RSS of it and its children."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # wait4 reports the child with the descendants it waited for (img2dataset's workers).
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"{name} failed ({process.returncode}):\n{stderr[-3000:]}")
    return Run(
        name=name,
        images=images,
        ok=count_ok(),
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        max_rss_mb=usage.ru_maxrss / 1024,
    )


def run_vsotools(work: Path, url: str, n: int, concurrency: int) -> Run:
    pairs = work / f"pairs-{n}.jsonl"
    with pairs.open("w") as fh:
        for i in range(n):
            row = {"id": str(i), "text": "a photo", "label": "positive", "image": f"{url}{i}.jpg"}
            fh.write(json.dumps(row) + "\n")
    out = work / f"vsotools-{n}"
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("vsotools")
    command = [
        *([str(exe)] if exe.exists() else [sys.executable, "-m", "vsotools"]),
        "-q",
        "fetch",
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--concurrency",
        str(concurrency),
        "--set",
        "fetch.allowed_hosts=127.0.0.1",
    ]

    def count_ok() -> int:
        return json.loads((out / "fetch-report.json").read_text())["downloaded"]

    return measure(f"vsotools fetch --pairs (concurrency {concurrency})", command, n, count_ok)


def run_img2dataset(exe: Path, work: Path, url: str, n: int, resize: bool) -> Run:
    urls = work / f"urls-{n}.txt"
    urls.write_text("".join(f"{url}{i}.jpg\n" for i in range(n)))
    out = work / f"img2dataset-{n}-{'resize' if resize else 'noresize'}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        str(exe),
        "--url_list",
        str(urls),
        "--input_format",
        "txt",
        "--output_folder",
        str(out),
        "--output_format",
        "files",
        "--processes_count",
        "2",
        "--thread_count",
        "32",
        "--number_sample_per_shard",
        str(max(1, n // 4)),
        "--timeout",
        "10",
    ]
    if not resize:
        command += ["--resize_mode", "no"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # no update check over the network

    def count_ok() -> int:
        return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))

    name = "img2dataset " + ("(defaults: resize 256, re-encode)" if resize else "--resize_mode no")
    return measure(name, command, n, count_ok, env)


def img2dataset_executable(given: Path | None) -> Path:
    if given is not None:
        exe = given / "bin" / "img2dataset" if given.is_dir() else given
        if not exe.exists():
            raise SystemExit(f"{exe}: no img2dataset executable there")
        return exe
    venv = REPO / ".venv-img2dataset"
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {venv} with img2dataset=={IMG2DATASET_VERSION} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={IMG2DATASET_VERSION}"],
            check=True,
        )
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="N (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="vsotools downloads in flight")
    parser.add_argument(
        "--img2dataset", type=Path, help="img2dataset executable or virtual environment"
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not run vsotools at 4N")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    exe = img2dataset_executable(args.img2dataset)
    n = args.images
    served = n if args.skip_memory else 4 * n
    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=serve_images, args=(served, send), daemon=True)
    server.start()
    url = receive.recv()
    print(f"serving {served:,} JPEGs of ~{len(make_jpeg(random.Random(0))) // 1000} KB at {url}")
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}\n")
    with tempfile.TemporaryDirectory(prefix="fetch-bench-") as tmp:
        work = Path(tmp)
        runs = [
            run_img2dataset(exe, work, url, n, resize=True),
            run_img2dataset(exe, work, url, n, resize=False),
            run_vsotools(work, url, n, args.concurrency),
        ]
        if not args.skip_memory:
            runs.append(run_vsotools(work, url, 4 * n, args.concurrency))
    server.terminate()

    print(
        f"{'tool':<48}{'images':>8}{'ok':>7}{'wall s':>8}{'img/s':>8}{'CPU ms/img':>12}{'RSS MB':>8}"
    )
    for run in runs:
        print(
            f"{run.name:<48}{run.images:>8}{run.ok:>7}{run.wall:>8.2f}{run.rate:>8.0f}"
            f"{run.cpu_ms_per_image:>12.2f}{run.max_rss_mb:>8.0f}"
        )
    ours = runs[2]
    print()
    for reference in runs[:2]:
        print(f"vsotools / {reference.name}: {ours.rate / reference.rate:.2f}x images/s")
    if not args.skip_memory:
        print(
            f"vsotools peak RSS: {runs[2].max_rss_mb:.0f} MB at {n:,} images,"
            f" {runs[3].max_rss_mb:.0f} MB at {4 * n:,}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps([{**run.__dict__, "rate": run.rate} for run in runs], indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
