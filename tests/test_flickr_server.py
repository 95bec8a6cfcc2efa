"""The local Flickr-compatible server: shaped like the real recorded responses, real enough for
flickrapi, with search semantics (pages, the 4,000 cap, date windows, licences) and faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import flickrapi
import pytest
import requests
import yaml
from flickr_corpus import make_corpus

from vsotools.demo.server import Faults, serve

SEARCH_EXTRAS_OPENVERSE = (
    "description,license,date_upload,date_taken,owner_name,tags,o_dims,url_t,url_s,url_m,url_l,"
    "views,content_type"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, 60)
    return folder


@pytest.fixture(scope="module")
def base(corpus: Path):
    with serve(corpus) as url:
        yield url


def rest(base: str, **params: Any) -> requests.Response:
    params.setdefault("api_key", "any-key")
    return requests.get(f"{base}services/rest/", params=params, timeout=10)


def recorded(shared: Path, name: str) -> str:
    return (shared / "flickr-api" / name).read_text(encoding="utf-8")


def cassette_body(shared: Path, name: str, index: int = 0) -> str:
    path = shared / "flickr-api" / "flickr-foundation-cassettes" / "cassettes" / name
    response = yaml.safe_load(path.read_text())["interactions"][index]["response"]
    return response["content"] if "content" in response else response["body"]["string"]


def shape(value: Any) -> Any:
    """Keys and types of a JSON value, recursively (a list by its first element)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


# --- shaped like the recordings -------------------------------------------------------------


def test_search_json_matches_the_recorded_response_key_for_key(shared_data, base):
    page = json.loads(recorded(shared_data, "openverse/flickr_example_pretty.json"))
    recent = json.loads(recorded(shared_data, "json-snippets/search_url_m_2021_int_total.json"))
    served = rest(
        base,
        method="flickr.photos.search",
        text="beautiful flower",
        extras=SEARCH_EXTRAS_OPENVERSE,
        per_page=500,
        format="json",
        nojsoncallback=1,
    ).json()
    # The page fields as Flickr serves them now (total an int since about 2020; older
    # recordings have it as a string).
    envelope = {k: v for k, v in served["photos"].items() if k != "photo"}
    expected = {k: v for k, v in recent["photos"].items() if k != "photo"}
    assert shape(envelope) == shape(expected)
    assert served["stat"] == "ok"
    # Each photo has exactly the keys of a recorded photo with the same sizes, typed alike.
    key_sets = {frozenset(p) for p in page["photos"]["photo"]}
    types: dict[str, set[str]] = {}
    for photo in page["photos"]["photo"]:
        for key, value in photo.items():
            types.setdefault(key, set()).add(type(value).__name__)
    photos = served["photos"]["photo"]
    assert photos and {frozenset(p) for p in photos} <= key_sets
    assert len({frozenset(p) for p in photos}) == 2  # with and without url_l, as recorded
    for photo in photos:
        for key, value in photo.items():
            assert type(value).__name__ in types[key], key
    assert all(isinstance(p["description"]["_content"], str) for p in photos)


def test_search_without_nojsoncallback_is_wrapped_like_the_recording(shared_data, base):
    text = recorded(shared_data, "json-snippets/search_empty_jsonp.txt").strip()
    served = rest(base, method="flickr.photos.search", text="no such anp", format="json").text
    assert served.startswith("jsonFlickrApi(") and served.endswith(")")
    want = json.loads(text[len("jsonFlickrApi(") : -1])
    got = json.loads(served[len("jsonFlickrApi(") : -1])
    want["photos"]["total"] = int(want["photos"]["total"])  # a string in this 2013 recording
    assert got == want


def test_search_xml_has_the_recorded_attributes(shared_data, base):
    document = cassette_body(shared_data, "test_get_public_photos_by_user.yml", 2)
    recorded_photo = ET.fromstring(document).find("photos/photo")
    extras = (
        "license,date_upload,date_taken,media,owner_name,url_sq,url_t,url_s,url_m,url_q,url_l,"
        "tags,description"
    )
    served = rest(
        base, method="flickr.photos.search", text="dark night", extras=extras, per_page=100
    )
    assert served.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert served.text.startswith('<?xml version="1.0" encoding="utf-8" ?>\n<rsp stat="ok">\n')
    root = ET.fromstring(served.content)
    assert set(root.find("photos").attrib) == set(ET.fromstring(document).find("photos").attrib)
    # Attributes of extras this server does not implement (geo, original_format, path_alias,
    # realname, safety_level) are left out of the comparison.
    not_served = {
        "safety_level",
        "realname",
        "originalsecret",
        "originalformat",
        "latitude",
        "longitude",
        "accuracy",
        "context",
        "pathalias",
        "url_o",
        "height_o",
        "width_o",
    }
    expected = set(recorded_photo.attrib) - not_served
    with_large = [p for p in root.iter("photo") if "url_l" in p.attrib]
    assert with_large and set(with_large[0].attrib) == expected
    assert [child.tag for child in with_large[0]] == [child.tag for child in recorded_photo]


@pytest.mark.parametrize(
    ("recording", "params"),
    [
        (
            "json-snippets/error_invalid_key_nojsoncallback.json",
            {"api_key": "invalid-key", "format": "json", "nojsoncallback": 1},
        ),
        ("json-snippets/error_invalid_key_jsonp.txt", {"api_key": "invalid-key", "format": "json"}),
        ("flickrex-reflection/test/fixtures/fail.xml", {"method": "flickr.fakeMethod"}),
        (
            "flickrex-reflection/test/fixtures/fail.json",
            {"method": "flickr.fakeMethod", "format": "json", "nojsoncallback": 1},
        ),
    ],
)
def test_errors_are_the_recorded_bytes(shared_data, base, recording, params):
    params = {"method": "flickr.photos.search", "text": "happy dog", **params}
    served = rest(base, **params)
    assert served.status_code == 200  # Flickr reports API errors with HTTP 200
    assert served.text.strip() == recorded(shared_data, recording).strip()


@pytest.mark.parametrize(
    ("cassette", "params"),
    [
        ("test_a_usage_error_is_generic_exception.yml", {}),
        ("TestNonExistentPhotos.test_get_single_photo[1].yml", {"photo_id": "1"}),
    ],
)
def test_getinfo_errors_are_the_recorded_xml(shared_data, base, cassette, params):
    served = rest(base, method="flickr.photos.getInfo", **params)
    assert served.text == cassette_body(shared_data, cassette)


def test_getinfo_json_matches_the_recording_key_for_key(shared_data, base, corpus):
    want = json.loads(recorded(shared_data, "json-snippets/getinfo_24379963431.json"))
    photo_id = json.loads((corpus / "photos.jsonl").read_text().splitlines()[0])["id"]
    got = rest(
        base, method="flickr.photos.getInfo", photo_id=photo_id, format="json", nojsoncallback=1
    ).json()
    assert shape(got) == shape(want)
    assert got["photo"]["id"] == photo_id


def test_getinfo_xml_matches_the_recorded_elements(shared_data, base, corpus):
    document = cassette_body(shared_data, "TestGetSinglePhoto.test_get_single_photo.yml")
    want = ET.fromstring(document).find("photo")
    photo_id = json.loads((corpus / "photos.jsonl").read_text().splitlines()[0])["id"]
    got = ET.fromstring(rest(base, method="flickr.photos.getInfo", photo_id=photo_id).content)
    got = got.find("photo")
    assert set(got.attrib) == set(want.attrib)
    assert [c.tag for c in got] == [c.tag for c in want]
    for tag in ("owner", "dates", "visibility", "usage"):
        assert set(got.find(tag).attrib) == set(want.find(tag).attrib), tag
    assert set(got.find("tags/tag").attrib) == set(want.find("tags/tag").attrib)


def test_http_429_is_flickrs_html_body(shared_data, corpus):
    with serve(corpus, faults=Faults(error_429=1.0)) as url:
        served = rest(url, method="flickr.photos.search", text="happy dog")
    assert served.status_code == 429
    assert served.text == recorded(shared_data, "json-snippets/http429_body.html")


# --- flickrapi cannot tell it from Flickr ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["parsed-json", "etree"])
def test_flickrapi_searches_it(base, fmt):
    api = flickrapi.FlickrAPI("some-key", "some-secret", format=fmt, store_token=False)
    api.REST_URL = f"{base}services/rest/"
    result = api.photos.search(text="happy dog", per_page=5, extras="url_m")
    if fmt == "parsed-json":
        photos = result["photos"]["photo"]
        total = result["photos"]["total"]
    else:
        photos = result.find("photos").findall("photo")
        total = result.find("photos").get("total")
    assert len(photos) == 5 and int(total) > 5


def test_flickrapi_sees_the_invalid_key_as_code_100(base):
    api = flickrapi.FlickrAPI("invalid-key", "s", format="parsed-json", store_token=False)
    api.REST_URL = f"{base}services/rest/"
    with pytest.raises(flickrapi.FlickrError) as info:
        api.photos.search(text="happy dog")
    assert info.value.code == 100


def test_flickrapi_sees_http_429_as_an_error_without_code(corpus):
    with serve(corpus, faults=Faults(error_429=1.0)) as url:
        api = flickrapi.FlickrAPI("k", "s", format="parsed-json", store_token=False)
        api.REST_URL = f"{url}services/rest/"
        with pytest.raises(flickrapi.FlickrError) as info:
            api.photos.search(text="happy dog")
    assert info.value.code is None and "429" in str(info.value)


# --- search semantics -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    """4,100 photos of one ANP sharing one image, one upload per minute."""
    folder = tmp_path_factory.mktemp("big")
    from PIL import Image

    Image.new("RGB", (64, 48)).save(folder / "one.jpg")
    with (folder / "photos.jsonl").open("w") as fh:
        for i in range(4100):
            row = {
                "id": str(10_000 + i),
                "owner": "1@N01",
                "dateupload": 1_500_000_000 + 60 * i,
                "license": str(i % 3),
                "anps": ["many_cats"],
                "image": "one.jpg",
            }
            fh.write(json.dumps(row) + "\n")
    with serve(folder) as url:
        yield url


def search(base: str, **params: Any) -> dict:
    params = {"method": "flickr.photos.search", "format": "json", "nojsoncallback": 1, **params}
    return rest(base, **params).json()["photos"]


def test_results_are_capped_at_4000_and_later_pages_repeat_the_last(big):
    first = search(big, text="many cats", per_page=500)
    assert (first["total"], first["pages"], len(first["photo"])) == (4100, 9, 500)
    assert first["photo"][0]["id"] == "14099"  # newest first
    eighth = search(big, text="many cats", per_page=500, page=8)
    ninth = search(big, text="many cats", per_page=500, page=9)
    assert [p["id"] for p in ninth["photo"]] == [p["id"] for p in eighth["photo"]]


def test_upload_date_windows_licences_tags_and_sort(big):
    window = search(
        big,
        tags="many,cats",
        tag_mode="all",
        min_upload_date=1_500_000_000 + 60 * 100,
        max_upload_date="2017-07-14 02:50:00",  # MySQL datetime = 1500000600 + 60 * 90
        sort="date-posted-asc",
        per_page=500,
    )
    ids = [int(p["id"]) for p in window["photo"]]
    assert window["total"] == 0 and ids == []
    window = search(
        big,
        text="many_cats",
        min_upload_date=1_500_000_000 + 60 * 100,
        max_upload_date=1_500_000_000 + 60 * 199,
        sort="date-posted-asc",
        license="1,2",
    )
    ids = [int(p["id"]) for p in window["photo"]]
    assert ids == [10_000 + i for i in range(100, 200) if i % 3 in (1, 2)]


def test_per_page_defaults_to_100_and_is_capped_at_500(big):
    assert search(big, text="many cats")["perpage"] == 100
    assert search(big, text="many cats", per_page=900)["perpage"] == 500


def test_sizes_a_photo_lacks_are_left_out(base):
    photos = search(base, text="beautiful flower", extras="url_m,url_z,url_l", per_page=500)
    for photo in photos["photo"]:
        size = max(photo["width_m"], photo["height_m"])
        assert ("url_z" in photo) == (size >= 640)
        assert ("url_l" in photo) == (size >= 1024)
        assert requests.get(photo["url_m"], timeout=10).status_code == 200


def test_the_images_are_the_corpus_files(base, corpus):
    lines = (corpus / "photos.jsonl").read_text().splitlines()
    rows = {row["id"]: row for row in map(json.loads, lines)}
    photos = search(base, text="happy dog", extras="url_m", per_page=500)["photo"]
    for photo in photos[:5]:
        served = requests.get(photo["url_m"], timeout=10)
        assert served.content == (corpus / rows[photo["id"]]["image"]).read_bytes()
    assert requests.get(photos[0]["url_m"].replace(".jpg", "_k.jpg"), timeout=10).status_code == 404


def test_parameterless_search_and_unknown_format_fail_like_flickr(base):
    answer = rest(base, method="flickr.photos.search", format="json", nojsoncallback=1)
    assert answer.json()["code"] == 3
    assert b'code="111"' in rest(base, method="flickr.photos.search", format="soap").content


# --- faults ---------------------------------------------------------------------------------


def test_photo_faults_always_hit_the_same_photos(corpus):
    faults = Faults(truncated=0.3, not_image=0.3, seed=5)
    with serve(corpus, faults=faults) as url:
        photos = search(url, text="beautiful flower", extras="url_m", per_page=500)["photo"]
        first = [requests.get(p["url_m"], timeout=10) for p in photos]
        again = [requests.get(p["url_m"], timeout=10) for p in photos]
    assert [r.content for r in first] == [r.content for r in again]
    kinds = {r.headers["Content-Type"] for r in first}
    assert "text/html; charset=utf-8" in kinds and "image/jpeg" in kinds


def test_request_faults_and_the_request_log(corpus, tmp_path):
    log = tmp_path / "requests.jsonl"
    with serve(corpus, faults=Faults(error_500=1.0), request_log=log) as url:
        assert rest(url, method="flickr.photos.search", text="x").status_code == 500
    with serve(corpus, faults=Faults(drop=1.0)) as url, pytest.raises(requests.ConnectionError):
        rest(url, method="flickr.photos.search", text="x")
    with serve(corpus, faults=Faults(unavailable=1.0)) as url:
        answer = rest(url, method="flickr.photos.search", text="x", format="json").text
        assert '"code":201' in answer or '"code":105' in answer or '"code":10,' in answer
    entry = json.loads(log.read_text().splitlines()[0])
    assert entry["status"] == 500 and entry["fault"] == "500"
    assert entry["method"] == "flickr.photos.search" and "any-key" not in log.read_text()


def test_cli_prints_the_base_url_first_and_serves_until_interrupted(corpus):
    process = subprocess.Popen(
        [sys.executable, "-m", "vsotools", "flickr-server", "--corpus", str(corpus)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert search(url, text="happy dog")["total"] > 0
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
