"""The ANP search algorithm on plain lists: pages, the result cap, date windows, the limit."""

from __future__ import annotations

import math

import pytest

from vsotools.fetch.search import PageSummary, Query, anp_query, search_anp


def fake_flickr(uploads: dict[str, int], cap: int):
    """A ``call`` that answers like Flickr over photos id -> upload time, newest first."""
    calls: list[dict[str, str]] = []

    def call(params: dict[str, str]) -> PageSummary:
        calls.append(params)
        low = int(params.get("min_upload_date", 0))
        high = int(params["max_upload_date"])
        hits = sorted(
            (pid for pid, t in uploads.items() if low <= t <= high),
            key=lambda pid: (-uploads[pid], pid),
        )
        per_page, page = int(params["per_page"]), int(params["page"])
        last = max(1, math.ceil(min(len(hits), cap) / per_page))
        start = (min(page, last) - 1) * per_page
        return PageSummary(total=len(hits), ids=hits[start : min(start + per_page, cap)])

    return call, calls


QUERY = Query(anp="many_cats", params={"text": "many cats"})


def run(uploads, *, per_anp, per_page=10, cap=25, snapshot=10_000):
    call, calls = fake_flickr(uploads, cap)
    pages = search_anp(QUERY, call, per_anp=per_anp, per_page=per_page, snapshot=snapshot, cap=cap)
    return [photo_id for ids in pages for photo_id in ids], calls


def test_windows_reach_every_photo_beyond_the_cap_once():
    uploads = {f"p{i}": 7 * i for i in range(100)}
    found, calls = run(uploads, per_anp=1000)
    assert sorted(found) == sorted(uploads) and len(found) == len(set(found))
    assert all(int(c["page"]) <= 3 for c in calls)  # never past the cap


def test_the_limit_takes_the_newest_photos_first():
    uploads = {f"p{i}": i for i in range(100)}
    found, calls = run(uploads, per_anp=15)
    assert found == [f"p{i}" for i in range(99, 84, -1)]
    assert len(calls) == 2 and "min_upload_date" not in calls[0]


def test_photos_uploaded_after_the_snapshot_are_not_searched():
    found, _ = run({"old": 5, "new": 20_000}, per_anp=10)
    assert found == ["old"]


def test_more_uploads_in_one_second_than_the_cap_reach_the_cap_and_stop():
    uploads = {f"p{i}": 500 for i in range(40)}
    found, _ = run(uploads, per_anp=1000)
    assert len(found) == 25


@pytest.mark.parametrize("mode", ["text", "tags"])
def test_an_anp_query_is_its_two_words(mode):
    query = anp_query(
        "brave_9/11", "brave", "9/11", mode=mode, extras=["url_m", "tags"], licenses=[4, 5]
    )
    expected = (
        {"text": "brave 9/11"} if mode == "text" else {"tags": "brave,9/11", "tag_mode": "all"}
    )
    assert expected.items() <= query.params.items()
    assert query.params["extras"] == "url_m,tags" and query.params["license"] == "4,5"
