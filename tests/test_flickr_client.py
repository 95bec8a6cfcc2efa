"""The API client: real recorded Flickr bytes through flickrapi, retries, errors, the key kept
secret, and the token bucket."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from vsotools.core.ratelimit import TokenBucket, backoff_delay
from vsotools.fetch.client import (
    Credentials,
    FlickrApiError,
    FlickrAuthError,
    FlickrClient,
    FlickrUnavailable,
    load_credentials,
)

KEY = "k3y-that-must-not-leak"
JSON = "application/json"
XML = "text/xml; charset=utf-8"
HTML = "text/html"


@contextlib.contextmanager
def replay(answers: list[tuple]) -> Iterator[tuple[str, list[bytes]]]:
    """A server answering each request with the next (status, content type, body[, headers]);
    yields its URL and the request bodies it received."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            status, content_type, body, *extra = answers[min(len(received), len(answers)) - 1]
            self.send_response(status)
            for name, value in (extra[0] if extra else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/services/rest/", received
    finally:
        server.shutdown()
        server.server_close()


def client(url: str, fmt: str = "json", retries: int = 4) -> FlickrClient:
    return FlickrClient(
        Credentials(KEY, "secret"),
        api_url=url,
        api_format=fmt,
        calls_per_hour=10**9,
        retries=retries,
        backoff_base=0.001,
        backoff_max=0.01,
    )


def flickr_file(shared: Path, name: str) -> bytes:
    return (shared / "flickr-api" / name).read_bytes()


def test_a_recorded_json_search_page_is_read(shared_data):
    body = flickr_file(shared_data, "openverse/flickr_example_pretty.json")
    with replay([(200, JSON, body)]) as (url, _):
        page = client(url).search({"text": "church", "per_page": "500"})
    assert (page.page, page.pages, page.total, len(page.photos)) == (1, 1, 30, 30)
    first = page.photos[0]
    assert first.photo_id == "49514337848" and first.owner == "7478087@N06"
    assert first.owner_name == "markustrois" and first.license == "1"
    assert first.date_upload == 1581319011 and first.date_taken == "2011-11-05 15:54:37"
    assert first.description.startswith("Warsy (Somme, France)")
    assert first.urls["url_l"].endswith("_b.jpg")
    assert sum("url_l" not in p.urls for p in page.photos) == 2  # as recorded


def test_a_recorded_xml_photo_list_is_read(shared_data):
    cassette = (
        shared_data / "flickr-api/flickr-foundation-cassettes/cassettes"
        "/test_get_public_photos_by_user.yml"
    )
    body = yaml.safe_load(cassette.read_text())["interactions"][2]["response"]["content"]
    with replay([(200, XML, body.encode())]) as (url, _):
        page = client(url, "xml").search({"text": "george"})
    assert (page.total, page.pages, len(page.photos)) == (7845, 785, 10)
    first = page.photos[0]
    assert first.photo_id == "53637883806" and first.description == ""
    assert first.date_upload == 1712509720 and first.urls["url_m"].endswith("ff06bb5c65.jpg")


def test_transient_failures_are_retried(shared_data):
    html_429 = flickr_file(shared_data, "json-snippets/http429_body.html")
    unavailable = b'{"stat":"fail","code":201,"message":"Sorry, the Flickr API service is not currently available."}'
    ok = flickr_file(shared_data, "json-snippets/search_url_m_2021_int_total.json")
    answers = [
        (429, HTML, html_429),
        (500, HTML, b"<error>BOOM!</error>"),
        (200, JSON, unavailable),
        (200, HTML, b"<html>not json</html>"),
        (200, JSON, ok),
    ]
    with replay(answers) as (url, received):
        flickr = client(url, retries=4)
        page = flickr.search({"text": "ad"})
    assert page.total == 9234 and len(received) == 5 and flickr.calls == 5


def test_retries_run_out_with_a_message_to_rerun(shared_data):
    with (
        replay([(503, HTML, b"busy")]) as (url, received),
        pytest.raises(FlickrUnavailable) as info,
    ):
        client(url, retries=2).search({"text": "x"})
    assert len(received) == 3 and "rerun the same command" in str(info.value)


def test_an_invalid_key_stops_at_once_without_showing_the_key(shared_data, caplog):
    caplog.set_level(logging.DEBUG)
    body = flickr_file(shared_data, "json-snippets/error_invalid_key_nojsoncallback.json")
    with replay([(200, JSON, body)]) as (url, received), pytest.raises(FlickrAuthError) as info:
        client(url).search({"text": "x"})
    assert len(received) == 1
    assert "error 100" in str(info.value) and KEY not in str(info.value)
    assert KEY not in caplog.text
    assert KEY.encode() not in received[0]  # flickrapi sends it in the OAuth header instead


def test_permanent_api_errors_are_not_retried(shared_data):
    body = flickr_file(shared_data, "json-snippets/error_77_logical_ors.json")
    with replay([(200, JSON, body)]) as (url, received), pytest.raises(FlickrApiError) as info:
        client(url).search({"text": "x"})
    assert len(received) == 1 and info.value.code == 77
    with replay([(404, HTML, b"")]) as (url, received), pytest.raises(FlickrApiError):
        client(url).search({"text": "x"})
    assert len(received) == 1


def test_credentials_come_from_the_environment_or_a_file(tmp_path):
    assert load_credentials(environ={"FLICKR_API_KEY": "a", "FLICKR_API_SECRET": "b"}) == (
        Credentials("a", "b")
    )
    path = tmp_path / "flickr.env"
    path.write_text("# my key\nFLICKR_API_KEY = 'abc'\nFLICKR_API_SECRET=def\n")
    credentials = load_credentials(path)
    assert (credentials.key, credentials.secret) == ("abc", "def")
    assert "abc" not in repr(credentials)
    with pytest.raises(FlickrAuthError, match="set FLICKR_API_KEY"):
        load_credentials(environ={})
    path.write_text("KEY=abc\n")
    with pytest.raises(FlickrAuthError, match=r"flickr\.env:1"):
        load_credentials(path)


def test_the_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=2.0, capacity=3, clock=lambda: now[0], sleep=sleep)
    waits = [bucket.acquire() for _ in range(7)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert now[0] == pytest.approx(2.0)  # 7 calls: 3 at once, then 2 per second


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    for attempt in range(8):
        delay = backoff_delay(attempt, 1.0, 30.0)
        ceiling = min(30.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling


def test_a_429_with_retry_after_waits_as_long_as_the_server_asks(shared_data):
    """The API client follows the same retry policy as the image downloader: at least the
    server's Retry-After, never more than backoff_max."""
    body = flickr_file(shared_data, "openverse/flickr_example_pretty.json")
    waits: list[float] = []
    answers = [(429, HTML, b"<html>slow down</html>", {"Retry-After": "3"}), (200, JSON, body, {})]
    with replay(answers) as (url, received):
        api = FlickrClient(
            Credentials(KEY, "secret"),
            api_url=url,
            calls_per_hour=10**9,
            retries=2,
            backoff_base=0.001,
            backoff_max=5.0,
            sleep=waits.append,
        )
        page = api.search({"text": "happy dog"})
    assert len(received) == 2 and page.photos
    assert waits == [3.0]
