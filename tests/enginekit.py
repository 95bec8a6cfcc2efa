"""What the engine tests share: a local HTTP image server and a pairs file of its images."""

from __future__ import annotations

import contextlib
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

_WORDS = ("sunny", "beach", "walk", "friends", "blue", "sky", "sad", "rain", "grey", "alone")


def make_images(n: int, seed: int = 3) -> list[bytes]:
    """``n`` distinct JPEGs of a few sizes (each file its own bytes)."""
    rng = random.Random(seed)
    images = []
    for i in range(n):
        size = ((320, 240), (500, 375), (240, 400))[i % 3]
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=80)
        images.append(buffer.getvalue() + f"\n{i}".encode())
    return images


class ImageServer(ThreadingHTTPServer):
    """Serves ``/N.jpg`` from a list of images; ``/missing-N.jpg`` is a 404, ``/page-N.jpg``
    HTML. ``latency`` seconds before each image makes a part take a while."""

    daemon_threads = True

    def __init__(self, images: list[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images = images
        self.latency = 0.0
        self.served = 0
        """Images served so far."""
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that closed its keep-alive connection is no news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: ImageServer

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if name.isdigit() and int(name) < len(self.server.images):
            time.sleep(self.server.latency)
            self.server.served += 1
            body, kind, status = self.server.images[int(name)], "image/jpeg", 200
        elif name.startswith("page-"):
            body, kind, status = b"<html>not an image</html>", "text/html", 200
        else:
            body, kind, status = b"", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def image_server(images: list[bytes]) -> Iterator[ImageServer]:
    server = ImageServer(images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def write_pairs(path: Path, url: str, n: int) -> Path:
    """A JSONL pairs file of ``n`` image URLs on the server (every 25th missing, every 40th an
    HTML page), texts of 2 to 12 words (some too short for the filter), labels alternating."""
    lines = []
    for i in range(n):
        image = f"{url}{i}.jpg"
        if i % 25 == 7:
            image = f"{url}missing-{i}.jpg"
        elif i % 40 == 11:
            image = f"{url}page-{i}.jpg"
        words = 2 + (i * 7) % 11
        text = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(words)) + f" n{i % 50}"
        label = ("positive", "negative", "neutral")[i % 3 if i % 9 == 0 else i % 2]
        lines.append(json.dumps({"id": f"p{i:05d}", "text": text, "label": label, "image": image}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def file_bytes(root: Path, pattern: str = "**/*") -> dict[str, bytes]:
    """Relative name -> bytes of every file under ``root`` matching ``pattern``."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()
    }
