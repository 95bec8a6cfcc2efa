"""vsotools filter on real Parquet photo records whose words, scores, owners and duplicates are known."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pandas as pd
import pytest
from datakit import photo, text_of, write_manifest, write_metadata

from vsotools.core.config import Recipe, load_recipe
from vsotools.core.schema import FILTERED_SCHEMA
from vsotools.dataset import filter as filtering

SCORES = {
    "happy_dog": 1.5,  # positive under 0/0 and 0.16/-0.1
    "sunny_beach": 0.12,  # positive under 0/0, no label under 0.16/-0.1
    "sad_cat": -1.2,  # negative under both
    "grey_day": -0.05,  # negative under 0/0, no label under 0.16/-0.1
}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "anps.csv", SCORES)


def _filter(cli, data: Path, *args) -> dict:
    result = cli("filter", data, *args)
    assert result.code == 0, result.err
    return json.loads((data / "filter-report.json").read_text())


def _kept(data: Path) -> pd.DataFrame:
    return pd.read_parquet(data / "filtered.parquet").set_index("photo_id")


def test_paper_rules_keep_exactly_the_expected_photos(cli, tmp_path, manifest):
    data = tmp_path / "data"
    records = [
        # rule 1: only fetched images
        photo("1", anps=["happy_dog"], description=text_of(10), status="failed", error="http_404"),
        # rule 2: word bounds, inclusive
        photo("2", anps=["happy_dog"], description=text_of(4)),
        photo("3", anps=["happy_dog"], description=text_of(5)),
        photo("4", anps=["sad_cat"], description=text_of(150)),
        photo("5", anps=["sad_cat"], description=text_of(151)),
        photo("6", anps=["sad_cat"], description=None),
        # rule 2: markup, entities and URLs are not words
        photo(
            "7",
            anps=["sad_cat"],
            description='<a href="http://x.org/a">so</a> &amp; sad http://flic.kr/p/1 :( !!!',
        ),
        photo(
            "8",
            anps=["sad_cat"],
            description="<b>so</b> sad and grey &amp; cold today http://flic.kr/p/2",
        ),
        # rule 3: labels from ANPs; agreeing ANPs are fine, disagreeing ones are dropped
        photo("9", anps=["happy_dog", "sunny_beach"], description=text_of(8)),
        photo("10", anps=["happy_dog", "sad_cat"], description=text_of(8)),
        photo("11", anps=["unknown_anp"], description=text_of(8)),
        photo("12", anps=["unknown_anp", "grey_day"], description=text_of(8)),
    ]
    write_metadata(data, records)
    report = _filter(cli, data, "--manifest", manifest, "--min-words", "5", "--max-words", "150")

    kept = _kept(data)
    assert sorted(kept.index, key=int) == ["3", "4", "8", "9", "12"]
    assert kept.loc["3", "label_name"] == "positive" and kept.loc["3", "label"] == 1
    assert kept.loc["4", "label_name"] == "negative" and kept.loc["4", "label"] == 0
    assert kept.loc["8", "text"] == "so sad and grey & cold today"
    assert kept.loc["8", "words"] == 6
    assert kept.loc["4", "words"] == 150
    assert list(kept.loc["9", "anps"]) == ["happy_dog", "sunny_beach"]
    assert list(kept.loc["9", "anp_scores"]) == [1.5, 0.12]
    assert kept.loc["12", "label_name"] == "negative"
    assert kept.loc["3", "image_path"] == "images/3.jpg"

    assert report["dropped"] == {
        "not_fetched": 1,
        "too_few_words": 3,  # 2 (4 words), 6 (empty), 7 (2 words: so, sad)
        "too_many_words": 1,
        "no_labelled_anp": 1,
        "conflicting_anps": 1,
        "neutral_label": 0,
        "duplicate_image": 0,
        "duplicate_owner_text": 0,
    }
    assert report["input"] == len(records)
    assert report["input"] == report["kept"] + sum(report["dropped"].values())
    assert report["unknown_anps"] == 1
    # The histogram of words per text covers every fetched photo, before the word rule.
    assert sum(report["words_histogram"].values()) == len(records) - 1
    assert report["words_histogram"]["150"] == 1 and report["words_histogram"]["151"] == 1


def test_mvso_thresholds_leave_weak_anps_unlabelled(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(
        data,
        [
            photo("1", anps=["sunny_beach"], description=text_of(8)),
            photo("2", anps=["grey_day"], description=text_of(8)),
            photo("3", anps=["sunny_beach", "sad_cat"], description=text_of(8)),
            photo("4", anps=["happy_dog", "grey_day"], description=text_of(8)),
        ],
    )
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "mvso-en.toml"
    report = _filter(cli, data, "--recipe", recipe, "--manifest", manifest)
    kept = _kept(data)
    # 0.12 and -0.05 lie between -0.1 and 0.16: those ANPs neither label nor conflict.
    assert dict(kept["label_name"]) == {"3": "negative", "4": "positive"}
    assert report["dropped"]["no_labelled_anp"] == 2
    assert report["dropped"]["conflicting_anps"] == 0


def test_pairs_keep_their_given_label_and_drop_neutral(cli, tmp_path):
    data = tmp_path / "data"
    pairs = [
        photo(f"p{i}", source="pairs", label=label, owner=None, description=text_of(6, salt=s))
        for i, (label, s) in enumerate(
            [("positive", "good"), ("negative", "bad"), ("neutral", "fine"), ("positive", "nice")]
        )
    ]
    write_metadata(data, pairs)
    report = _filter(cli, data)  # no manifest needed: no crawled photos
    assert dict(_kept(data)["label_name"]) == {"p0": "positive", "p1": "negative", "p3": "positive"}
    assert report["dropped"]["neutral_label"] == 1


def test_title_and_tags_can_join_the_text(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(
        data, [photo("1", anps=["happy_dog"], title="Dog", description="so happy", tags="park fun")]
    )
    _filter(cli, data, "--manifest", manifest)
    assert not (_kept(data).index == "1").any(), "2 words: dropped under the paper's rule"
    _filter(cli, data, "--manifest", manifest, "--text-fields", "title,description,tags")
    assert _kept(data).loc["1", "text"] == "Dog so happy park fun"


def test_duplicates_are_kept_once_and_counted(cli, tmp_path, manifest):
    data = tmp_path / "data"
    same_image = "ab" * 32
    records = [
        photo("1", anps=["happy_dog"], description=text_of(8, "one"), sha256=same_image),
        photo("2", anps=["happy_dog"], description=text_of(8, "two"), sha256=same_image),
        # a bulk upload: one owner, one description, many photos
        *[
            photo(f"b{i}", anps=["sad_cat"], description=text_of(9), owner="bulk@N01")
            for i in range(5)
        ],
        # the same text from another owner is not a duplicate
        photo("o", anps=["sad_cat"], description=text_of(9), owner="other@N01"),
    ]
    write_metadata(data, records)
    report = _filter(cli, data, "--manifest", manifest)
    assert sorted(_kept(data).index) == ["1", "b0", "o"]
    assert report["dropped"]["duplicate_image"] == 1
    assert report["dropped"]["duplicate_owner_text"] == 4

    report = _filter(
        cli, data, "--manifest", manifest, "--no-dedup-images", "--no-dedup-owner-text"
    )
    assert len(_kept(data)) == len(records)
    assert report["dropped"]["duplicate_image"] == report["dropped"]["duplicate_owner_text"] == 0


def _many(n: int, start: int = 0, owners: int = 0) -> list[dict]:
    """``n`` distinct labelled photos; with ``owners``, spread over that many owners."""
    records = []
    for i in range(start, start + n):
        salt = "".join(string.ascii_lowercase[int(d)] for d in str(i))
        owner = f"user{i % owners}@N01" if owners else f"user{i}@N01"
        anp = "happy_dog" if i % 3 else "sad_cat"
        records.append(photo(str(i), anps=[anp], description=text_of(7, salt), owner=owner))
    return records


@pytest.mark.slow
def test_split_is_stratified_stable_and_survives_additions(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, _many(20_000), part=0)
    report = _filter(cli, data, "--manifest", manifest, "--workers", "2")
    first = _kept(data)["split"]
    assert len(first) == 20_000
    for label in ("negative", "positive"):
        assert abs(report["test_fraction"][label] - 0.2) < 0.01, report["test_fraction"]
    assert sum(report["splits"]["test"].values()) == (first == "test").sum()

    # A rerun gives the same split; so does a run with more photos, for the photos already there.
    _filter(cli, data, "--manifest", manifest)
    pd.testing.assert_series_equal(_kept(data)["split"], first)
    write_metadata(data, _many(2_000, start=20_000), part=1)
    _filter(cli, data, "--manifest", manifest)
    grown = _kept(data)["split"]
    assert len(grown) == 22_000
    pd.testing.assert_series_equal(grown.loc[first.index], first)

    # Another seed gives another split, at the same fraction.
    _filter(cli, data, "--manifest", manifest, "--seed", "7")
    assert (_kept(data)["split"].loc[first.index] != first).any()


def test_test_fraction_is_configurable(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, _many(5_000))
    report = _filter(cli, data, "--manifest", manifest, "--test-fraction", "0.5")
    test = sum(report["splits"]["test"].values())
    assert 0.47 < test / 5_000 < 0.53


def test_group_by_owner_keeps_each_owner_on_one_side(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, _many(3_000, owners=150))
    _filter(cli, data, "--manifest", manifest, "--group-by", "photo")
    by_photo = _kept(data).groupby("owner")["split"].nunique()
    assert (by_photo == 2).any(), "the paper's split mixes owners"
    _filter(cli, data, "--manifest", manifest, "--group-by", "owner")
    kept = _kept(data)
    assert (kept.groupby("owner")["split"].nunique() == 1).all()
    assert 0.1 < (kept["split"] == "test").mean() < 0.3


def test_outputs_follow_the_schema_and_the_recipe_is_written(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, _many(50))
    result = cli("filter", data, "--manifest", manifest, "--min-words", "6")
    assert result.code == 0
    assert "fewer than 6 words" in result.out
    assert "test fraction asked 0.2" in result.out
    table = pd.read_parquet(data / "filtered.parquet")
    assert list(table.columns) == FILTERED_SCHEMA.names
    resolved = load_recipe(data / "filter-recipe.toml")
    assert resolved.filter.min_words == 6
    assert resolved.anps.manifest == str(manifest)


def test_recipe_of_the_fetch_is_the_default(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, [photo("1", anps=["sunny_beach"], description=text_of(8))])
    fetch_recipe = Recipe().override(
        {"anps.manifest": str(manifest), "anps.pos_threshold": 0.16, "anps.neg_threshold": -0.1}
    )
    from vsotools.core.config import write_recipe

    write_recipe(fetch_recipe, data / "fetch-recipe.toml")
    report = _filter(cli, data)
    assert report["dropped"]["no_labelled_anp"] == 1, "0.12 is unlabelled under MVSO-EN"


def test_empty_result_writes_an_empty_table(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, [photo("1", anps=["happy_dog"], description="too short")])
    report = _filter(cli, data, "--manifest", manifest)
    assert report["kept"] == 0
    assert len(pd.read_parquet(data / "filtered.parquet")) == 0


@pytest.mark.slow
def test_parallel_and_serial_word_counts_agree(tmp_path, manifest):
    data = tmp_path / "data"
    records = _many(25_000)
    for i, r in enumerate(records):
        if i % 4 == 0:
            r["description"] = text_of(4 + i % 3)
    write_metadata(data, records)
    recipe = Recipe().override({"anps.manifest": str(manifest)})
    serial = filtering.filter_dataset(data, recipe.override({"filter.workers": 1}))
    words_serial = _kept(data)["words"]
    parallel = filtering.filter_dataset(data, recipe.override({"filter.workers": 2}))
    assert parallel.dropped == serial.dropped
    pd.testing.assert_series_equal(_kept(data)["words"], words_serial)


def test_missing_metadata_is_a_clear_error(cli, tmp_path):
    result = cli("filter", tmp_path / "nothing")
    assert result.code == 1
    assert "nothing: no photo records in" in result.err and "fetch them first" in result.err
    assert not (tmp_path / "nothing").exists()  # a wrong path is refused, not created


def test_crawled_photos_need_a_manifest_and_nothing_is_lost(cli, tmp_path, manifest):
    data = tmp_path / "data"
    write_metadata(data, _many(20))
    _filter(cli, data, "--manifest", manifest)
    before = (data / "filtered.parquet").read_bytes()
    result = cli("filter", data)
    assert result.code == 1
    assert "needs the ANP manifest" in result.err
    result = cli("filter", data, "--manifest", tmp_path / "missing.csv")
    assert result.code == 1
    assert "missing.csv: no such file" in result.err
    result = cli("filter", data, "--manifest", manifest, "--min-words", "9", "--max-words", "3")
    assert result.code == 1
    assert "filter.max_words: must be at least filter.min_words" in result.err
    assert (data / "filtered.parquet").read_bytes() == before
    assert not list(data.glob(".filter-work*"))


def test_set_then_flags_are_validated_once_as_a_whole(cli, tmp_path, manifest):
    """Bug: the recipe was validated after --set and again after the flags, so a final recipe
    that is valid (200..300 words) was refused on the way (min 200 > the default max 150)."""
    data = tmp_path / "data"
    write_metadata(data, _many(10))
    result = cli(
        "filter", data, "--manifest", manifest, "--set", "filter.min_words=200",
        "--max-words", "300",
    )  # fmt: skip
    assert result.code == 0, result.err
    saved = load_recipe(data / "filter-recipe.toml").filter
    assert (saved.min_words, saved.max_words) == (200, 300)
    # The whole recipe is still checked once, at the end.
    result = cli("filter", data, "--manifest", manifest, "--min-words", "9", "--max-words", "8")
    assert result.code == 1 and "filter.max_words: must be at least" in result.err


def test_a_rerun_on_the_same_records_is_a_no_op_and_new_records_are_filtered(
    cli, tmp_path, manifest
):
    data = tmp_path / "data"
    write_metadata(data, _many(30))
    first = _filter(cli, data, "--manifest", manifest)
    written = (data / "filtered.parquet").stat().st_mtime_ns
    again = cli("filter", data, "--manifest", manifest)
    assert again.code == 0 and "is up to date" in again.out
    assert (data / "filtered.parquet").stat().st_mtime_ns == written
    # Another setting, new photo records, or a changed manifest: filtered again.
    assert _filter(cli, data, "--manifest", manifest, "--min-words", "8")["kept"] == 0
    write_metadata(data, _many(45))
    assert _filter(cli, data, "--manifest", manifest)["input"] == 45 > first["input"]
    before = _kept(data)["label"]
    write_manifest(manifest, {anp: -score for anp, score in SCORES.items()})  # same path
    _filter(cli, data, "--manifest", manifest)
    after = _kept(data)["label"]
    assert len(after) == len(before) > 0 and (after == 1 - before).all()


def test_the_split_follows_its_seed_and_its_fraction():
    keys = [f"photo-{i}" for i in range(2_000)]
    first = [filtering.split_of(k, 2017, 0.2) for k in keys]
    assert first == [filtering.split_of(k, 2017, 0.2) for k in keys]
    assert 0.17 < first.count("test") / len(keys) < 0.23
    other = [filtering.split_of(k, 2018, 0.2) for k in keys]
    moved = sum(a != b for a, b in zip(first, other, strict=True))
    assert moved > 0.2 * len(keys), "another seed must give another split"
    # A photo in test at a fraction stays in test at a larger one.
    wider = [filtering.split_of(k, 2017, 0.3) for k in keys]
    assert all(w == "test" for f, w in zip(first, wider, strict=True) if f == "test")
