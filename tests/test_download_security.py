"""``vsotools fetch`` against hostile image URLs and heavy images: only allowed hosts are ever
contacted, whatever the parsers make of the URL, on the first request and on every redirect; and
memory stays bounded when many large images are decoded at once."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import vsotools_command
from datakit import outcomes, write_pairs
from PIL import Image

from vsotools.core.images import PixelBudget
from vsotools.fetch.download import host_allowed


def png(size: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


PHOTO = png(64, (10, 120, 200))


class Host(ThreadingHTTPServer):
    """A local image host that records every request and answers from ``routes``.

    A route is ``(status, headers, body)``; any other path gets ``PHOTO``, so that a request
    that should never have been made would be stored as a good image.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.requests: list[str] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Host

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        status, headers, body = self.server.routes.get(
            self.path, (200, {"Content-Type": "image/png"}, PHOTO)
        )
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two image hosts on 127.0.0.1: one a recipe allows, one nothing allows."""
    servers = (Host(), Host())
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_url_whose_host_parsers_disagree_on_is_never_contacted(cli, hosts, tmp_path):
    _, forbidden = hosts
    elsewhere = forbidden.netloc
    # To urllib.parse each of these is an image on live.staticflickr.com (the default
    # allow-list); requests connects to 127.0.0.1 for the first two.
    pairs = write_pairs(
        tmp_path / "pairs.jsonl",
        {
            "backslash": f"http://{elsewhere}\\@live.staticflickr.com/a.jpg",
            "two-backslashes": f"http://{elsewhere}\\\\@live.staticflickr.com/a.jpg",
            "userinfo": f"http://live.staticflickr.com@{elsewhere}/a.jpg",
            "tab": f"http://{elsewhere}\t@live.staticflickr.com/a.jpg",
            "encoded-backslash": f"http://{elsewhere}%5C@live.staticflickr.com/a.jpg",
            "plain": f"http://{elsewhere}/a.jpg",
        },
        text="a photo",
    )
    result = cli("fetch", "--pairs", pairs, "--out", tmp_path / "data")
    assert result.code == 0, result.err
    assert forbidden.requests == []
    assert outcomes(tmp_path / "data", failed_errors_only=True) == {
        "backslash": ("failed", "bad_url"),
        "two-backslashes": ("failed", "bad_url"),
        "userinfo": ("failed", "bad_url"),
        "tab": ("failed", "bad_url"),
        "encoded-backslash": ("failed", "bad_url"),
        "plain": ("failed", "host_not_allowed"),
    }


def test_every_redirect_is_checked_as_the_request_that_is_sent(cli, hosts, tmp_path):
    allowed, forbidden = hosts
    mine, elsewhere = allowed.netloc, forbidden.netloc
    hops = {
        # read as a URL on the allowed host by urllib.parse, fetched from the forbidden one
        "/backslash": f"http://{elsewhere}\\@{mine}/a.jpg",
        "/userinfo": f"http://{mine}@{elsewhere}/a.jpg",
        "/elsewhere": f"http://{elsewhere}/a.jpg",
        "/scheme-relative": f"//{elsewhere}/a.jpg",
        "/file": "file:///etc/passwd",
        "/twice": "/elsewhere",
        "/home": "/a.jpg",
    }
    for path, location in hops.items():
        allowed.routes[path] = (302, {"Location": location}, b"")
    images = {name.strip("/"): f"http://{mine}{name}" for name in hops}
    images["first-hop"] = f"http://{elsewhere}\\@{mine}/a.jpg"
    pairs = write_pairs(tmp_path / "pairs.jsonl", images, text="a photo")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[fetch]\nallowed_hosts = ["{mine}"]\n', encoding="utf-8")
    result = cli("fetch", "--recipe", recipe, "--pairs", pairs, "--out", tmp_path / "data")
    assert result.code == 0, result.err
    assert forbidden.requests == []
    assert outcomes(tmp_path / "data", failed_errors_only=True) == {
        "backslash": ("failed", "bad_url"),
        "userinfo": ("failed", "bad_url"),
        "elsewhere": ("failed", "host_not_allowed"),
        "scheme-relative": ("failed", "host_not_allowed"),
        "file": ("failed", "bad_url"),
        "twice": ("failed", "host_not_allowed"),
        "home": ("ok", None),
        "first-hop": ("failed", "bad_url"),
    }


def test_the_allow_list_reads_the_host_as_the_http_client_does():
    flickr = ["*.staticflickr.com"]
    assert host_allowed("https://live.staticflickr.com/1/2.jpg", flickr)
    assert host_allowed("HTTPS://LIVE.StaticFlickr.com:443/1/2.jpg", flickr)
    assert not host_allowed("http://127.0.0.1:9\\@live.staticflickr.com/a.jpg", flickr)
    assert not host_allowed("http://live.staticflickr.com@127.0.0.1/a.jpg", flickr)
    assert not host_allowed("http://live.staticflickr.com:99999/a.jpg", flickr)
    assert not host_allowed("http:///a.jpg", ["*"])
    assert host_allowed("http://[::1]:8080/a.jpg", ["::1:8080"])


# --- memory ---------------------------------------------------------------------------------

# 6300 x 6300 is within the default max_pixels (40,000,000); Pillow holds such an image in
# 4 bytes a pixel, 159 MB decoded, while one colour compresses it to 131 KB served.
BIG_SIDE = 6300
DECODED = BIG_SIDE * BIG_SIDE * 4


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads ru_maxrss in KiB, as Linux gives it")
@pytest.mark.parametrize(
    ("max_side", "count"),
    [
        ("0", 40),  # validated and stored as served: one whole decode each
        ("1000", 12),  # downscaled as well: a second decode, then a resize
    ],
)
def test_large_images_in_flight_at_once_do_not_each_take_their_decoded_size(
    hosts, tmp_path, max_side, count
):
    allowed, _ = hosts
    big = png(BIG_SIDE, (30, 60, 90))
    images = {}
    for i in range(count):
        allowed.routes[f"/big/{i}.png"] = (200, {"Content-Type": "image/png"}, big)
        images[str(i)] = f"http://{allowed.netloc}/big/{i}.png"
    pairs = write_pairs(tmp_path / "pairs.jsonl", images, text="a photo")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[fetch]\nallowed_hosts = ["{allowed.netloc}"]\n', encoding="utf-8")
    out = tmp_path / "data"
    args = ["fetch", "--recipe", recipe, "--pairs", pairs, "--out", out, "--max-side", max_side]
    code, peak = run_measured(args, tmp_path / "fetch.log")
    assert code == 0, (tmp_path / "fetch.log").read_text()
    assert list(outcomes(out, failed_errors_only=True).values()) == [("ok", None)] * count
    # At the default 32 downloads in flight, up to 32 of these images are decoded at once
    # without a bound: 32 x 159 MB = 5.1 GB (measured before the pixel budget: 4.3 to 4.7 GB,
    # and 3.3 GB for the 12 downscaled, which also copied each decode). Within the budget they
    # are decoded one at a time: a fetch of small images peaks at about 150 MB, these at about
    # 300 MB. The bound leaves room for two more decodes and is a sixth of the unbounded peak.
    assert peak < 250_000_000 + 3 * DECODED, f"peak RSS {peak / 1e6:.0f} MB"


def test_decodes_share_the_pixel_budget_and_a_larger_image_runs_alone():
    budget = PixelBudget(100)
    lock = threading.Lock()
    running: list[int] = []
    seen: list[tuple[int, int]] = []  # (pixels held, decodes running) as each decode starts

    def decode(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                running.append(pixels)
                seen.append((sum(running), len(running)))
            time.sleep(0.02)
            with lock:
                running.remove(pixels)

    threads = [
        threading.Thread(target=decode, args=(pixels,))
        for pixels in [30, 30, 30, 250, 30, 60, 10, 30, 30] * 3
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == len(threads)
    assert all(held <= 100 or count == 1 for held, count in seen)
    assert max(count for _, count in seen) >= 3  # small decodes do run side by side


def run_measured(args: list[str | Path], log: Path) -> tuple[int, int]:
    """Run ``vsotools ARGS`` as a subprocess; its exit code and peak resident memory in bytes."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [*vsotools_command(), *map(str, args)], stdout=output, stderr=subprocess.STDOUT
        )
        # wait4 reports the usage of this one child, not the maximum over every child so far.
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024  # Linux reports ru_maxrss in KiB
