"""``vsotools fetch`` end to end: crawls of a local Flickr-compatible server, pairs files,
retries of failures, and resuming after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import vsotools_command
from flickr_corpus import SCORES, make_corpus, write_manifest
from PIL import Image

from vsotools.core.schema import PHOTO_SCHEMA
from vsotools.demo.server import Faults, serve

KEY = "dummy-key-7f3a"
LABELLED = [anp for anp, score in SCORES.items() if score != 0.0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    make_corpus(folder, 120)
    write_manifest(folder / "manifest.csv")
    return folder


@pytest.fixture(scope="module")
def rows(corpus: Path) -> dict[str, dict]:
    lines = (corpus / "photos.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["id"]: row for row in map(json.loads, lines)}


@pytest.fixture(autouse=True)
def flickr_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLICKR_API_KEY", KEY)
    monkeypatch.setenv("FLICKR_API_SECRET", "dummy-secret")


def crawl_args(corpus: Path, url: str, out: Path, *extra: str) -> list[str]:
    return [
        "fetch",
        "--manifest",
        str(corpus / "manifest.csv"),
        "--out",
        str(out),
        "--api-url",
        f"{url}services/rest/",
        "--calls-per-hour",
        "100000000",
        "--set",
        "fetch.backoff_base=0.01",
        "--set",
        "fetch.backoff_max=0.05",
        *extra,
    ]


def records(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata").sort_values("photo_id").reset_index(drop=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_crawl_records_every_photo_once_with_every_anp_that_found_it(cli, corpus, rows, tmp_path):
    out = tmp_path / "data"
    with serve(corpus) as url:
        result = cli(*crawl_args(corpus, url, out, "--set", "fetch.per_page=7"))
    assert result.code == 0, result.err
    assert "5 of 5 ANPs searched" in result.out

    assert pq.read_schema(out / "metadata" / "part-00000.parquet").equals(PHOTO_SCHEMA)
    df = records(out)
    expected = {i for i, row in rows.items() if set(row["anps"]) & set(LABELLED)}
    assert df.photo_id.is_unique and set(df.photo_id) == expected
    for record in df.itertuples():
        row = rows[record.photo_id]
        wanted = [a for a in SCORES if a in row["anps"] and a in LABELLED]  # manifest order
        assert list(record.anps) == wanted
        assert record.source == "flickr" and pd.isna(record.label)
        assert (record.title, record.owner, record.license) == (
            row["title"],
            row["owner"],
            row["license"],
        )
        assert record.description == row["description"] and record.date_upload == row["dateupload"]
        if record.status == "ok":
            served = corpus / row["image"]
            assert record.sha256 == sha256(served) == sha256(out / record.image_path)
            assert record.image_bytes == served.stat().st_size
            assert (record.width, record.height) == Image.open(served).size
            size = max(record.width, record.height)
            assert record.image_url.endswith("_z.jpg" if size >= 640 else ".jpg")
    reasons = {
        "img/tiny.jpg": "too_small",
        "img/text.jpg": "not_an_image",
        "img/missing.jpg": "http_404",
    }
    failed = df[df.status == "failed"]
    assert {rows[i]["image"] for i in failed.photo_id} == {
        rows[i]["image"] for i in expected if rows[i]["image"] in reasons
    }
    for record in failed.itertuples():
        assert record.error == reasons[rows[record.photo_id]["image"]]
        assert pd.isna(record.sha256) and pd.isna(record.image_path)

    report = json.loads((out / "fetch-report.json").read_text())
    assert (report["anps"], report["searches"], report["photos"]) == (5, 5, len(expected))
    assert report["downloaded"] + report["failed"] == len(expected)
    assert (out / "fetch-recipe.toml").is_file()
    part_folders = {p.parent.name for p in (out / "images").rglob("*.jpg")}
    assert part_folders == {"00000"}
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_every_anp_can_be_searched_and_each_has_a_limit(cli, corpus, rows, tmp_path):
    with serve(corpus) as url:
        result = cli(*crawl_args(corpus, url, tmp_path / "all", "--all-anps", "--per-anp", "4"))
    assert result.code == 0, result.err
    df = records(tmp_path / "all")
    counts = Counter(anp for anps in df.anps for anp in anps)
    assert set(counts) == set(SCORES) and max(counts.values()) <= 4
    # The newest uploads of each ANP come first.
    happy = sorted(
        (r for r in rows.values() if "happy_dog" in r["anps"]), key=lambda r: -r["dateupload"]
    )
    assert {r["id"] for r in happy[:4]} <= set(df.photo_id)


def test_tag_search_in_xml_with_a_licence_filter(cli, corpus, rows, tmp_path):
    out = tmp_path / "cc"
    with serve(corpus) as url:
        args = crawl_args(corpus, url, out, "--search-mode", "tags", "--licenses", "4,5,9")
        result = cli(*args, "--set", "fetch.api_format=xml")
    assert result.code == 0, result.err
    df = records(out)
    assert len(df) > 0 and set(df.license) <= {"4", "5", "9"}
    expected = {
        i
        for i, r in rows.items()
        if set(r["anps"]) & set(LABELLED) and r["license"] in {"4", "5", "9"}
    }
    assert set(df.photo_id) == expected


@pytest.mark.slow
def test_upload_date_windows_reach_past_the_4000_cap(cli, tmp_path):
    corpus = tmp_path / "big"
    corpus.mkdir()
    Image.new("RGB", (64, 48)).save(corpus / "one.jpg")
    with (corpus / "photos.jsonl").open("w") as fh:
        for i in range(4321):
            row = {"id": str(i), "dateupload": 1_300_000_000 + 977 * i, "anps": ["many_cats"]}
            fh.write(json.dumps({**row, "image": "one.jpg"}) + "\n")
    write_manifest(corpus / "manifest.csv", {"many_cats": 1.0})
    out = tmp_path / "data"
    # url_l is larger than the photos, so none is downloaded: this is about the search.
    with serve(corpus) as url:
        args = crawl_args(corpus, url, out, "--per-anp", "5000", "--set", "fetch.sizes=url_l")
        result = cli(*args, "--set", "fetch.extras=")
    assert result.code == 0, result.err
    df = records(out)
    assert len(df) == 4321 and df.photo_id.is_unique
    assert set(df.error) == {"no_image_url"}


def test_an_invalid_key_stops_the_crawl_with_a_clear_message(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("FLICKR_API_KEY", "invalid-key")
    with serve(corpus) as url:
        result = cli(*crawl_args(corpus, url, tmp_path / "data"))
    assert result.code == 1
    assert "refused the API key (error 100" in result.err and "invalid-key" not in result.err


def test_a_crawl_without_a_key_is_refused(cli, corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("FLICKR_API_KEY")
    result = cli(*crawl_args(corpus, "http://127.0.0.1:9/", tmp_path / "data"))
    assert result.code == 1 and "FLICKR_API_KEY" in result.err


def test_failed_downloads_are_retried_on_request_only(cli, corpus, tmp_path):
    out = tmp_path / "data"
    faults = Faults(error_500=0.4, seed=11)
    with serve(corpus, faults=faults) as url:
        port = url.rsplit(":", 1)[1].strip("/")
        args = crawl_args(corpus, url, out, "--set", "fetch.download_retries=0")
        assert cli(*args).code == 0
    first = records(out)
    assert (first.error == "http_500").sum() > 5
    part = out / "metadata" / "part-00000.parquet"
    before = part.stat().st_mtime_ns
    # The same server again, without faults: a plain rerun changes nothing...
    with serve(corpus, port=int(port)) as url:
        assert cli(*args).code == 0
        assert part.stat().st_mtime_ns == before
        assert records(out).equals(first)
        # ... and --retry-failed fetches the failed photos again.
        assert cli(*args, "--retry-failed").code == 0
    again = records(out)
    assert "http_500" not in set(again.error.dropna())
    assert set(again.photo_id) == set(first.photo_id)
    assert (again.status == "ok").sum() > (first.status == "ok").sum()


def test_a_crawl_stopped_by_an_unavailable_api_says_to_rerun(cli, corpus, tmp_path):
    with serve(corpus, faults=Faults(unavailable=1.0)) as url:
        result = cli(*crawl_args(corpus, url, tmp_path / "data", "--set", "fetch.api_retries=2"))
    assert result.code == 1
    assert "failed 3 times" in result.err and "rerun the same command" in result.err
    assert not (tmp_path / "data" / "fetch-report.json").exists()


def test_a_rerun_with_other_search_settings_is_refused(cli, corpus, tmp_path):
    out = tmp_path / "data"
    with serve(corpus) as url:
        assert cli(*crawl_args(corpus, url, out, "--per-anp", "3")).code == 0
        result = cli(*crawl_args(corpus, url, out, "--per-anp", "5"))
    assert result.code == 1 and "fetch.per_anp = 3, now 5" in result.err


# --- resuming after SIGKILL -----------------------------------------------------------------


@pytest.mark.slow
def test_a_crawl_killed_twice_ends_like_an_uninterrupted_one(corpus, tmp_path):
    log = tmp_path / "requests.jsonl"
    faults = Faults(latency=0.02, truncated=0.05, not_image=0.05, error_500=0.05, seed=2)
    env = {**os.environ, "FLICKR_API_KEY": KEY, "FLICKR_API_SECRET": "s"}

    def command(url: str, out: Path) -> list[str]:
        extra = [
            "--concurrency",
            "4",
            "--set",
            "fetch.per_page=5",
            "--set",
            "fetch.download_retries=6",
        ]
        return [*vsotools_command(), "-q", *crawl_args(corpus, url, out, *extra)]

    def entries() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def run_until(url: str, out: Path, enough) -> int:
        """Start a fetch, SIGKILL it once ``enough(new log entries)``; returns the log length."""
        start = len(entries())
        process = subprocess.Popen(command(url, out), env=env)
        while not enough(entries()[start:]):
            assert process.poll() is None, "the fetch finished before it could be killed"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(0.2)  # let the server log the requests it was answering
        return len(entries())

    def on_disk(out: Path) -> set[str]:
        return {p.stem for p in (out / "images").rglob("*.jpg")}

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with serve(corpus, faults=faults, request_log=log) as url:
        subprocess.run(command(url, whole), env=env, check=True)
        baseline = len(entries())
        # Kill 1: while searching. Kill 2: while downloading.
        first_kill = run_until(url, killed, lambda new: sum("method" in e for e in new) >= 8)
        kept_1 = on_disk(killed)
        second_kill = run_until(
            url, killed, lambda new: sum("photo_id" in e and e["status"] == 200 for e in new) >= 40
        )
        kept_2 = on_disk(killed)
        subprocess.run(command(url, killed), env=env, check=True)
        log_entries = entries()

    assert records(killed).equals(records(whole))
    assert {p.relative_to(killed) for p in (killed / "images").rglob("*")} == {
        p.relative_to(whole) for p in (whole / "images").rglob("*")
    }
    report = json.loads((killed / "fetch-report.json").read_text())
    assert report["runs"] == 3  # the two killed runs count: each worked on the folder
    # No image that reached the disk was fetched again after a kill.
    after_1 = log_entries[first_kill:]
    after_2 = log_entries[second_kill:]
    assert not kept_1 & {e["photo_id"] for e in after_1 if "photo_id" in e and e["status"] == 200}
    assert not kept_2 & {e["photo_id"] for e in after_2 if "photo_id" in e and e["status"] == 200}
    # Only what was in flight at a kill was fetched twice: at most 4 images and 1 search page.
    resumed = log_entries[baseline:]
    images = Counter(e["photo_id"] for e in resumed if "photo_id" in e and e["status"] == 200)
    assert sum(n - 1 for n in images.values()) <= 2 * 4
    pages = Counter(
        json.dumps(e["params"], sort_keys=True)
        for e in resumed
        if "method" in e and e["status"] == 200 and not e["fault"]
    )
    assert sum(n - 1 for n in pages.values()) <= 2


# --- pairs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_mvsa_pairs_are_ingested(cli, shared_data, tmp_path):
    pairs = shared_data / "mvsa-dev" / "pairs.jsonl"
    out = tmp_path / "mvsa"
    result = cli("fetch", "--pairs", pairs, "--out", out)
    assert result.code == 0, result.err
    df = records(out)
    assert len(df) == 2819 and (df.status == "ok").all()
    assert df.label.value_counts().to_dict() == {"positive": 1609, "negative": 791, "neutral": 419}
    assert (df.source == "pairs").all() and (df.anps.map(len) == 0).all()
    given = {r["id"]: r for r in map(json.loads, pairs.read_text(encoding="utf-8").splitlines())}
    for record in df.sample(50, random_state=0).itertuples():
        assert record.description == given[record.photo_id]["text"]
        source = pairs.parent / given[record.photo_id]["image"]
        assert record.sha256 == sha256(source) == sha256(out / record.image_path)


def test_pairs_in_csv_and_parquet_with_files_and_urls(cli, corpus, rows, tmp_path):
    images = [r for r in rows.values() if r["image"].startswith("img/") and r["image"][4].isdigit()]
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    (pairs_dir / "a.jpg").write_bytes((corpus / images[0]["image"]).read_bytes())
    with serve(corpus) as url:
        photo_url = json.loads(
            __import__("requests")
            .get(
                f"{url}services/rest/",
                params={
                    "method": "flickr.photos.search",
                    "api_key": "k",
                    "text": "dark night",
                    "extras": "url_m",
                    "format": "json",
                    "nojsoncallback": 1,
                },
                timeout=10,
            )
            .text
        )["photos"]["photo"][0]["url_m"]
        table = pd.DataFrame(
            {
                "id": ["1", "2", "3"],
                "text": ["a happy day", "so sad", "meh"],
                "label": ["positive", "negative", "neutral"],
                "image": ["a.jpg", photo_url, "nope.jpg"],
            }
        )
        table.to_csv(pairs_dir / "pairs.csv", index=False)
        table.to_parquet(pairs_dir / "pairs.parquet")
        for name in ("pairs.csv", "pairs.parquet"):
            out = tmp_path / name
            result = cli(
                "fetch", "--pairs", pairs_dir / name, "--out", out, "--max-side", "300",
                "--set", "fetch.allowed_hosts=127.0.0.1",
            )  # fmt: skip
            assert result.code == 0, result.err
            df = records(out)
            assert list(df.status) == ["ok", "ok", "failed"] and df.error[2] == "missing_file"
            assert df.image_url[1] == photo_url and pd.isna(df.image_url[0])
            assert df.sha256[0] == sha256(pairs_dir / "a.jpg")
            stored = Image.open(out / df.image_path[0])
            assert max(stored.size) == 300 and (df.width[0], df.height[0]) != stored.size


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "1", "text": "x", "label": "happy", "image": "a.jpg"}', "pairs.jsonl:2: label"),
        ('{"id": "0", "text": "x", "label": "positive", "image": "a.jpg"}', "id '0' already used"),
        ('{"id": "1", "text": "x", "label": "positive"}', "missing field(s) image"),
        ("not json", "pairs.jsonl:2: not JSON"),
    ],
)
def test_a_bad_pairs_file_is_refused_with_its_line(cli, tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    first = '{"id": "0", "text": "x", "label": "positive", "image": "a.jpg"}'
    path.write_text(f"{first}\n{line}\n")
    result = cli("fetch", "--pairs", path, "--out", tmp_path / "data")
    assert result.code == 1 and message in result.err
    assert not (tmp_path / "data" / "metadata").exists()
    # Fixed, the file goes into the same folder; changed after that, it is refused.
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    path.write_text(f"{first}\n")
    assert cli("fetch", "--pairs", path, "--out", tmp_path / "data").code == 0
    path.write_text(f"{first}\n{first.replace('0', '9')}\n")
    result = cli("fetch", "--pairs", path, "--out", tmp_path / "data")
    assert result.code == 1 and "has changed since" in result.err


def test_only_the_anps_the_rule_labels_are_searched(shared_data, tmp_path):
    from vsotools.core.anps import import_release
    from vsotools.core.config import load_recipe
    from vsotools.fetch.stage import anps_to_search

    manifest = tmp_path / "mvso-en-anps.csv"
    import_release(shared_data / "anps" / "mvso-english.csv", "mvso", manifest)
    recipe = load_recipe(Path(__file__).parents[1] / "pipelines" / "mvso-en.toml")
    recipe = recipe.override({"anps.manifest": str(manifest)})
    assert len(anps_to_search(recipe)) == 857 + 826
    assert len(anps_to_search(recipe.override({"fetch.all_anps": True}))) == 4421
