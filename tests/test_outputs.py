"""Outputs that are what they claim: every stage checks the files its last record lists.

A dataset is fetched from a pairs file, filtered and sharded once; each test copies those
outputs, deletes or truncates one file that an output lists, and runs the stage again through
the command line: the stage must say what it found and write exactly the bytes an undisturbed
run wrote, never "up to date" over a missing file.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from shard_inputs import picture

from vsotools.core.status import CURRENT, MISSING, STALE, UNFINISHED
from vsotools.dataset.folder import DatasetFolder

SHARD_ARGS = [
    "--image-size",
    "48",
    "--maxcount",
    "12",
    "--workers",
    "1",
    "--set",
    "shard.readers=1",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``ROOT/data`` (fetched from ``ROOT/pairs.jsonl``, filtered) and ``ROOT/shards``."""
    from conftest import run_vsotools

    root = tmp_path_factory.mktemp("outputs")
    rng = random.Random(3)
    (root / "images").mkdir()
    lines = []
    for i in range(40):
        picture(rng, 64 + i, 48).save(root / "images" / f"{i}.jpg", "JPEG", quality=85)
        label = "positive" if i % 3 else "negative"
        lines.append(json.dumps({"id": f"p{i}", "text": f"photo {i} of a day", "label": label,
                                 "image": f"images/{i}.jpg"}))  # fmt: skip
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    for args in (
        ["fetch", "--pairs", root / "pairs.jsonl", "--out", root / "data"],
        ["filter", root / "data", "--min-words", "1"],
        ["shard", root / "data", "--out", root / "shards", *SHARD_ARGS],
    ):
        done = run_vsotools(*args, timeout=300)
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A copy of the finished outputs, to damage."""
    for name in ("data", "shards"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path


def digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` but reports, locks and the state
    (whose counts and times differ between runs by design)."""
    skipped = {"fetch-report.json", "filter-report.json", ".vsotools.lock", "fetch-state.sqlite"}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skipped and not p.name.startswith("fetch-state.sqlite")
    }


def damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_filter_writes_again_a_filtered_parquet_that_is_gone_or_cut(cli, built, copy, how):
    """Bug: with filtered.parquet deleted, filter printed that it was up to date and that it
    had written it, exited 0, and left no file."""
    before = digests(copy / "data")
    damage(copy / "data" / "filtered.parquet", how)
    again = cli("filter", copy / "data", "--min-words", "1")
    assert again.code == 0, again.err
    assert "up to date" not in again.out
    assert "missing or damaged: filtered.parquet; filtered again" in again.out
    assert digests(copy / "data") == before
    third = cli("filter", copy / "data", "--min-words", "1")
    assert "is up to date" in third.out and "nothing written" in third.out
    assert "wrote" not in third.out


def test_filter_refuses_photo_records_that_fetch_wrote_otherwise(cli, copy):
    part = copy / "data" / "metadata" / "part-00000.parquet"
    damage(part, "truncate")
    refused = cli("filter", copy / "data", "--min-words", "1")
    assert refused.code == 1
    assert "metadata/part-00000.parquet has" in refused.err and "run fetch" in refused.err


@pytest.mark.parametrize(
    ("victim", "how"),
    [
        ("metadata/part-00000.parquet", "delete"),
        ("metadata/part-00000.parquet", "truncate"),
        ("images/00000/p7.jpg", "delete"),
        ("images/00000/p7.jpg", "truncate"),
        ("fetch-recipe.toml", "delete"),
    ],
)
def test_fetch_writes_again_what_its_records_list(cli, built, copy, victim, how):
    before = digests(copy / "data")
    assert victim in before
    damage(copy / "data" / victim, how)
    status = DatasetFolder(copy / "data").status(
        "fetch", json.loads((copy / "data" / "fetch-report.json").read_text())["inputs"]
    )
    assert status.state == UNFINISHED and victim in status.damaged
    again = cli("fetch", "--pairs", built / "pairs.jsonl", "--out", copy / "data")
    assert again.code == 0, again.err
    assert "nothing to do" not in again.out
    assert f"missing or damaged: {victim}" in again.out
    assert digests(copy / "data") == before
    third = cli("fetch", "--pairs", built / "pairs.jsonl", "--out", copy / "data")
    assert "nothing to do" in third.out


def test_a_damaged_recipe_that_a_command_follows_is_refused_by_name(cli, built, copy):
    """Without --recipe, fetch follows DATA/fetch-recipe.toml: a cut one is bad input."""
    damage(copy / "data" / "fetch-recipe.toml", "truncate")
    refused = cli("fetch", "--pairs", built / "pairs.jsonl", "--out", copy / "data")
    assert refused.code == 1
    assert "fetch-recipe.toml: not valid TOML" in refused.err


def shard_names(shards: Path) -> list[str]:
    return sorted(p.name for p in shards.glob("*.tar"))


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_shard_writes_again_a_shard_the_manifest_lists(cli, copy, how):
    """Bug: with one .tar of a finished set deleted, shard said the location already held the
    set and wrote nothing."""
    shards = copy / "shards"
    before = digests(shards)
    victim = shard_names(shards)[1]
    damage(shards / victim, how)
    again = cli("shard", copy / "data", "--out", shards, *SHARD_ARGS)
    assert again.code == 0, again.err
    assert "already holds" not in again.out
    assert f"missing or damaged: {victim}; written again" in again.out
    total = len(shard_names(shards))
    assert f"wrote 1 shard to {shards}, kept {total - 1} from an earlier run" in again.out
    assert digests(shards) == before
    third = cli("shard", copy / "data", "--out", shards, *SHARD_ARGS)
    assert "already holds this shard set, complete" in third.out


@pytest.mark.parametrize("victim", ["manifest.json", "recipe.toml", "_parts/job.json"])
def test_shard_writes_again_its_manifest_recipe_and_job(cli, copy, victim):
    shards = copy / "shards"
    before = digests(shards)
    (shards / victim).unlink()
    again = cli("shard", copy / "data", "--out", shards, *SHARD_ARGS)
    assert again.code == 0, again.err
    if victim == "_parts/job.json":  # not something the set vouches for: still complete
        assert "already holds this shard set, complete" in again.out
        before.pop(victim)
    assert digests(shards) == before


def test_a_truncated_manifest_is_written_again(cli, copy):
    shards = copy / "shards"
    before = digests(shards)
    damage(shards / "manifest.json", "truncate")
    again = cli("shard", copy / "data", "--out", shards, *SHARD_ARGS)
    assert again.code == 0, again.err
    assert digests(shards) == before


def test_the_status_of_each_output(built, copy):
    from vsotools.core.config import load_recipe
    from vsotools.core.storage import Location
    from vsotools.shards.manifest import read_manifest, status

    data = DatasetFolder(copy / "data")
    recipe = load_recipe(data.recipe_file("filter"))
    assert data.status("filter", data.filter_inputs(recipe)).state == CURRENT
    stale = data.status("filter", data.filter_inputs(recipe.override({"filter.min_words": 3})))
    assert stale.state == STALE and "filter.min_words 1 there, 3 now" in stale.why
    assert DatasetFolder(copy / "nothing").status("filter", {}).state == MISSING

    build = read_manifest(copy / "shards").build
    assert status(Location(copy / "shards"), build).state == CURRENT
    other = {**build, "fingerprint": "0" * 64, "settings": {**build["settings"], "quality": 50}}
    stale = status(Location(copy / "shards"), other)
    assert stale.state == STALE and "shard.quality 90 there, 50 now" in stale.why
    assert status(Location(copy / "empty"), build).state == MISSING


# --- the training folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished text training (2 epochs) on a small shard set: (shards, RUN)."""
    from conftest import run_vsotools
    from shardkit import tiny_set_arguments, write_shard_set

    root = tmp_path_factory.mktemp("trained")
    shards = write_shard_set(root / "shards")
    done = run_vsotools(
        "train", "--shards", shards, "--out", root / "run", "--model", "text",
        *tiny_set_arguments(epochs=2, workers=0), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return shards, root / "run"


def train_again(cli, shards: Path, run: Path):
    from shardkit import tiny_set_arguments

    return cli(
        "train", "--shards", shards, "--out", run, "--model", "text", "--resume",
        *tiny_set_arguments(epochs=2, workers=0),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("victim", "how"),
    [
        ("checkpoint.pt", "delete"),
        ("last.pt", "delete"),
        ("last.pt", "truncate"),
        ("metrics.jsonl", "delete"),
        ("metrics.jsonl", "truncate"),
        ("metrics.json", "delete"),
        ("recipe.toml", "delete"),
        ("word2vec.bin", "delete"),
        ("word2vec.bin", "truncate"),
    ],
)
def test_a_resumed_training_writes_again_what_its_final_record_lists(
    cli, trained, tmp_path, victim, how
):
    from vsotools.training.folder import TrainingFolder

    shards, finished = trained
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digests(run)
    damage(run / victim, how)
    if victim != "metrics.json":
        assert victim in TrainingFolder(run).damage()
    if (victim, how) == ("last.pt", "truncate"):
        # A cut checkpoint cannot be resumed from; it is refused by name, nothing is lost.
        refused = train_again(cli, shards, run)
        assert refused.code == 1 and "last.pt: not a readable checkpoint" in refused.err
        return
    again = train_again(cli, shards, run)
    assert again.code == 0, again.err
    assert digests(run) == before


def test_a_replacement_interrupted_between_its_renames_is_settled(tmp_path):
    from vsotools.training.folder import TrainingFolder

    def folder_with(name: str, text: str) -> TrainingFolder:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
        return TrainingFolder(tmp_path / name)

    run = TrainingFolder(tmp_path / "train-text")
    # Killed after the old one was moved aside, before the new one was moved in.
    folder_with("train-text.replaced", "old")
    folder_with("train-text.next", "new")
    run.settle()
    assert (run.root / "metrics.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-text"]
    # Killed with the old one aside and no new one: the old one comes back.
    (run.root).rename(tmp_path / "train-text.replaced")
    run.settle()
    assert (run.root / "metrics.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-text"]
    # The whole swap.
    folder_with("train-text.next", "newer")
    run.replace_with(run.replacement())
    assert (run.root / "metrics.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-text"]


def test_a_checkpoint_not_yet_published_when_the_training_was_killed_is_published_on_resume(
    cli, trained, tmp_path
):
    """Killed between writing last.pt and linking checkpoint.pt to it: the kept model is the
    last epoch's, but checkpoint.pt still held the one before; a resume that trained on would
    have reported epoch N's figures for epoch N-1's model."""
    import torch

    from vsotools.training import checkpoint as ckpt

    shards, finished = trained
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digests(run)
    older = ckpt.load_checkpoint(run / "last.pt")
    older["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in older["model"].items()}
    (run / "checkpoint.pt").unlink()  # a file of its own, no longer last.pt's link
    torch.save(older, run / "checkpoint.pt")
    (run / "metrics.json").unlink()
    again = train_again(cli, shards, run)
    assert again.code == 0, again.err
    assert digests(run) == before


def test_a_shard_set_whose_manifest_is_cut_and_whose_job_is_gone_is_written_again(cli, copy):
    shards = copy / "shards"
    before = digests(shards)
    shutil.rmtree(shards / "_parts")
    damage(shards / "manifest.json", "truncate")
    again = cli("shard", copy / "data", "--out", shards, *SHARD_ARGS)
    assert again.code == 0, again.err
    assert "missing or damaged: manifest.json" in again.out
    assert {k: v for k, v in digests(shards).items() if not k.startswith("_parts/")} == {
        k: v for k, v in before.items() if not k.startswith("_parts/")
    }


def test_downscaled_images_count_by_the_size_they_are_stored_with(cli, built, tmp_path):
    """Bug: with fetch.max_side set, the photo records held the served size of an image and the
    store the downscaled one: every image looked damaged, and every rerun fetched all again."""
    data = tmp_path / "data"
    args = ["fetch", "--pairs", built / "pairs.jsonl", "--out", data, "--set", "fetch.max_side=40"]
    assert cli(*args).code == 0
    again = cli(*args)
    assert again.code == 0 and "nothing to do" in again.out, again.out + again.err
    before = digests(data)
    damage(data / "images/00000/p5.jpg", "truncate")
    repaired = cli(*args)
    assert "missing or damaged: images/00000/p5.jpg" in repaired.out
    assert digests(data) == before


def test_a_setting_that_decided_the_photos_already_fetched_is_pinned(cli, built, copy):
    """A rerun with another min_side would leave the photos fetched under the old one as they
    were, and record the folder as made with the new one: refused, naming the setting."""
    refused = cli(
        "fetch", "--pairs", built / "pairs.jsonl", "--out", copy / "data",
        "--set", "fetch.min_side=250",
    )  # fmt: skip
    assert refused.code == 1
    assert "was started with fetch.min_side = 32, now 250" in refused.err


def test_a_resume_links_checkpoint_pt_to_last_pt_when_the_last_epoch_is_the_one_kept(
    trained, tmp_path
):
    """What a resume does first (rank 0), before it trains on: whatever epochs follow, the kept
    model is then checkpoint.pt, not the one before it."""
    import os

    import torch

    from vsotools.training import checkpoint as ckpt
    from vsotools.training.folder import TrainingFolder
    from vsotools.training.train import _repair_links

    _, finished = trained
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoint.pt").unlink()
    torch.save(ckpt.load_checkpoint(run / "last.pt"), run / "checkpoint.pt")  # another file
    assert not os.path.samefile(run / "checkpoint.pt", run / "last.pt")
    _repair_links(TrainingFolder(run))
    assert os.path.samefile(run / "checkpoint.pt", run / "last.pt")
    (run / "last.pt").unlink()
    _repair_links(TrainingFolder(run))  # finished, the last epoch kept: last.pt comes back
    assert os.path.samefile(run / "checkpoint.pt", run / "last.pt")
