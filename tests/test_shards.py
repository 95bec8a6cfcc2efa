"""``vsotools shard`` and ``vsotools verify`` on real Parquet files, real images and real tars.

The shard sets written here are read back with plain ``tarfile`` and plain ``webdataset``; a run
is killed with SIGKILL midway and rerun; an S3 set goes to a real S3-compatible server (moto)
started on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset
from conftest import run_vsotools, vsotools_command
from PIL import Image
from shard_inputs import make_dataset, write_filtered

from vsotools.cli import build_parser
from vsotools.core.config import Recipe, load_recipe, write_recipe
from vsotools.core.errors import ExistingOutput
from vsotools.core.schema import (
    LABEL_NAMES,
    SAMPLE_CLASS,
    SAMPLE_EXTENSIONS,
    SAMPLE_IMAGE,
    SAMPLE_META,
    SAMPLE_META_FIELDS,
    SAMPLE_TEXT,
    sample_key,
)
from vsotools.core.storage import Location
from vsotools.dataset.folder import DatasetFolder
from vsotools.shards import plan
from vsotools.shards.manifest import MANIFEST_NAME, read_manifest, shard_urls
from vsotools.shards.stage import write_shards
from vsotools.shards.verify import verify_shards
from vsotools.shards.write import MISSING_IMAGE

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("data")
    return root, make_dataset(root, 220)


@pytest.fixture(scope="module")
def shard_set(data, tmp_path_factory) -> Path:
    """A set written through the real entry point, in a subprocess, with two writer processes."""
    root, _ = data
    out = tmp_path_factory.mktemp("sets") / "set"
    result = run_vsotools(
        "shard", root, "--out", out, "--image-size", IMAGE_SIZE, "--maxcount", 25,
        "--workers", 2, "--readers", 4,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    return out


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- planning, on plain lists ---------------------------------------------------------------------


def test_every_stretch_of_the_order_is_a_fair_mix_of_labels():
    labels = [1] * 700 + [0] * 300  # sorted by label, as the worst input would be
    order = plan.order_split(labels, random.Random(5))
    assert sorted(order) == list(range(1000))
    for run in plan.cut_balanced(order, 13):
        positives = sum(labels[i] for i in run)
        assert abs(positives - 0.7 * len(run)) <= 2
    assert order == plan.order_split(labels, random.Random(5))
    assert order != plan.order_split(labels, random.Random(6))


def test_shards_mix_anps_and_owners_that_arrive_grouped():
    # 20 ANPs x 50 photos, arriving one ANP at a time: every shard draws from most ANPs.
    anps = [a for a in range(20) for _ in range(50)]
    order = plan.order_split([0] * len(anps), random.Random(1))
    for run in plan.cut_balanced(order, 10):
        assert len({anps[i] for i in run}) >= 15


def test_shard_counts_and_balanced_cuts():
    assert plan.shard_count(0, 10) == 0
    assert plan.shard_count(95, 10) == 10
    assert plan.shard_count(30, 2000, at_least=8) == 8
    assert plan.shard_count(5, 2000, at_least=8) == 5
    runs = plan.cut_balanced(list(range(95)), 10)
    assert [len(r) for r in runs] == [10] * 5 + [9] * 5
    assert [i for r in runs for i in r] == list(range(95))
    assert plan.cut_balanced([], 0) == []


def test_a_shard_is_planned_with_room_for_the_end_of_the_archive():
    """A tar ends in zero blocks padding it to a whole record (10 KiB): n samples of m bytes
    make a file of up to n*m + RECORDSIZE bytes, and the plan keeps that room below maxsize."""
    mean = 3_000.0
    config = Recipe().shard
    for n in (1, 7, 40):
        fits = dataclasses.replace(config, maxsize=int(n * mean) + tarfile.RECORDSIZE)
        assert plan.samples_per_shard(fits, mean, 0.0) == n
        short = dataclasses.replace(config, maxsize=int(n * mean) + tarfile.RECORDSIZE - 1)
        assert plan.samples_per_shard(short, mean, 0.0) == max(1, n - 1)
    # What the room is for: the archive's own end, on top of its members' bytes.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(7):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = 3_000 - 512  # one header block and the data: about 3,000 bytes a sample
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    members = 7 * (512 + (3_000 - 512 + 511) // 512 * 512)
    assert members < len(buffer.getvalue()) <= members + tarfile.RECORDSIZE


def test_a_shard_over_maxsize_and_only_over_it_is_warned_about(tmp_path):
    from vsotools.shards.manifest import ShardInfo, ShardManifest
    from vsotools.shards.stage import _report

    def warnings(bytes_: int) -> list[str]:
        info = ShardInfo("train-000000.tar", 10, bytes_, "0" * 64, {"positive": 10})
        build = {"settings": {"maxsize": 5_000, "readers": 1}}
        return _report(Location(tmp_path), ShardManifest({"train": [info]}, build=build)).warnings

    assert warnings(5_000) == []
    assert warnings(5_001) == ["train-000000.tar has 5,001 bytes, over maxsize 5,000"]


# --- a written set, read back -------------------------------------------------------------------


@pytest.mark.slow
def test_shards_hold_every_photo_once_with_the_promised_members(data, shard_set):
    _, records = data
    by_key = {sample_key(r["photo_id"]): r for r in records}
    manifest = read_manifest(shard_set)
    seen: dict[str, str] = {}
    for split in ("train", "test"):
        for info in manifest.shards(split):
            path = shard_set / info.name
            assert _sha256(path) == info.sha256 and path.stat().st_size == info.bytes
            samples = _tar_samples(path)
            assert len(samples) == info.samples > 0
            assert info.samples <= 25
            labels = Counter()
            for key, sample in samples.items():
                assert set(sample) == set(SAMPLE_EXTENSIONS)
                record = by_key[key]
                assert record["split"] == split and key not in seen
                seen[key] = split
                meta = json.loads(sample[SAMPLE_META])
                assert set(meta) == set(SAMPLE_META_FIELDS)
                assert meta["photo_id"] == record["photo_id"]
                assert meta["label"] == record["label_name"] == LABEL_NAMES[record["label"]]
                assert meta["anps"] == record["anps"] and meta["words"] == record["words"]
                assert sample[SAMPLE_TEXT].decode("utf-8") == record["text"]
                assert sample[SAMPLE_CLASS] == str(record["label"]).encode()
                image = Image.open(io.BytesIO(sample[SAMPLE_IMAGE]))
                assert image.format == "JPEG" and image.mode == "RGB"
                assert min(image.size) == IMAGE_SIZE
                labels[meta["label"]] += 1
            assert dict(labels) == info.labels
    assert set(seen) == set(by_key)


def test_every_shard_is_a_fair_mix_of_labels(data, shard_set):
    _, records = data
    manifest = read_manifest(shard_set)
    for split in ("train", "test"):
        share = sum(r["label"] for r in records if r["split"] == split) / sum(
            r["split"] == split for r in records
        )
        for info in manifest.shards(split):
            assert abs(info.labels.get("positive", 0) - share * info.samples) <= 2


def test_plain_webdataset_reads_the_set(data, shard_set):
    _, records = data
    manifest = read_manifest(shard_set)
    for split in ("train", "test"):
        urls = shard_urls(str(shard_set), manifest, split)
        dataset = webdataset.WebDataset(urls, shardshuffle=False).decode("pil")
        keys = []
        for sample in dataset:
            keys.append(sample["__key__"])
            assert min(sample["jpg"].size) == IMAGE_SIZE
            assert sample["cls"] in (0, 1)
            assert sample["json"]["label"] == LABEL_NAMES[sample["cls"]]
        expected = {sample_key(r["photo_id"]) for r in records if r["split"] == split}
        assert len(keys) == len(expected) == manifest.samples(split)
        assert set(keys) == expected


def test_the_system_tar_lists_the_shards(data, shard_set):
    _, records = data
    names = []
    for shard in sorted(shard_set.glob("*.tar")):
        listing = subprocess.run(["tar", "tf", shard], capture_output=True, text=True, check=True)
        names += listing.stdout.split()
    assert len(names) == 4 * len(records)
    assert {name.partition(".")[2] for name in names} == set(SAMPLE_EXTENSIONS)
    assert {name.partition(".")[0] for name in names} == {
        sample_key(r["photo_id"]) for r in records
    }
    assert max(len(name) for name in names) > 100


def test_manifest_and_recipe_record_the_configuration(shard_set):
    manifest = read_manifest(shard_set)
    assert manifest.recipe["shard"]["image_size"] == IMAGE_SIZE
    assert manifest.recipe["shard"]["maxcount"] == 25
    assert manifest.build["settings"]["readers"] == 4
    beside = load_recipe(shard_set / "recipe.toml")
    assert (beside.shard.image_size, beside.shard.maxcount, beside.shard.workers) == (64, 25, 2)
    names = sorted(p.name for p in shard_set.glob("*.tar"))
    listed = sorted(s.name for split in manifest.splits for s in manifest.shards(split))
    assert names == listed
    assert listed[0] == "test-000000.tar" and "train-000000.tar" in listed


def test_verify_passes_on_a_sound_set(cli, shard_set):
    result = cli("verify", shard_set, "--workers", "2")
    assert result.code == 0, result.out + result.err
    assert result.out.startswith("OK:")
    report = verify_shards(shard_set)
    assert report.ok and report.samples == 220


# --- verify on damaged sets -----------------------------------------------------------------------


@pytest.fixture
def copy_of_set(shard_set, tmp_path) -> Path:
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", shard_set, out], check=True)
    return out


def test_verify_fails_on_a_shard_whose_bytes_were_altered(cli, copy_of_set):
    manifest = read_manifest(copy_of_set)
    info = manifest.shards("train")[1]
    path = copy_of_set / info.name
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    image = next(m for m in members if m.name.endswith(".jpg"))
    label = next(m for m in members if m.name.endswith(".cls"))
    data = bytearray(path.read_bytes())
    for offset in range(image.offset_data + 400, image.offset_data + 416):
        data[offset] ^= 0xFF  # inside the JPEG's entropy-coded data
    data[label.offset_data] = ord("7")
    path.write_bytes(bytes(data))

    result = cli("verify", copy_of_set, "--workers", "1")
    assert result.code == 1
    lines = result.out.splitlines()
    assert f"{info.name}: sha256 " in result.out
    key = label.name.partition(".")[0]
    assert f"{info.name}: {key}: .cls is '7', not a class index" in lines
    assert any(line.startswith(f"{info.name}: labels ") for line in lines)
    assert all(line.startswith(info.name) for line in lines[:-1])
    assert lines[-1].startswith(f"{len(lines) - 1} problems in")


def test_verify_reports_a_missing_shard_a_stray_shard_and_a_train_test_overlap(copy_of_set):
    manifest = read_manifest(copy_of_set)
    train = manifest.shards("train")
    (copy_of_set / train[-1].name).unlink()
    (copy_of_set / "train-000999.tar").write_bytes((copy_of_set / train[0].name).read_bytes())
    # A test shard that is a copy of a train shard: listed with its true checksum and counts.
    leak = copy_of_set / "test-000777.tar"
    leak.write_bytes((copy_of_set / train[0].name).read_bytes())
    raw = json.loads((copy_of_set / MANIFEST_NAME).read_text())
    raw["splits"]["test"].append({**raw["splits"]["train"][0], "name": leak.name})
    (copy_of_set / MANIFEST_NAME).write_text(json.dumps(raw))
    problems = [str(p) for p in verify_shards(copy_of_set, workers=2).problems]
    assert f"{train[-1].name}: listed in the manifest but not found" in problems
    assert "train-000999.tar: shard file not listed in the manifest" in problems
    overlap = [p for p in problems if p.startswith("test-000777.tar: ") and "in both train" in p]
    assert len(overlap) == train[0].samples


def test_verify_refuses_a_folder_without_manifest(cli, tmp_path):
    result = cli("verify", tmp_path)
    assert result.code == 1
    assert "manifest.json not found" in result.err


# --- reruns, other configurations, bad input ---------------------------------------------------


def test_a_complete_set_is_kept_and_another_configuration_refused(cli, data, tmp_path):
    root, _ = data
    out = tmp_path / "set"
    args = ["shard", root, "--out", out, "--image-size", "48", "--workers", "1", "--maxcount", "60"]
    assert cli(*args).code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = cli(*args)
    assert again.code == 0 and "already holds this shard set" in again.out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps

    other = cli(*args[:-2], "--maxcount", "40")
    assert other.code == 1
    assert "another configuration" in other.err and "shard.maxcount 60 there, 40 now" in other.err
    assert read_manifest(out).build["settings"]["maxcount"] == 60

    replaced = cli(*args[:-2], "--maxcount", "40", "--overwrite")
    assert replaced.code == 0, replaced.err
    manifest = read_manifest(out)
    assert max(s.samples for s in manifest.shards("train")) <= 40
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        s.name for split in manifest.splits for s in manifest.shards(split)
    )
    assert verify_shards(out).ok


def test_shard_files_of_unknown_origin_are_not_overwritten(cli, data, tmp_path):
    root, _ = data
    out = tmp_path / "set"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    result = cli("shard", root, "--out", out)
    assert result.code == 1 and "no vsotools run owns" in result.err
    assert (out / "train-000000.tar").read_bytes() == b"someone else's shard"


def test_missing_and_corrupt_images_are_left_out_and_reported(cli, tmp_path):
    root = tmp_path / "data"
    records = make_dataset(root, 60, seed=3)
    (root / records[5]["image_path"]).unlink()
    corrupt = root / records[9]["image_path"]
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    out = tmp_path / "set"
    failed = cli("shard", root, "--out", out, "--workers", "1", "--image-size", "32")
    assert failed.code == 1
    assert "2 of 60 images (3.3%) are missing or undecodable" in failed.err
    assert not (out / MANIFEST_NAME).exists()

    # The shards already written are kept: a rerun accepting the loss only finishes the set.
    result = cli(
        "shard", root, "--out", out, "--workers", "1", "--image-size", "32",
        "--max-skipped", "0.05",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "left out 2 photos" in result.out
    manifest = read_manifest(out)
    skipped = {entry["photo_id"]: entry["reason"] for entry in manifest.skipped}
    assert skipped[records[5]["photo_id"]] == MISSING_IMAGE
    assert skipped[records[9]["photo_id"]] in ("truncated", "not_an_image")
    assert sum(manifest.samples(split) for split in manifest.splits) == 58
    assert verify_shards(out).ok


@pytest.mark.slow
def test_no_readable_image_at_all_fails_clearly(cli, tmp_path):
    root = tmp_path / "data"
    records = make_dataset(root, 12, seed=4)
    for record in records:
        (root / record["image_path"]).unlink()
    result = cli("shard", root, "--out", tmp_path / "set", "--max-skipped", "1")
    assert result.code == 1 and "no image could be read" in result.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"photo_id": "a_b"}, "(photo 'a_b'): the same photo id as row 0"),
        ({"photo_id": "a.b"}, "(photo 'a.b'): its sample key 'a_b' is also that of photo 'a_b'"),
        ({"split": "validation"}, "split 'validation' is not one of train, test"),
        ({"label_name": "negative"}, "label_name 'negative' does not match label 1"),
        ({"label": 2, "label_name": "positive"}, "label 2 is not 0 or 1"),
    ],
)
def test_input_that_cannot_become_samples_is_refused(cli, tmp_path, change, message):
    root = tmp_path / "data"
    records = make_dataset(root, 2, seed=1)
    for photo_id, record in zip(("a_b", "c"), records, strict=True):
        record.update(photo_id=photo_id, label=1, label_name="positive")
    records[1].update(change)
    write_filtered(root, records)
    result = cli("shard", root, "--out", tmp_path / "set")
    assert result.code == 1
    assert message in result.err and "filtered.parquet: row 1 (photo" in result.err
    assert not (tmp_path / "set").exists()


def test_missing_input_and_bad_output_location_fail_with_one_line(cli, data, tmp_path):
    missing = cli("shard", tmp_path / "nowhere", "--out", tmp_path / "set")
    assert missing.code == 1
    assert "filtered.parquet not found: filter the dataset" in missing.err
    root, _ = data
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad = cli("shard", root, "--out", a_file)
    assert bad.code == 1 and "exists and is not a folder" in bad.err
    under_file = cli("shard", root, "--out", a_file / "set")
    assert under_file.code == 1 and "cannot create the output folder" in under_file.err
    assert cli("shard", root, "--out", tmp_path / "s", "--maxcount", "0").code == 1


def test_a_dataset_without_test_photos_makes_a_train_only_set(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, 12, seed=2, test_every=10**6)  # only row 0 is test: drop it
    records = [r for r in pq.read_table(root / "filtered.parquet").to_pylist()]
    write_filtered(root, [r for r in records if r["split"] == "train"])
    recipe = Recipe().override({"shard.image_size": 32, "shard.workers": 1, "shard.readers": 2})
    report = write_shards(recipe, root, tmp_path / "set")
    assert list(report.splits) == ["train"] and report.splits["train"].samples == 11
    assert list(read_manifest(tmp_path / "set").splits) == ["train"]


def test_maxsize_bounds_shard_bytes(data, tmp_path):
    root, _ = data
    recipe = Recipe().override(
        {"shard.image_size": IMAGE_SIZE, "shard.maxsize": 60_000, "shard.workers": 1}
    )
    report = write_shards(recipe, root, tmp_path / "set")
    manifest = read_manifest(tmp_path / "set")
    sizes = [s.bytes for split in manifest.splits for s in manifest.shards(split)]
    assert len(sizes) > 8 and max(sizes) <= 60_000
    assert not report.warnings


def test_too_few_train_shards_for_the_readers_is_warned(data, tmp_path, caplog):
    root, _ = data
    recipe = Recipe().override({"shard.image_size": 32, "shard.readers": 500, "shard.workers": 1})
    report = write_shards(recipe, root, tmp_path / "set")
    assert report.splits["train"].shards == report.splits["train"].samples == 176
    assert any("only 176 train shards for shard.readers=500" in w for w in report.warnings)
    assert "some readers would get no shard" in caplog.text


@pytest.mark.slow
def test_the_progress_bar_counts_samples_and_shards(data, tmp_path, capsys):
    root, records = data
    recipe = Recipe().override({"shard.image_size": 32, "shard.maxcount": 50, "shard.workers": 2})
    report = write_shards(recipe, root, tmp_path / "set", progress=True)
    bar = capsys.readouterr().err
    total = sum(s.shards for s in report.splits.values())
    assert f"{len(records)}/{len(records)}" in bar and f"shards {total}/{total}" in bar


# --- a run killed midway, then rerun -------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_midway_is_finished_by_a_rerun(cli, tmp_path):
    root = tmp_path / "data"
    make_dataset(root, 360, seed=7, kinds=("jpeg",))
    out, clean = tmp_path / "killed", tmp_path / "clean"
    args = ["--image-size", "96", "--maxcount", "8", "--workers", "2"]
    process = subprocess.Popen(
        [*vsotools_command(), "shard", root, "--out", out, *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list((out / "_parts").glob("*-*.json"))) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = _children(process.pid)
    assert len(workers) >= 2
    os.kill(process.pid, signal.SIGKILL)  # the command only, as the OOM killer would
    process.wait()
    deadline = time.monotonic() + 20
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [pid for pid in workers if _running(pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever else the session still holds
    assert not orphans, "writer processes outlived the killed command"
    assert not (out / MANIFEST_NAME).exists()
    left = {p.name: _sha256(p) for p in out.glob("*.tar")}
    assert 3 <= len(left) < 40

    result = cli("shard", root, "--out", out, *args)
    assert result.code == 0, result.err
    assert "from an earlier run" in result.out
    assert not [p for p in out.rglob("*.tmp")]
    assert verify_shards(out, workers=2).ok

    # The rerun gives the very set an uninterrupted run gives, and every shard that was under
    # its final name at the kill was already complete.
    assert cli("shard", root, "--out", clean, *args).code == 0
    finished = read_manifest(out)
    reference = read_manifest(clean)
    assert finished.splits == reference.splits
    final = {s.name: s.sha256 for split in finished.splits for s in finished.shards(split)}
    assert all(final[name] == sha for name, sha in left.items())


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, parent, ...); [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    pids = (int(path.name) for path in Path("/proc").iterdir() if path.name.isdigit())
    return [child for child in pids if _stat(child)[1:2] == [str(pid)]]


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive; an exited process the container has not reaped yet is not."""
    return _stat(pid)[:1] not in ([], ["Z"], ["X"])


# --- real photos ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mvsa_photos_make_a_valid_set(shared_data, tmp_path):
    pairs = [
        json.loads(line)
        for line in (shared_data / "mvsa-dev" / "pairs.jsonl").read_text("utf-8").splitlines()
    ]
    chosen = [p for p in pairs if p["label"] in LABEL_NAMES][:150]
    records = []
    for i, pair in enumerate(chosen):
        label = LABEL_NAMES.index(pair["label"])
        records.append(
            {
                "photo_id": pair["id"],
                "text": pair["text"],
                "words": len(pair["text"].split()),
                "label": label,
                "label_name": pair["label"],
                "split": "test" if i % 5 == 0 else "train",
                "anps": [],
                "anp_scores": [],
                "owner": None,
                "license": None,
                "image_url": None,
                "image_path": pair["image"],
                "sha256": None,
            }
        )
    root = tmp_path / "mvsa"
    root.mkdir()
    (root / "images").symlink_to(shared_data / "mvsa-dev" / "images")
    write_filtered(root, records)
    recipe = Recipe().override({"shard.image_size": 128, "shard.workers": 2, "shard.readers": 4})
    report = write_shards(recipe, root, tmp_path / "set")
    written = sum(s.samples for s in report.splits.values())
    assert written + len(report.skipped) == 150 and len(report.skipped) <= 1
    assert report.splits["train"].shards == 4
    check = verify_shards(tmp_path / "set", workers=2)
    assert check.ok, [str(p) for p in check.problems]


# --- object storage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, found through the standard AWS_* variables."""
    pytest.importorskip("s3fs")
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("shards")
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.mark.slow
def test_a_set_on_s3_is_written_resumed_and_verified(cli, data, s3_server, tmp_path):
    import s3fs

    root, records = data
    url = "s3://shards/vso/run1"
    args = ["--image-size", "48", "--maxcount", "40", "--workers", "2"]
    result = run_vsotools("shard", root, "--out", url, *args)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(url)
    assert sum(manifest.samples(split) for split in manifest.splits) == len(records)

    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("shards/vso/run1"))
    assert "manifest.json" in names and "recipe.toml" in names
    first = manifest.shards("train")[0]
    with fs.open(f"shards/vso/run1/{first.name}", "rb") as fh:
        data_bytes = fh.read()
    assert hashlib.sha256(data_bytes).hexdigest() == first.sha256
    with tarfile.open(fileobj=io.BytesIO(data_bytes)) as tar:
        assert len(tar.getnames()) == 4 * first.samples

    # Lose the manifest and one shard, as a crash would: the rerun rewrites only that shard.
    fs.rm_file(f"shards/vso/run1/{MANIFEST_NAME}")
    fs.rm_file(f"shards/vso/run1/{first.name}")
    fs.rm_file(f"shards/vso/run1/_parts/{first.name.removesuffix('.tar')}.json")
    resumed = cli("shard", root, "--out", url, *args)
    assert resumed.code == 0, resumed.err
    total = sum(len(shards) for shards in manifest.splits.values())
    assert "from an earlier run" in resumed.out and f"{total - 1} from" in resumed.out
    assert read_manifest(url).splits == manifest.splits

    verified = cli("verify", url, "--workers", "2")
    assert verified.code == 0, verified.out
    damaged = bytearray(data_bytes)
    damaged[3000] ^= 0xFF
    fs.pipe_file(f"shards/vso/run1/{first.name}", bytes(damaged))
    failed = cli("verify", url)
    assert failed.code == 1 and f"{first.name}: sha256" in failed.out


def test_s3_without_a_bucket_fails_with_one_line(cli, data, s3_server):
    root, _ = data
    result = cli("shard", root, "--out", "s3://no-such-bucket/set", "--workers", "1")
    assert result.code == 1
    assert "s3://no-such-bucket/set" in result.err and "bucket" in result.err.lower()


def test_s3_urls_without_s3fs_name_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from vsotools.cli import main\n"
        "sys.exit(main(['verify', 's3://bucket/set']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'vsotools[s3]'" in result.stderr


# --- the documentation ----------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "shard.md"


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS.read_text("utf-8"), re.DOTALL)


@pytest.mark.slow
def test_every_documented_example_runs(cli, s3_server, tmp_path, monkeypatch):
    import s3fs

    make_dataset(tmp_path / "data" / "vso", 40, seed=11)
    (tmp_path / "pipelines").symlink_to(DOCS.parents[1] / "pipelines")
    s3fs.S3FileSystem().mkdir("my-bucket")
    monkeypatch.chdir(tmp_path)
    commands = [
        line
        for block in _code_blocks("sh")
        for line in block.splitlines()
        if line.startswith("vsotools ")
    ]
    assert len(commands) >= 6
    for command in commands:  # the S3 ones reach the moto server through AWS_ENDPOINT_URL
        result = cli(*shlex.split(command)[1:])
        assert result.code == 0, f"{command}: {result.err}"
    for block in _code_blocks("python"):
        exec(compile(block, str(DOCS), "exec"), {})


def test_every_option_is_documented():
    text = DOCS.read_text("utf-8")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("shard", "verify"):
        for action in commands.choices[name]._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"vsotools {name} {option} is not in {DOCS.name}"


def test_the_cli_imports_no_heavy_stage_module():
    """Each shard writer process (spawn) imports the ``vsotools`` script's module again: with
    nltk, pandas or torch behind ``vsotools.cli`` every worker would pay for them (the shard
    benchmark measured 1.57x the floor's time instead of 1.21x)."""
    code = "import sys, vsotools.cli; print(sorted({'nltk', 'pandas', 'torch', 'gensim'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_without_a_recipe_shard_follows_the_recipe_the_dataset_was_filtered_with(cli, tmp_path):
    """Bug: `vsotools shard DATA --out S` loaded no recipe and wrote the built-in VSO settings
    into S/recipe.toml and the manifest, whatever recipe DATA was made with."""
    root = tmp_path / "data"
    make_dataset(root, 30, seed=3)
    filtered_with = Recipe().override(
        {"name": "mvso-en", "anps.pos_threshold": 0.16, "shard.image_size": 48, "shard.readers": 2}
    )
    write_recipe(filtered_with, DatasetFolder(root).recipe_file("filter"))
    result = cli("shard", root, "--out", tmp_path / "set", "--maxcount", "10")
    assert result.code == 0, result.err
    written = load_recipe(tmp_path / "set" / "recipe.toml")
    assert written.name == "mvso-en" and written.anps.pos_threshold == 0.16
    assert (written.shard.image_size, written.shard.maxcount) == (48, 10)
    manifest = read_manifest(tmp_path / "set")
    assert manifest.recipe["name"] == "mvso-en"
    assert manifest.build["settings"]["image_size"] == 48
    with tarfile.open(tmp_path / "set" / manifest.shards("train")[0].name) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with Image.open(tar.extractfile(member)) as image:
            assert min(image.size) == 48


@pytest.mark.slow
def test_a_shard_over_maxsize_is_warned_about(cli, tmp_path):
    """Shards are planned from measured sample sizes; a shard that still exceeds maxsize (here a
    maxsize below the size of any one sample) is named in a warning, not passed over."""
    root = tmp_path / "data"
    make_dataset(root, 12, seed=4)
    result = cli("shard", root, "--out", tmp_path / "set", "--maxsize", "2kB", "--readers", "1")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "set")
    shards = [info for infos in manifest.splits.values() for info in infos]
    assert all(info.samples == 1 and info.bytes > 2000 for info in shards)
    for info in shards:
        assert f"{info.name} has {info.bytes:,} bytes, over maxsize 2,000" in result.err


def test_shard_bounds_pixels_as_the_recipe_s_fetch_does(tmp_path):
    """The bound on pixels is the recipe's fetch.max_pixels, as fetch kept the images under (it
    was a fixed 40 million, so fetch could keep an image that shard then left out), and it is
    part of what the set is made from."""
    root = tmp_path / "data"
    records = make_dataset(root, 20, seed=4, kinds=("jpeg",))
    pixels = {}
    for record in records:
        with Image.open(root / record["image_path"]) as image:
            pixels[record["photo_id"]] = image.width * image.height
    bound = sorted(pixels.values())[len(pixels) // 2]
    settings = {"shard.image_size": 32, "shard.workers": 1, "shard.max_skipped": 1.0}
    bounded = Recipe().override({**settings, "fetch.max_pixels": bound})
    report = write_shards(bounded, root, tmp_path / "bounded")
    over = {photo for photo, n in pixels.items() if n > bound}
    assert over and {s["photo_id"] for s in report.skipped} == over
    assert {s["reason"] for s in report.skipped} == {"too_many_pixels"}
    assert read_manifest(tmp_path / "bounded").skipped == report.skipped

    everything = write_shards(Recipe().override(settings), root, tmp_path / "everything")
    assert not everything.skipped
    # Under another bound it is another set: refused over the first, not "already written".
    with pytest.raises(ExistingOutput, match=f"input.max_image_pixels {bound} there, 40000000 now"):
        write_shards(Recipe().override(settings), root, tmp_path / "bounded")
