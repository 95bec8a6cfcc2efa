"""The image downloader against a real local HTTP server: retries, refusals, checks, downscaling."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from vsotools.core.config import FetchConfig
from vsotools.fetch.download import Downloader, DownloadSettings, check_image, host_allowed


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


PHOTO = jpeg(800, 600)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: ClassVar[Counter[str]] = Counter()

    def do_GET(self) -> None:
        Handler.hits[self.path] += 1
        n = Handler.hits[self.path]
        if self.path == "/photo.jpg":
            self.answer(200, "image/jpeg", PHOTO)
        elif self.path == "/flaky.jpg":  # 500, then 429, then the photo
            if n == 1:
                self.answer(500, "text/html", b"oops")
            elif n == 2:
                self.answer(429, "text/html", b"slow down")
            else:
                self.answer(200, "image/jpeg", PHOTO)
        elif self.path == "/odd-retry.jpg":  # a Retry-After in digits that int() refuses
            if n == 1:
                self.send_response(503)
                self.send_header("Retry-After", "\u00b2")  # "²", sent as the byte 0xB2
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.answer(200, "image/jpeg", PHOTO)
        elif self.path == "/gone.jpg":
            self.answer(404, "text/html", b"")
        elif self.path == "/page.html":
            self.answer(200, "text/html; charset=utf-8", b"<html>hello</html>")
        elif self.path == "/cut.jpg":  # promises the whole photo, sends a tenth, hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(PHOTO)))
            self.end_headers()
            self.wfile.write(PHOTO[: len(PHOTO) // 10])
            self.close_connection = True
        elif self.path == "/half.jpg":  # a broken file, served whole
            self.answer(200, "image/jpeg", PHOTO[: len(PHOTO) // 2])
        elif self.path == "/slow.jpg":
            time.sleep(1.0)
            self.answer(200, "image/jpeg", PHOTO)
        elif self.path == "/away.jpg":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.example/photo.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/moved.jpg":
            self.send_response(301)
            self.send_header("Location", "/photo.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.answer(404, "text/html", b"")

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client gave up on /slow.jpg, as it should


@pytest.fixture(scope="module")
def host():
    server = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def settings_of(**fetch) -> DownloadSettings:
    """The downloader's settings from a ``[fetch]`` section with these settings."""
    return DownloadSettings.from_config(FetchConfig(**fetch))


def downloader(**fetch) -> Downloader:
    settings = {
        "download_timeout": 0.5,
        "download_retries": 3,
        "backoff_base": 0.001,
        "backoff_max": 0.01,
        "allowed_hosts": ["127.0.0.1"],
        **fetch,
    }
    return Downloader(settings_of(**settings))


def test_an_image_is_kept_with_the_facts_of_the_served_bytes(host):
    with downloader() as d:
        outcome = d.get(f"{host}/photo.jpg")
    assert outcome.ok and outcome.data == PHOTO and outcome.ext == "jpg"
    assert outcome.sha256 == hashlib.sha256(PHOTO).hexdigest()
    assert (outcome.image_bytes, outcome.width, outcome.height) == (len(PHOTO), 800, 600)


def test_transient_errors_are_retried_but_404_is_not(host):
    with downloader() as d:
        assert d.get(f"{host}/flaky.jpg").ok
        assert d.get(f"{host}/gone.jpg").error == "http_404"
    assert Handler.hits["/flaky.jpg"] == 3 and Handler.hits["/gone.jpg"] == 1


def test_a_retry_after_that_is_no_number_is_ignored_not_raised(host):
    with downloader() as d:
        assert d.get(f"{host}/odd-retry.jpg").ok
    assert Handler.hits["/odd-retry.jpg"] == 2


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/page.html", "not_an_image"),
        ("/cut.jpg", "truncated"),
        ("/half.jpg", "truncated"),
        ("/slow.jpg", "timeout"),
        ("/away.jpg", "host_not_allowed"),
    ],
)
def test_failures_are_recorded_with_their_reason(host, path, reason):
    with downloader(download_retries=1) as d:
        assert d.get(f"{host}{path}").error == reason


def test_redirects_are_followed_within_the_allowed_hosts(host):
    with downloader() as d:
        assert d.get(f"{host}/moved.jpg").data == PHOTO


def test_only_http_urls_to_allowed_hosts_are_contacted(host):
    with downloader(allowed_hosts=["*.staticflickr.com"]) as d:
        assert d.get(f"{host}/photo.jpg").error == "host_not_allowed"
        assert d.get("file:///etc/passwd").error == "bad_url"
        assert d.get("ftp://127.0.0.1/x.jpg").error == "bad_url"
    assert host_allowed("https://live.staticflickr.com/1/2.jpg", ["*.staticflickr.com"])
    assert host_allowed("http://127.0.0.1:8080/a.jpg", ["127.0.0.1:8080"])
    assert not host_allowed("http://127.0.0.1:8081/a.jpg", ["127.0.0.1:8080"])
    assert not host_allowed("https://staticflickr.com.evil.example/", ["*.staticflickr.com"])


def test_size_bounds_are_checked_before_keeping(host):
    with downloader(max_bytes=1000) as d:
        assert d.get(f"{host}/photo.jpg").error == "too_large"
    settings = settings_of(min_side=700)
    assert check_image(PHOTO, settings).error == "too_small"
    settings = settings_of(max_pixels=100_000)
    assert check_image(PHOTO, settings).error == "too_many_pixels"


def test_downscaling_stores_a_smaller_jpeg_but_records_the_served_facts():
    outcome = check_image(PHOTO, settings_of(max_side=200))
    stored = Image.open(io.BytesIO(outcome.data))
    assert stored.size == (200, 150) and stored.format == "JPEG"
    assert (outcome.width, outcome.height, outcome.image_bytes) == (800, 600, len(PHOTO))
    assert outcome.sha256 == hashlib.sha256(PHOTO).hexdigest()
    small = jpeg(100, 80)
    assert check_image(small, settings_of(max_side=200)).data == small
