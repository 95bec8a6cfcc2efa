"""The local Flickr-compatible server against a hostile client: raw requests over a socket each
get a well-formed HTTP answer (never a dropped connection or a stuck thread), the server goes on
serving, and no file outside the corpus folder is ever served."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from conftest import vsotools_command
from flickr_corpus import make_corpus

from vsotools.demo.server import Api, CorpusError, load_corpus, serve

SECRET = b"root:x:0:0:not for the web\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, 20)
    return folder


@pytest.fixture(scope="module")
def base(corpus: Path) -> Iterator[str]:
    with serve(corpus, client_timeout=1.0) as url:
        yield url


def exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; the status, headers and body of the answer.

    Raises (``RemoteDisconnected``, ``TimeoutError``) when the server hangs up or never answers.
    """
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def get(base: str, **params: str) -> tuple[int, dict[str, str], bytes]:
    query = urlencode({"api_key": "k", **params})
    return exchange(base, f"GET /services/rest/?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def post(base: str, headers: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    head = f"POST /services/rest/ HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
    return exchange(base, head.encode() + body)


def assert_still_serving(base: str) -> None:
    served = requests.get(
        f"{base}services/rest/",
        params={"method": "flickr.photos.getInfo", "api_key": "k", "photo_id": "0"},
        timeout=5,
    )
    assert served.status_code == 200 and 'stat="fail"' in served.text


# --- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: abc\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: 1.5\r\n",
        "Content-Length: \r\n",
        "Content-Length: 3\r\nContent-Length: 4\r\n",
    ],
)
def test_a_malformed_content_length_is_answered_400(base, headers):
    status, answer_headers, _ = post(base, headers)
    assert status == 400 and answer_headers["Connection"] == "close"
    assert_still_serving(base)


@pytest.mark.parametrize("length", [str(10**9), "9" * 5000])
def test_a_body_over_the_bound_is_answered_413_without_being_read(base, length):
    status, _, _ = post(base, f"Content-Length: {length}\r\n")
    assert status == 413
    assert_still_serving(base)


def test_a_body_that_stops_arriving_is_answered_408_once_the_client_timeout_passes(base):
    started = time.monotonic()
    status, _, _ = post(base, "Content-Length: 100\r\n", b"method=flic")
    assert status == 408 and time.monotonic() - started < 4
    assert_still_serving(base)


def test_a_chunked_body_is_answered_411(base):
    status, _, _ = post(base, "Transfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    assert status == 411
    assert_still_serving(base)


def test_a_well_formed_post_is_still_read(base):
    body = b"method=flickr.photos.search&api_key=k&text=dark+night&format=json&nojsoncallback=1"
    status, _, answer = post(base, f"Content-Length: {len(body)}\r\n", body)
    assert status == 200 and json.loads(answer)["stat"] == "ok"


def test_an_unreadable_request_target_is_answered_400(base):
    status, _, _ = exchange(base, b"GET http://[oops/services/rest/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert_still_serving(base)


# --- parameters -----------------------------------------------------------------------------


def search(base: str, **params: str) -> dict:
    status, _, body = get(
        base,
        method="flickr.photos.search",
        text="dark night",
        format="json",
        nojsoncallback="1",
        **params,
    )
    assert status == 200
    return json.loads(body)


@pytest.mark.parametrize("key", ["min_upload_date", "max_upload_date", "page", "per_page"])
def test_a_5000_digit_number_is_read_as_flickr_reads_garbage(base, key):
    # Flickr ignores a date it cannot read, and takes its default for a page it cannot.
    plain = search(base)
    assert plain["stat"] == "ok"
    assert search(base, **{key: "9" * 5000}) == plain
    assert_still_serving(base)


@pytest.mark.parametrize(
    "callback",
    ["alert(document.cookie)//", "</script><script>x", "a;b", "1abc", "x" * 101, "a..b"],
)
def test_a_jsoncallback_that_is_not_a_javascript_name_is_left_out(base, callback):
    status, headers, body = get(
        base, method="flickr.photos.search", text="dark night", format="json", jsoncallback=callback
    )
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    text = body.decode()
    assert text.startswith("jsonFlickrApi(") and callback not in text
    status, _, body = get(
        base,
        method="flickr.photos.search",
        text="dark night",
        format="json",
        nojsoncallback="1",
        jsoncallback=callback,
    )
    assert json.loads(body)["stat"] == "ok"


@pytest.mark.parametrize("callback", ["cb", "jQuery19_1.handle$", "_"])
def test_a_jsoncallback_that_is_a_javascript_name_wraps_the_answer(base, callback):
    _, _, body = get(
        base, method="flickr.photos.search", text="x", format="json", jsoncallback=callback
    )
    assert body.decode().startswith(f"{callback}({{")


def test_a_fault_in_the_server_is_answered_500(base, monkeypatch):
    def broken(*args: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(Api, "answer", broken)
    status, _, body = get(base, method="flickr.photos.search", text="x")
    assert status == 500 and b"Internal Server Error" in body
    monkeypatch.undo()
    assert_still_serving(base)


# --- files ----------------------------------------------------------------------------------


def one_photo_corpus(folder: Path, image: str) -> Path:
    folder.mkdir()
    row = {"id": "1", "anps": ["dark_night"], "image": image}
    (folder / "photos.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "image", ["/etc/passwd", "../outside.txt", "img/../../outside.txt", "link"]
)
def test_a_corpus_image_outside_its_folder_is_refused_with_its_line(tmp_path, image):
    (tmp_path / "outside.txt").write_bytes(SECRET)
    folder = one_photo_corpus(tmp_path / "corpus", image)
    (folder / "link").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(CorpusError, match=r"photos\.jsonl:1: image .* outside the corpus folder"):
        load_corpus(folder)


def test_an_image_swapped_for_a_symlink_after_loading_is_not_served(tmp_path, corpus):
    (tmp_path / "outside.txt").write_bytes(SECRET)
    folder = one_photo_corpus(tmp_path / "corpus", "photo.jpg")
    first = next((corpus / "img").glob("*.jpg"))
    (folder / "photo.jpg").write_bytes(first.read_bytes())
    with serve(folder) as url:
        photo = requests.get(
            f"{url}services/rest/",
            params={
                "method": "flickr.photos.search",
                "api_key": "k",
                "text": "dark night",
                "extras": "url_m",
                "format": "json",
                "nojsoncallback": 1,
            },
            timeout=5,
        ).json()["photos"]["photo"][0]
        assert requests.get(photo["url_m"], timeout=5).content == first.read_bytes()
        (folder / "photo.jpg").unlink()
        (folder / "photo.jpg").symlink_to(tmp_path / "outside.txt")
        served = requests.get(photo["url_m"], timeout=5)
    assert served.status_code == 404 and SECRET not in served.content


# --- the real server process: FIFOs and folders in the corpus, absurd page numbers -------------


@contextlib.contextmanager
def server_process(corpus: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``vsotools flickr-server`` over ``corpus``, and its base URL once it serves."""
    process = subprocess.Popen(
        [*vsotools_command(), "flickr-server", "--corpus", str(corpus)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, process.stdout.readline().strip()
    finally:
        process.kill()
        process.wait(timeout=10)


def started_and_ended(corpus: Path) -> subprocess.CompletedProcess[str]:
    """Start the server; what it said once it ended (a hang fails the test after 30 s)."""
    return subprocess.run(
        [*vsotools_command(), "flickr-server", "--corpus", str(corpus)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["a FIFO", "a folder"])
def test_a_corpus_image_that_is_a_fifo_or_a_folder_stops_the_server_at_start(tmp_path, kind):
    folder = one_photo_corpus(tmp_path / "corpus", "photo.jpg")
    if kind == "a FIFO":
        os.mkfifo(folder / "photo.jpg")  # no writer: opening it to read would wait for ever
    else:
        (folder / "photo.jpg").mkdir()
    done = started_and_ended(folder)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"vsotools: error: {folder / 'photos.jsonl'}:1: image 'photo.jpg' is"
        f" {kind if kind == 'a folder' else 'not a regular file'}\n"
    )


def test_a_corpus_file_that_is_a_fifo_stops_the_server_at_start(tmp_path):
    (tmp_path / "corpus").mkdir()
    os.mkfifo(tmp_path / "corpus" / "photos.jsonl")
    done = started_and_ended(tmp_path / "corpus")
    assert done.returncode == 1
    assert done.stderr == (
        f"vsotools: error: the corpus file {tmp_path / 'corpus' / 'photos.jsonl'} is a FIFO,"
        " not a regular file\n"
    )


def test_a_fifo_swapped_in_after_the_start_is_answered_404_and_holds_no_thread(tmp_path, corpus):
    folder = one_photo_corpus(tmp_path / "corpus", "photo.jpg")
    first = next((corpus / "img").glob("*.jpg"))
    (folder / "photo.jpg").write_bytes(first.read_bytes())
    with server_process(folder) as (_, url):
        found = search(url, extras="url_m")["photos"]["photo"][0]
        assert requests.get(found["url_m"], timeout=5).content == first.read_bytes()
        (folder / "photo.jpg").unlink()
        os.mkfifo(folder / "photo.jpg")
        for _ in range(3):  # each request would have kept a thread waiting on the FIFO
            assert requests.get(found["url_m"], timeout=5).status_code == 404
        assert_still_serving(url)


def test_an_absurd_page_number_is_read_as_flickr_reads_garbage_not_echoed(tmp_path, corpus):
    with server_process(corpus) as (_, url):
        plain = search(url)
        assert plain["stat"] == "ok" and plain["photos"]["page"] == 1
        for page in ("1" + "0" * 38, "１２", "+3", "1_0"):
            assert search(url, page=page) == plain, page
        assert search(url, page="2")["photos"]["page"] == 2
