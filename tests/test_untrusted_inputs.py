"""Inputs that may be anything, through the command line: what a pairs file, a hand-edited
filtered.parquet or a damaged shard names is refused in one line (the file, key or shard), with
exit status 1, no traceback, and nothing already written lost; one process writes an output
folder at a time, and a killed one leaves nothing stuck.

The refusals a user sees are checked as a user would see them, in subprocesses where a hang, a
traceback on the real stderr or another process is what could go wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_vsotools, vsotools_command
from datakit import outcomes, photo, write_metadata, write_pairs
from PIL import Image
from shard_inputs import make_dataset, write_filtered
from shardkit import tiny_recipe_overrides, tiny_set_arguments, write_shard_set

from vsotools.core.config import Recipe
from vsotools.core.files import LOCK_NAME, FolderBusy, folder_lock
from vsotools.shards.manifest import MANIFEST_NAME, read_manifest
from vsotools.shards.verify import verify_shards
from vsotools.training.train import train


def one_line_error(stderr: str) -> str:
    """The one ``vsotools: error:`` line of a refusal (log lines before it are allowed)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("vsotools: error: ")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]), stderr  # nothing after it
    return errors[0]


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the lock file aside), by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != LOCK_NAME
    }


def write_jpeg(path: Path, colour: tuple[int, int, int] = (200, 120, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path, "JPEG")
    return path


# --- 2. local images: regular files of bounded size, inside the image root ------------------


@pytest.fixture
def hostile_pairs(tmp_path: Path) -> Path:
    """A pairs file naming a good image and things that are not, or lie elsewhere."""
    folder = tmp_path / "pairs"
    write_jpeg(folder / "good.jpg")
    write_jpeg(tmp_path / "outside.jpg")
    os.mkfifo(folder / "fifo.jpg")  # no writer: reading it would wait for ever
    with (folder / "sparse.jpg").open("wb") as fh:
        fh.truncate(1_500_000_000)  # 1.5 GB of zeros that take no disk
    (folder / "device.jpg").symlink_to("/dev/zero")
    return write_pairs(
        folder / "pairs.jsonl",
        {
            "good": "good.jpg",
            "zero": "/dev/zero",
            "fifo": "fifo.jpg",
            "sparse": "sparse.jpg",
            "device-link": "device.jpg",
            "up": "../outside.jpg",
            "absolute": str(tmp_path / "outside.jpg"),
            "nul": "good.jpg\0.png",
        },
    )


def test_fetch_reads_only_regular_files_of_bounded_size_inside_the_pairs_folder(
    hostile_pairs, tmp_path
):
    data = tmp_path / "data"
    started = time.monotonic()
    result = run_vsotools("fetch", "--pairs", hostile_pairs, "--out", data, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60  # a FIFO or /dev/zero would hang or fill memory
    assert outcomes(data) == {
        "good": ("ok", None),
        "zero": ("failed", "outside_root"),
        "fifo": ("failed", "not_a_file"),
        "sparse": ("failed", "too_large"),
        "device-link": ("failed", "not_a_file"),
        "up": ("failed", "outside_root"),
        "absolute": ("failed", "outside_root"),
        "nul": ("failed", "not_a_file"),
    }
    report = json.loads((data / "fetch-report.json").read_text())
    assert report["failed_by_reason"] == {"outside_root": 3, "not_a_file": 3, "too_large": 1}
    assert [path.name for path in (data / "images").rglob("*") if path.is_file()] == ["good.jpg"]


def test_fetch_image_root_lets_a_pairs_file_name_images_elsewhere(hostile_pairs, tmp_path):
    wider = tmp_path / "wider"
    result = run_vsotools(
        "fetch", "--pairs", hostile_pairs, "--out", wider,
        "--set", f"fetch.image_root={tmp_path}", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = outcomes(wider)
    assert found["up"] == found["absolute"] == ("ok", None)
    assert found["zero"] == ("failed", "outside_root")
    assert found["fifo"] == ("failed", "not_a_file")

    everywhere = tmp_path / "everywhere"
    result = run_vsotools(
        "fetch", "--pairs", hostile_pairs, "--out", everywhere,
        "--set", "fetch.image_root=/", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = outcomes(everywhere)
    assert found["zero"] == found["fifo"] == found["device-link"] == ("failed", "not_a_file")
    assert found["sparse"] == ("failed", "too_large")


@pytest.mark.slow
def test_shard_leaves_out_images_that_a_hand_edited_filtered_file_points_elsewhere(tmp_path):
    data = tmp_path / "data"
    records = make_dataset(data, 40, seed=5, kinds=("jpeg",))
    write_jpeg(tmp_path / "x.jpg")
    os.mkfifo(data / "images" / "fifo.jpg")
    (data / "images" / "device.jpg").symlink_to("/dev/zero")
    with (data / "images" / "sparse.jpg").open("wb") as fh:
        fh.truncate(1_500_000_000)
    hostile = {
        "../x.jpg": "outside_root",
        "/etc/hostname": "outside_root",
        "/dev/zero": "outside_root",
        "images/fifo.jpg": "not_a_file",
        "images/device.jpg": "not_a_file",
        "images/sparse.jpg": "too_large",
        "images/00000.jpg\0.png": "not_a_file",
    }
    for record, image_path in zip(records[1:], hostile, strict=False):
        record["image_path"] = image_path
    write_filtered(data, records)
    filtered = hashlib.sha256((data / "filtered.parquet").read_bytes()).hexdigest()
    out = tmp_path / "set"
    args = ["shard", data, "--out", out, "--workers", "1", "--image-size", "32"]

    refused = run_vsotools(*args, timeout=120)  # 7 of 40 is over shard.max_skipped's 1%
    assert refused.returncode == 1
    error = one_line_error(refused.stderr)
    assert "7 of 40 images (17.5%)" in error and "shard.max_skipped" in error
    assert not (out / MANIFEST_NAME).exists()

    accepted = run_vsotools(*args, "--max-skipped", "0.2", timeout=120)
    assert accepted.returncode == 0, accepted.stderr
    manifest = read_manifest(out)
    skipped = {entry["image_path"]: entry["reason"] for entry in manifest.skipped}
    assert skipped == hostile
    assert sum(manifest.samples(split) for split in manifest.splits) == 33
    assert verify_shards(out).ok
    assert hashlib.sha256((data / "filtered.parquet").read_bytes()).hexdigest() == filtered


# --- 3. shards checked against their manifest as they are read ------------------------------


def tar_members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def sample_keys(shard: Path) -> list[str]:
    keys: list[str] = []
    for member in tar_members(shard):
        key = member.name.split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys


def cut_at_sample(shard: Path, keep: int) -> None:
    """Keep the first ``keep`` samples' members and end the archive properly after them: a
    shard that any tar reader reads without complaint."""
    first_dropped = sample_keys(shard)[keep]
    end = next(m.offset for m in tar_members(shard) if m.name.startswith(f"{first_dropped}."))
    shard.write_bytes(shard.read_bytes()[:end] + bytes(2 * tarfile.BLOCKSIZE))


def cut_in_member(shard: Path, name_ending: str, sample: int) -> None:
    """End the file halfway through the data of one member of the ``sample``-th sample."""
    key = sample_keys(shard)[sample]
    member = next(m for m in tar_members(shard) if m.name == f"{key}{name_ending}")
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])


def replace_member_data(shard: Path, sample: int, extension: str, change) -> str:
    """Rewrite one member's bytes in place (same length, so the tar stays valid); its key."""
    key = sample_keys(shard)[sample]
    member = next(m for m in tar_members(shard) if m.name == f"{key}.{extension}")
    data = bytearray(shard.read_bytes())
    start, end = member.offset_data, member.offset_data + member.size
    data[start:end] = change(bytes(data[start:end]))
    assert end - start == member.size
    shard.write_bytes(bytes(data))
    return key


def flip_class(data: bytes) -> bytes:
    return b"1" if data == b"0" else b"0"


def garble_jpeg(data: bytes) -> bytes:
    """The JPEG's headers kept, its entropy-coded data zeroed: it opens, and fails to decode."""
    return data[:600] + bytes(len(data) - 600)


@pytest.fixture(scope="module")
def sound_set(tmp_path_factory) -> Path:
    """120 train samples in 3 shards; the test split is test-000000 (40) and test-000001 (8)."""
    return write_shard_set(
        tmp_path_factory.mktemp("sound") / "set", train=120, test=48, per_shard=40
    )


@pytest.fixture(scope="module")
def checkpoints(sound_set, tmp_path_factory) -> dict[str, Path]:
    """A fusion and a text model trained one epoch on ``sound_set``."""
    root = tmp_path_factory.mktemp("runs")
    for model in ("fusion", "text"):
        recipe = Recipe().override(tiny_recipe_overrides(model=model, epochs=1, workers=1))
        train(recipe, sound_set, root / model, progress=False)
    return {model: root / model / "checkpoint.pt" for model in ("fusion", "text")}


@pytest.fixture
def damaged(sound_set, tmp_path):
    """A fresh copy of the sound set to damage."""
    return Path(shutil.copytree(sound_set, tmp_path / "damaged"))


def evaluate_args(checkpoint: Path, shards: Path, *extra: str) -> list:
    return ["evaluate", "--checkpoint", checkpoint, "--shards", shards, "--json", *extra]


@pytest.mark.slow
def test_evaluate_refuses_a_shard_cut_at_a_sample_boundary_unless_told_not_to_check(
    cli, checkpoints, damaged
):
    shard = damaged / "test-000000.tar"
    cut_at_sample(shard, 30)
    with tarfile.open(shard) as tar:  # a valid tar: nothing but the manifest tells
        assert len(tar.getmembers()) == 30 * 4
    refused = cli(*evaluate_args(checkpoints["fusion"], damaged))
    assert refused.code == 1 and refused.out == ""
    error = one_line_error(refused.err)
    assert f"{shard}: 30 samples, the manifest says 40" in error

    unchecked = cli(*evaluate_args(checkpoints["fusion"], damaged, "--no-check"))
    assert unchecked.code == 0, unchecked.err
    assert json.loads(unchecked.out)["n"] == 30 + 8


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fusion", "text"])
def test_evaluate_refuses_a_shard_truncated_inside_a_member(cli, checkpoints, damaged, model):
    shard = damaged / "test-000000.tar"
    cut_in_member(shard, ".jpg", 12)  # a text model skips over the images it does not read
    for extra in ([], ["--no-check"]):
        refused = cli(*evaluate_args(checkpoints[model], damaged, *extra))
        assert refused.code == 1 and refused.out == ""
        error = one_line_error(refused.err)
        assert f"{shard}: cannot read the shard (truncated tar member" in error


@pytest.mark.slow
def test_evaluate_refuses_a_shard_whose_class_was_changed(cli, checkpoints, damaged):
    shard = damaged / "test-000000.tar"
    replace_member_data(shard, 5, "cls", flip_class)
    refused = cli(*evaluate_args(checkpoints["fusion"], damaged))
    assert refused.code == 1 and refused.out == ""
    error = one_line_error(refused.err)
    assert f"{shard}: labels" in error and "the manifest says" in error


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_jpeg_in_a_shard_is_one_line_naming_shard_and_key(checkpoints, damaged, workers):
    shard = damaged / "test-000000.tar"
    key = replace_member_data(shard, 7, "jpg", garble_jpeg)
    result = run_vsotools(
        *evaluate_args(checkpoints["fusion"], damaged, "--workers", workers), timeout=300
    )
    assert result.returncode == 1 and result.stdout == ""
    error = one_line_error(result.stderr)  # no loader worker's traceback either
    assert f"{shard}: sample {key}:" in error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../outside.tar", "/dev/zero", "sub/../../outside.tar"])
def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(cli, damaged, name):
    shutil.copy(damaged / "test-000001.tar", damaged.parent / "outside.tar")
    manifest = json.loads((damaged / MANIFEST_NAME).read_text())
    manifest["splits"]["test"][1]["name"] = name
    (damaged / MANIFEST_NAME).write_text(json.dumps(manifest))
    run = damaged.parent / "run"
    for args in (["train", "--shards", damaged, "--out", run], ["verify", damaged]):
        result = cli(*args)
        assert result.code == 1 and result.out == ""
        error = one_line_error(result.err)
        assert f"{damaged / MANIFEST_NAME}: shard name {name!r} is not a file name" in error
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut", "truncated", "class", "jpeg"])
def test_train_refuses_a_damaged_train_shard(cli, damaged, tmp_path, damage):
    shard = damaged / "train-000001.tar"
    if damage == "cut":
        cut_at_sample(shard, 30)
    elif damage == "truncated":
        cut_in_member(shard, ".jpg", 12)
    elif damage == "class":
        replace_member_data(shard, 5, "cls", flip_class)
    else:
        replace_member_data(shard, 7, "jpg", garble_jpeg)
    run = tmp_path / "run"
    refused = cli(
        "train", "--shards", damaged, "--out", run, *tiny_set_arguments(epochs=1, workers=1)
    )
    assert refused.code == 1
    assert one_line_error(refused.err).startswith(f"vsotools: error: {shard}: ")
    assert not (run / "metrics.json").exists()


# --- 4. one writer per output folder --------------------------------------------------------


def start_vsotools(*args) -> subprocess.Popen:
    """``vsotools ARGS...`` started in its own session (so that its children can be found)."""
    return subprocess.Popen(
        [*vsotools_command(), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def session_processes(session: int) -> list[int]:
    """Live processes of a session (zombies aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[3]) == session:
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def killed_at_the_end(process: subprocess.Popen):
    """Whatever the test does, no process of ``process``'s session outlives it."""
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, "the command ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lock_is_free(folder: Path) -> bool:
    try:
        with folder_lock(folder, "a test"):
            return True
    except FolderBusy:
        return False


@pytest.mark.slow
def test_two_shard_writers_into_one_folder_one_is_refused_at_once(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, 240, seed=6, kinds=("jpeg",))
    out = tmp_path / "set"
    args = ["shard", data, "--out", out, "--image-size", "96", "--maxcount", "10", "--workers", "1"]
    first, second = start_vsotools(*args, "--seed", "1"), start_vsotools(*args, "--seed", "2")
    with killed_at_the_end(first), killed_at_the_end(second):
        ended = {}
        while len(ended) < 2:
            for process in (first, second):
                if process not in ended and process.poll() is not None:
                    ended[process] = time.monotonic()
            time.sleep(0.02)
        loser, winner = sorted((first, second), key=lambda p: p.returncode, reverse=True)
        assert (winner.returncode, loser.returncode) == (0, 1), (
            first.stderr.read(),
            second.stderr.read(),
        )
        assert ended[loser] < ended[winner]  # stopped at once, not after waiting its turn
        error = one_line_error(loser.stderr.read())
        assert f"{out}: this shard set is being written by process {winner.pid}" in error
    seed = 1 if winner is first else 2
    assert read_manifest(out).build["settings"]["seed"] == seed
    assert verify_shards(out).ok
    result = run_vsotools("verify", out)
    assert result.returncode == 0 and result.stdout.startswith("OK: ")


def test_a_second_writer_that_comes_before_the_holder_has_written_its_id_names_no_dead_one(
    tmp_path,
):
    """The lock is taken a moment before the holder's id is written; a second writer arriving in
    between, over the id a killed writer left, must not name that dead process."""
    folder = tmp_path / "set"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / LOCK_NAME).write_text(f"{dead.pid}\n")
    holder = subprocess.Popen(  # takes the lock and never writes its id
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(folder / LOCK_NAME)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with killed_at_the_end(holder):
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderBusy) as refused, folder_lock(folder, "this shard set"):
            pass
    assert "is being written by another process;" in str(refused.value)
    assert str(dead.pid) not in str(refused.value)


@pytest.mark.slow
def test_a_killed_shard_writer_leaves_no_lock_behind(cli, tmp_path):
    data = tmp_path / "data"
    make_dataset(data, 240, seed=6, kinds=("jpeg",))
    out = tmp_path / "set"
    args = ["shard", data, "--out", out, "--image-size", "96", "--maxcount", "10", "--workers", "2"]
    with killed_at_the_end(start_vsotools(*args)) as writer:
        wait_for(lambda: len(list((out / "_parts").glob("*.json"))) >= 2, writer)
        assert (out / LOCK_NAME).read_text().strip() == str(writer.pid)
        writer.send_signal(signal.SIGKILL)  # the command alone, as the OOM killer would
        writer.wait()
        assert lock_is_free(out)
    result = cli(*args)
    assert result.code == 0, result.err
    assert "from an earlier run" in result.out
    assert verify_shards(out).ok


@pytest.mark.slow
def test_a_dataset_folder_is_written_by_one_process_at_a_time(tmp_path):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg"})
    write_jpeg(pairs.parent / "a.jpg")
    data = tmp_path / "data"
    assert run_vsotools("fetch", "--pairs", pairs, "--out", data).returncode == 0
    before = file_digests(data)
    with folder_lock(data, "a dataset folder"):  # as a fetch or filter running now holds it
        for args in (
            ["fetch", "--pairs", pairs, "--out", data, "--retry-failed"],
            ["filter", data],
        ):
            result = run_vsotools(*args)
            assert result.returncode == 1
            error = one_line_error(result.stderr)
            assert f"{data}: this dataset folder is being written by process {os.getpid()}" in error
    assert file_digests(data) == before
    assert run_vsotools("filter", data).returncode == 0


@pytest.mark.slow
def test_a_killed_filter_leaves_no_lock_behind_even_while_its_word_counters_linger(tmp_path):
    data = tmp_path / "data"
    texts = ("sunny", "beach", "walk", "friends", "blue", "sky", "sad", "rain", "grey", "alone")
    records = [
        photo(
            str(i),
            source="pairs",
            label=("positive", "negative")[i % 2],
            description=" ".join(texts[(i * k) % len(texts)] for k in range(1, 9)) + f" n{i}",
        )
        for i in range(30_000)
    ]  # more distinct texts than one process counts alone
    write_metadata(data, records)
    with killed_at_the_end(start_vsotools("filter", data, "--workers", "2")) as filtering:
        wait_for(lambda: len(session_processes(filtering.pid)) >= 3, filtering)
        filtering.send_signal(signal.SIGKILL)
        filtering.wait()
        assert lock_is_free(data)
        result = run_vsotools("filter", data, "--workers", "1")
        assert result.returncode == 0, result.stderr
        # Nor are the word counters left waiting for work for ever.
        deadline = time.monotonic() + 20
        while session_processes(filtering.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(filtering.pid)


@pytest.mark.slow
def test_a_training_folder_is_written_by_one_process_at_a_time(sound_set, tmp_path):
    run = tmp_path / "run"
    with folder_lock(run, "a training folder"):
        result = run_vsotools(
            "train", "--shards", sound_set, "--out", run, *tiny_set_arguments(epochs=1, workers=1)
        )
    assert result.returncode == 1
    error = one_line_error(result.stderr)
    assert f"{run}: this training folder is being written by process {os.getpid()}" in error
    assert [path.name for path in run.iterdir()] == [LOCK_NAME]


@pytest.mark.slow
def test_a_killed_training_leaves_no_lock_behind_even_while_its_loader_workers_linger(
    cli, tmp_path
):
    shards = write_shard_set(tmp_path / "shards", train=800, test=40, per_shard=100)
    run = tmp_path / "run"
    args = ["train", "--shards", shards, "--out", run, *tiny_set_arguments(epochs=30, workers=2)]
    with killed_at_the_end(start_vsotools(*args)) as training:
        wait_for(
            lambda: (run / "last.pt").exists() and len(session_processes(training.pid)) >= 3,
            training,
        )
        training.send_signal(signal.SIGKILL)
        training.wait()
        assert session_processes(training.pid), "the loader workers are gone already"
        assert lock_is_free(run)
    resumed = ["train", "--shards", shards, "--out", run, *tiny_set_arguments(epochs=2, workers=2)]
    result = cli(*resumed, "--resume")
    assert result.code == 0, result.err


# --- 5. a training resumes only on the shards it started on ---------------------------------


@pytest.mark.slow
def test_resume_on_another_shard_set_is_refused_naming_both_sets(
    cli, checkpoints, sound_set, tmp_path
):
    run = Path(shutil.copytree(checkpoints["fusion"].parent, tmp_path / "run"))
    other = write_shard_set(tmp_path / "other", train=120, test=48, per_shard=40, seed=1)
    before = file_digests(run)
    refused = cli("train", "--resume", "--out", run, "--shards", other)
    assert refused.code == 1 and refused.out == ""
    error = one_line_error(refused.err)
    started_on, offered = read_manifest(sound_set).fingerprint, read_manifest(other).fingerprint
    assert started_on != offered
    assert started_on[:16] in error and offered[:16] in error and str(other) in error
    assert file_digests(run) == before  # metrics.jsonl, last.pt and the recipe as they were


# --- 6. one line instead of a traceback -------------------------------------------------------

NOT_UTF8 = "café".encode("latin-1")


@pytest.mark.parametrize("kind", ["recipe", "pairs.jsonl", "pairs.csv", "credentials"])
def test_a_file_that_is_not_utf8_is_refused_in_one_line(cli, tmp_path, kind):
    data = tmp_path / "data"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("anp,adjective,noun,sentiment\nhappy_dog,happy,dog,1.5\n")
    if kind == "recipe":
        bad = tmp_path / "recipe.toml"
        bad.write_bytes(b'name = "' + NOT_UTF8 + b'"\n')
        args = ["fetch", "--recipe", bad, "--manifest", manifest, "--out", data]
    elif kind == "credentials":
        bad = tmp_path / "flickr.env"
        bad.write_bytes(b"FLICKR_API_KEY=" + NOT_UTF8 + b"\n")
        args = ["fetch", "--manifest", manifest, "--credentials", bad, "--out", data]
    else:
        bad = tmp_path / kind
        if kind.endswith(".csv"):
            bad.write_bytes(b"id,text,label,image\n1," + NOT_UTF8 + b",positive,a.jpg\n")
        else:
            row = b'{"id": "1", "text": "' + NOT_UTF8 + b'", "label": "positive", "image": "a.jpg"}'
            bad.write_bytes(row + b"\n")
        args = ["fetch", "--pairs", bad, "--out", data]
    result = cli(*args)
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert f"{bad}" in error and "not UTF-8 text" in error
    assert not (data / "metadata").exists()
    if kind.startswith("pairs"):  # refused whole: once fixed, the same folder takes it
        bad.write_text(bad.read_bytes().decode("latin-1"), encoding="utf-8")
        write_jpeg(tmp_path / "a.jpg")
        assert cli(*args).code == 0


@pytest.fixture
def make_read_only():
    """Makes a folder read-only, for root too (a read-only bind mount over it); skips the test
    when this machine does not allow mounting."""
    mounted: list[Path] = []

    def make(folder: Path) -> None:
        for command in (
            ["mount", "--bind", folder, folder],
            ["mount", "-o", "remount,bind,ro", folder],
        ):
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                if mounted:
                    subprocess.run(["umount", folder], check=False)
                pytest.skip(f"cannot make a folder read-only here: {done.stderr.strip()}")
            if command[1] == "--bind":
                mounted.append(folder)

    yield make
    for folder in mounted:
        subprocess.run(["umount", folder], check=True)


def test_fetch_into_a_read_only_dataset_folder_is_one_line(cli, tmp_path, make_read_only):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg", "b": "b.jpg"})
    write_jpeg(pairs.parent / "a.jpg")
    data = tmp_path / "data"
    assert cli("fetch", "--pairs", pairs, "--out", data).code == 0
    before = file_digests(data)
    make_read_only(data)
    write_jpeg(pairs.parent / "b.jpg")  # something to fetch again
    result = cli("fetch", "--pairs", pairs, "--out", data, "--retry-failed")
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert "Read-only file system" in error and str(data) in error
    assert file_digests(data) == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 kB file system: room for a tiny model's first checkpoint, not for a second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", disk], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", disk], check=True)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(
    cli, sound_set, tiny_disk, tmp_path
):
    run = tiny_disk / "run"
    settings = tiny_set_arguments(epochs=3, workers=1)
    result = cli("train", "--shards", sound_set, "--out", run, *settings)
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert "No space left on device" in error and str(run / "last.pt") in error
    # The first epoch's checkpoint is whole, no temporary file is left, and the training
    # resumes from it once there is room.
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(path.name for path in run.iterdir() if path.name.startswith(".")) == [LOCK_NAME]
    roomy = Path(shutil.copytree(run, tmp_path / "run"))
    resumed = cli("train", "--shards", sound_set, "--out", roomy, *settings, "--resume")
    assert resumed.code == 0, resumed.err
    assert len((roomy / "metrics.jsonl").read_text().splitlines()) == 3


def filtered_with(data: Path, column: str, values: pa.Array) -> None:
    table = pq.read_table(data / "filtered.parquet")
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, column, values), data / "filtered.parquet")


@pytest.mark.parametrize(
    ("column", "change", "type_name"),
    [
        ("label", lambda t: t.column("label").cast(pa.float64()), "double"),
        ("label", lambda t: t.column("label").cast(pa.bool_()), "bool"),
        ("photo_id", lambda t: pa.array(range(t.num_rows), pa.int64()), "int64"),
        ("text", lambda t: pa.array(range(t.num_rows), pa.int64()), "int64"),
    ],
)
def test_a_filtered_column_of_another_type_is_refused_naming_it(
    cli, tmp_path, column, change, type_name
):
    data = tmp_path / "data"
    make_dataset(data, 12, seed=8, kinds=("jpeg",))
    out = tmp_path / "set"
    assert cli("shard", data, "--out", out, "--image-size", "32", "--workers", "1").code == 0
    written = file_digests(out)
    filtered_with(data, column, change(pq.read_table(data / "filtered.parquet")))
    result = cli("shard", data, "--out", out, "--image-size", "32", "--workers", "1")
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert f"filtered.parquet: column {column} holds {type_name} values" in error
    assert file_digests(out) == written  # the set written before is untouched
    elsewhere = cli("shard", data, "--out", tmp_path / "new", "--image-size", "32")
    assert elsewhere.code == 1 and not (tmp_path / "new").exists()  # no True/False in a .cls


# --- 9. smaller things -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "set"])
def test_a_recipe_name_that_leads_out_of_its_folder_is_refused_naming_the_key(
    cli, tmp_path, monkeypatch, how
):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = work / "recipe.toml"
    if how == "file":
        recipe.write_text('name = "../../x"\n[fetch]\npairs = "pairs.jsonl"\n')
        result = cli("run", recipe)
    else:
        recipe.write_text('[fetch]\npairs = "pairs.jsonl"\n')
        result = cli("run", recipe, "--set", "name=../../x")
    assert result.code == 1
    error = one_line_error(result.err)
    assert "name: '../../x' must be letters, digits" in error
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["a", "b", "recipe.toml"]


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("id", ["1", "2"], "list"),
        ("id", {"n": 1}, "object"),
        ("text", ["happy", "day"], "list"),
        ("text", {"en": "a happy day"}, "object"),
    ],
)
def test_pairs_with_a_json_list_or_object_are_refused_with_file_and_line(
    cli, tmp_path, field, value, kind
):
    path = tmp_path / "pairs.jsonl"
    good = {"id": "0", "text": "a happy day", "label": "positive", "image": "a.jpg"}
    bad = {**good, "id": "1", field: value}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    result = cli("fetch", "--pairs", path, "--out", tmp_path / "data")
    assert result.code == 1
    error = one_line_error(result.err)
    assert f"{path}:2: {field} is a JSON {kind}, not a single value" in error


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_pairs_file_is_refused_by_fetch(cli, tmp_path, content):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    data = tmp_path / "data"
    result = cli("fetch", "--pairs", path, "--out", data)
    assert result.code == 1 and result.out == ""
    assert one_line_error(result.err) == f"vsotools: error: {path}: holds no pairs"
    assert not (data / "fetch-report.json").exists()  # not a complete fetch for filter to read
    # The refused file left no trace: once it holds pairs, the same folder takes it.
    write_pairs(path, {"a": "a.jpg"})
    write_jpeg(tmp_path / "a.jpg")
    fixed = cli("fetch", "--pairs", path, "--out", data)
    assert fixed.code == 0, fixed.err
    assert outcomes(data) == {"a": ("ok", None)}


@pytest.mark.slow
def test_run_names_no_flag_that_run_does_not_have(cli, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with (folder / "pairs.jsonl").open("w") as fh:
        for i in range(60):
            label = ("negative", "positive")[i % 2]
            pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
            text = f"photo {i} of a {label} day at the beach"
            fh.write(json.dumps({"id": str(i), "text": text, "label": label, "image": f"{i}.jpg"}))
            fh.write("\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('name = "t"\n[fetch]\npairs = "pairs/pairs.jsonl"\n[shard]\nreaders = 1\n')
    work = tmp_path / "work"
    stray = work / "shards" / "train-000000.tar"  # a shard file no vsotools run wrote
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not ours")
    args = ["run", recipe, "--workdir", work, "--models", "text"]
    args += tiny_set_arguments(epochs=1, workers=1)
    first = cli(*args)
    assert first.code == 0, first.err
    assert "no vsotools run owns" in first.err  # the pipeline's own set is written again
    assert "--overwrite" not in first.out + first.err

    changed = cli(*args, "--set", "fetch.max_side=300")  # the data was fetched without it
    assert changed.code == 1
    error = one_line_error(changed.err)
    assert "fetch.max_side" in error and str(work / "data") in error
    assert "--out" not in error and "--overwrite" not in error


@pytest.mark.parametrize("kind", ["csv field", "nested json", "nested toml"])
def test_a_file_that_breaks_its_parser_is_refused_in_one_line(cli, tmp_path, kind):
    deep = "[" * 100_000 + "]" * 100_000
    if kind == "csv field":
        bad = tmp_path / "pairs.csv"
        bad.write_text(f"id,text,label,image\n1,{'x' * 200_000},positive,a.jpg\n")
        args, where = ["fetch", "--pairs", bad, "--out", tmp_path / "data"], f"{bad}:2: "
    elif kind == "nested json":
        bad = tmp_path / "pairs.jsonl"
        good = {"id": "1", "text": "a happy day", "label": "positive", "image": "a.jpg"}
        bad.write_text(json.dumps(good)[:-1] + f', "extra": {deep}}}\n')
        args, where = ["fetch", "--pairs", bad, "--out", tmp_path / "data"], f"{bad}:1: "
    else:
        bad = tmp_path / "recipe.toml"
        bad.write_text(f"name = {deep}\n")
        args, where = ["fetch", "--recipe", bad, "--out", tmp_path / "data"], f"{bad}: "
    result = cli(*args)
    assert result.code == 1 and result.out == ""
    assert one_line_error(result.err).startswith(f"vsotools: error: {where}")


# --- checkpoints that load but hold no usable model; text that is not UTF-8 -------------------


def nan_weight(state: dict) -> None:
    name = next(k for k in state["model"] if k.startswith("head.") and k.endswith("weight"))
    state["model"][name][0, 0] = float("nan")


def mis_shaped(state: dict) -> None:
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = torch.zeros(3, 3)


CHECKPOINT_DAMAGES = {
    "NaN weights": (nan_weight, r"weight head\.\S+ holds NaN or infinite values"),
    "an empty model": (lambda s: s.update(model={}), r"weights do not fit its text model"),
    "a mis-shaped model": (mis_shaped, r"weights do not fit its text model"),
    "no vocabulary": (lambda s: s.update(vocab=None), r"reads text but holds no vocabulary"),
    "a recipe that is not TOML": (lambda s: s.update(recipe="[train"), r"recipe is unreadable"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGES)
def test_a_checkpoint_that_loads_but_holds_no_usable_model_is_one_line(
    checkpoints, sound_set, tmp_path, damage
):
    edit, expected = CHECKPOINT_DAMAGES[damage]
    state = torch.load(checkpoints["text"], weights_only=True)
    edit(state)
    damaged_checkpoint = tmp_path / "damaged.pt"
    torch.save(state, damaged_checkpoint)
    for command in (
        ["evaluate", "--checkpoint", damaged_checkpoint, "--shards", sound_set],
        ["predict", "--checkpoint", damaged_checkpoint, "--text", "a happy sunny day"],
    ):
        # With a time limit: NaN scores once made evaluate's ROC AUC loop for ever.
        done = run_vsotools(*command, timeout=120)
        assert done.returncode == 1 and done.stdout == "", (command, done.stdout)
        error = one_line_error(done.stderr)
        assert error.startswith(f"vsotools: error: {damaged_checkpoint}: "), error
        assert re.search(expected, error), error


@pytest.mark.slow
def test_predict_text_that_is_not_utf8_is_one_line(checkpoints):
    # The command line hands bytes that are not UTF-8 to Python as lone surrogates.
    command = [*vsotools_command(), "predict", "--checkpoint", str(checkpoints["text"])]
    done = subprocess.run(
        [*command, "--text", b"a happy caf\xe9 day"], capture_output=True, timeout=120
    )
    assert done.returncode == 1 and done.stdout == b""
    error = one_line_error(done.stderr.decode("utf-8", "replace"))
    assert "the text is not UTF-8" in error


# --- outputs: never a device, a FIFO, a folder or an input -------------------------------------


def special_outputs(folder: Path) -> dict[str, Path]:
    """Paths holding what an output must not replace: a FIFO, a folder, a link to /dev/null and,
    where this user may make one, a device node of its own (never the system's)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {"fifo": folder / "fifo", "folder": folder / "folder", "link": folder / "null-link"}
    os.mkfifo(made["fifo"])
    made["folder"].mkdir()
    made["link"].symlink_to(os.devnull)
    with contextlib.suppress(PermissionError):
        os.mknod(folder / "device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a null device
        made["device"] = folder / "device"
    return made


def kind_of(path: Path) -> str:
    mode = path.lstat().st_mode
    return next(
        name
        for name, test in (
            ("link", stat.S_ISLNK), ("fifo", stat.S_ISFIFO), ("folder", stat.S_ISDIR),
            ("device", stat.S_ISCHR), ("file", stat.S_ISREG),
        )
        if test(mode)
    )  # fmt: skip


EXPECTED_KIND = {
    "fifo": "a FIFO",
    "folder": "a folder",
    "link": "a character device",
    "device": "a character device",
}


@pytest.mark.slow
def test_predict_out_refuses_what_it_must_not_replace(checkpoints, tmp_path):
    pairs = tmp_path / "posts" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text(json.dumps({"id": "a", "text": "a happy sunny day", "image": "a.jpg"}) + "\n")
    checkpoint = Path(shutil.copy(checkpoints["text"], tmp_path / "model.pt"))
    targets = special_outputs(tmp_path / "outs")
    targets.update(pairs=pairs, checkpoint=checkpoint)
    before = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in
              (("pairs", pairs), ("checkpoint", checkpoint))}  # fmt: skip
    for name, out in targets.items():
        kind = kind_of(out)
        done = run_vsotools(
            "predict", "--checkpoint", checkpoint, "--pairs", pairs, "--out", out, timeout=120
        )
        assert done.returncode == 1 and done.stdout == "", (name, done.stdout)
        error = one_line_error(done.stderr)
        if name in ("pairs", "checkpoint"):
            assert f"{out} is {out}, an input of this command" in error, error
        else:
            assert f"{out} is {EXPECTED_KIND[name]}, not a file" in error, error
        assert error.endswith("; write to another --out"), error
        assert kind_of(out) == kind, name
    after = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in
             (("pairs", pairs), ("checkpoint", checkpoint))}  # fmt: skip
    assert after == before
    assert sorted(p.name for p in pairs.parent.iterdir()) == ["pairs.jsonl"]  # no temporary left
    ok = run_vsotools("predict", "--checkpoint", checkpoint, "--pairs", pairs, "--out",
                      tmp_path / "labels.parquet", timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_anps_import_out_refuses_what_it_must_not_replace(tmp_path):
    release = tmp_path / "anps.txt"
    release.write_text(
        "1. beautiful [sentiment: 1.00] [#images: 9]\n\tbeautiful_sky [sentiment: 1.50] [#imgs: 9]\n"
    )
    source = release.read_bytes()
    targets = special_outputs(tmp_path / "outs")
    targets["release"] = release
    for name, out in targets.items():
        kind = kind_of(out)
        done = run_vsotools("anps", "import", release, "--format", "vso", "--out", out, timeout=60)
        assert done.returncode == 1 and done.stdout == "", (name, done.stdout)
        error = one_line_error(done.stderr)
        expected = "an input of this command" if name == "release" else EXPECTED_KIND[name]
        assert f"{out} is " in error and expected in error, error
        assert kind_of(out) == kind, name
    assert release.read_bytes() == source
    ok = run_vsotools("anps", "import", release, "--format", "vso", "--out", tmp_path / "a.csv")
    assert ok.returncode == 0, ok.stderr


# --- the lock file: never followed, never anything but a file ---------------------------------


def lock_replacements(tmp_path: Path) -> dict[str, object]:
    """Ways a copied folder's lock file may be something else; each puts it at a path."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file, not to be cut to a process id\n")

    def device(path: Path) -> None:
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a null device of its own
        except PermissionError:
            pytest.skip("this user may not make a device node")

    return {
        "a symbolic link": lambda path: path.symlink_to(victim),
        "a dangling symbolic link": lambda path: path.symlink_to(tmp_path / "made-by-the-lock"),
        "a folder": lambda path: path.mkdir(),
        "a FIFO": os.mkfifo,
        "a character device": device,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    ["a symbolic link", "a dangling symbolic link", "a folder", "a FIFO", "a character device"],
)
def test_a_lock_file_that_is_not_a_file_is_refused_naming_it(tmp_path, kind):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg"})
    write_jpeg(pairs.parent / "a.jpg")
    data = tmp_path / "data"
    assert run_vsotools("fetch", "--pairs", pairs, "--out", data).returncode == 0
    lock = data / LOCK_NAME
    lock.unlink()
    lock_replacements(tmp_path)[kind](lock)
    before = file_digests(data)
    victim = (tmp_path / "victim.txt").read_bytes()
    result = run_vsotools("filter", data, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    error = one_line_error(result.stderr)
    what = "a symbolic link" if "symbolic link" in kind else kind
    assert error == f"vsotools: error: {lock} is {what}, not a lock file; remove it"
    assert file_digests(data) == before and not (data / "filtered.parquet").exists()
    assert (tmp_path / "victim.txt").read_bytes() == victim
    assert not (tmp_path / "made-by-the-lock").exists()


# --- input files the user names: regular files of bounded size, never a FIFO or a device -------


def run_bounded(*args, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``vsotools ARGS`` with 1 GiB of address space and a time limit: a command that read
    /dev/zero until memory ran out, or waited on a FIFO for ever, fails instead of taking the
    machine or the test run with it."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return run_vsotools(*args, timeout=60, preexec_fn=limit, cwd=cwd)


@pytest.fixture
def named_inputs(tmp_path: Path) -> dict[str, Path]:
    """A FIFO with no writer, an oversized recipe and a manifest to crawl, all in ``tmp_path``."""
    os.mkfifo(tmp_path / "fifo.toml")
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.mkfifo(tmp_path / "fifo.csv")
    big = tmp_path / "big.toml"
    big.write_text('name = "big"\n' + "# padding\n" * 120_000)
    manifest = tmp_path / "anps.csv"
    manifest.write_text("anp,adjective,noun,sentiment\nbeautiful_sky,beautiful,sky,1.5\n")
    return {"dir": tmp_path, "big": big, "manifest": manifest}


def crawl(credentials: str) -> list[str]:
    return ["fetch", "--manifest", "{dir}/anps.csv", "--credentials", credentials,
            "--out", "{dir}/data"]  # fmt: skip


NAMED_INPUT_CASES = {
    "recipe /dev/zero": (
        ["settings", "--recipe", "/dev/zero"],
        "the recipe /dev/zero is a character device, not a regular file",
    ),
    "recipe FIFO": (
        ["settings", "--recipe", "{dir}/fifo.toml"],
        "the recipe {dir}/fifo.toml is a FIFO, not a regular file",
    ),
    "recipe folder": (
        ["filter", "{dir}", "--recipe", "{dir}"],
        "the recipe {dir} is a folder, not a regular file",
    ),
    "recipe too large": (
        ["settings", "--recipe", "{dir}/big.toml"],
        "the recipe {dir}/big.toml has 1,200,013 bytes > 1,048,576",
    ),
    "credentials /dev/zero": (
        crawl("/dev/zero"),
        "the credentials file /dev/zero is a character device, not a regular file",
    ),
    "credentials FIFO": (
        crawl("{dir}/fifo.toml"),
        "the credentials file {dir}/fifo.toml is a FIFO, not a regular file",
    ),
    "fetch pairs FIFO": (
        ["fetch", "--pairs", "{dir}/fifo.jsonl", "--out", "{dir}/data"],
        "the pairs file {dir}/fifo.jsonl is a FIFO, not a regular file",
    ),
    "manifest FIFO": (
        ["anps", "stats", "{dir}/fifo.csv"],
        "the ANP file {dir}/fifo.csv is a FIFO, not a regular file",
    ),
    "release /dev/zero": (
        ["anps", "import", "/dev/zero", "--format", "vso", "--out", "{dir}/anps-out.csv"],
        "the ANP file /dev/zero is a character device, not a regular file",
    ),
}


@pytest.mark.parametrize("case", NAMED_INPUT_CASES)
def test_an_input_file_that_is_not_a_regular_file_of_bounded_size_is_one_line(named_inputs, case):
    arguments, expected = NAMED_INPUT_CASES[case]
    folder = named_inputs["dir"]
    before = sorted(p.name for p in folder.iterdir())
    done = run_bounded(*(a.format(dir=folder) for a in arguments))
    assert done.returncode == 1 and done.stdout == "", (case, done.stdout)
    assert one_line_error(done.stderr) == f"vsotools: error: {expected.format(dir=folder)}"
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing made: no data folder


@pytest.mark.slow
def test_predict_pairs_that_are_a_fifo_is_one_line(checkpoints, tmp_path):
    os.mkfifo(tmp_path / "pairs.jsonl")
    done = run_vsotools(
        "predict", "--checkpoint", checkpoints["text"], "--pairs", tmp_path / "pairs.jsonl",
        "--out", tmp_path / "labels.parquet", timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    error = one_line_error(done.stderr)
    assert (
        error
        == f"vsotools: error: the pairs file {tmp_path}/pairs.jsonl is a FIFO, not a regular file"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_a_jsonl_pairs_line_over_the_bound_is_refused_with_its_line(cli, tmp_path):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg"})
    with pairs.open("a") as fh:
        fh.write(json.dumps({"id": "b", "text": "x" * (1 << 22), "label": "positive",
                             "image": "b.jpg"}) + "\n")  # fmt: skip
    result = cli("fetch", "--pairs", pairs, "--out", tmp_path / "data")
    assert result.code == 1
    assert one_line_error(result.err) == (
        f"vsotools: error: {pairs}:2: not JSON: a line of more than 4,194,304 characters"
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["a FIFO", "a folder"])
def test_a_checkpoint_that_is_a_fifo_or_a_folder_is_one_line(tmp_path, kind):
    checkpoint = tmp_path / "checkpoint.pt"
    if kind == "a FIFO":
        os.mkfifo(checkpoint)
    else:
        checkpoint.mkdir()
    for command in (
        ["evaluate", "--checkpoint", checkpoint, "--shards", tmp_path],
        ["predict", "--checkpoint", checkpoint, "--text", "a happy day"],
    ):
        done = run_vsotools(*command, timeout=120)
        assert done.returncode == 1 and done.stdout == ""
        assert one_line_error(done.stderr) == (
            f"vsotools: error: the checkpoint {checkpoint} is {kind}, not a regular file"
        )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"id": NaN, "text": "a happy day", "label": "positive", "image": "b.jpg"}',
         "not JSON: NaN is not a value JSON allows"),
        ('{"id": 1e400, "text": "a happy day", "label": "positive", "image": "b.jpg"}',
         "not JSON: 1e400 is too large a number"),
        ('{"id": "b", "text": -Infinity, "label": "positive", "image": "b.jpg"}',
         "not JSON: -Infinity is not a value JSON allows"),
    ],
)  # fmt: skip
def test_pairs_with_nan_or_infinite_numbers_are_refused_and_leave_no_trace(
    cli, tmp_path, line, reason
):
    path = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg"})
    write_jpeg(path.parent / "a.jpg")
    with path.open("a") as fh:
        fh.write(line + "\n")
    data = tmp_path / "data"
    result = cli("fetch", "--pairs", path, "--out", data)
    assert result.code == 1 and result.out == ""
    assert one_line_error(result.err) == f"vsotools: error: {path}:2: {reason}"
    assert not data.exists(), "no folder, lock, state or .incoming/ is left behind"
    path.write_text(path.read_text().replace(line + "\n", ""))
    assert cli("fetch", "--pairs", path, "--out", data).code == 0


def test_a_refused_pairs_file_leaves_an_existing_empty_folder_empty(cli, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "0", "text": "a happy day", "label": "joyful", "image": "a.jpg"}\n')
    data = tmp_path / "data"
    data.mkdir()
    result = cli("fetch", "--pairs", path, "--out", data)
    assert result.code == 1
    assert "label 'joyful' of '0' is not one of" in one_line_error(result.err)
    assert list(data.iterdir()) == []


def test_parquet_pairs_with_a_nan_id_are_refused_with_the_row(cli, tmp_path):
    path = tmp_path / "pairs.parquet"
    table = pa.table(
        {
            "id": pa.array([1.0, float("nan")]),
            "text": ["a happy day", "a sad day"],
            "label": ["positive", "negative"],
            "image": ["a.jpg", "b.jpg"],
        }
    )
    pq.write_table(table, path)
    result = cli("fetch", "--pairs", path, "--out", tmp_path / "data")
    assert result.code == 1
    assert one_line_error(result.err) == f"vsotools: error: {path}:2: id is nan, not a value"
    assert not (tmp_path / "data").exists()


# --- a full disk: the file being written is named ---------------------------------------------


def fill_disk(disk: Path, leave: int) -> None:
    """Take all of ``disk``'s free space but about ``leave`` bytes."""
    info = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, info.f_bavail * info.f_frsize - leave))


@pytest.mark.slow
def test_a_full_disk_while_fetch_saves_an_image_is_one_line_naming_the_file(
    cli, tiny_disk, tmp_path
):
    pairs = write_pairs(tmp_path / "pairs" / "pairs.jsonl", {"a": "a.jpg"})
    noise = np.random.default_rng(0).integers(0, 256, size=(600, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(pairs.parent / "a.jpg", "JPEG", quality=95)  # 425 kB > the disk
    data = tiny_disk / "data"
    result = cli("fetch", "--pairs", pairs, "--out", data)
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert "No space left on device" in error and str(data / ".incoming") in error, error
    # The state is whole: once there is room, the same folder finishes the fetch.
    roomy = Path(shutil.copytree(data, tmp_path / "data"))
    assert cli("fetch", "--pairs", pairs, "--out", roomy).code == 0
    assert outcomes(roomy) == {"a": ("ok", None)}


@pytest.mark.slow
def test_a_full_disk_while_filtering_is_one_line_naming_the_file(cli, tiny_disk, tmp_path):
    rng = np.random.default_rng(1)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    records = [
        photo(
            str(i), source="pairs", label=("positive", "negative")[i % 2],
            description=" ".join("".join(rng.choice(letters, 8)) for _ in range(100)),
        )
        for i in range(100)
    ]  # fmt: skip
    data = tiny_disk / "data"
    write_metadata(data, records)  # about 60 kB of text that compresses little
    fill_disk(tiny_disk, leave=16_384)
    before = file_digests(data)
    result = cli("filter", data)
    assert result.code == 1 and result.out == ""
    error = one_line_error(result.err)
    assert "No space left on device" in error and str(data / ".filter-work") in error, error
    assert file_digests(data) == before and not (data / "filtered.parquet").exists()
    (tiny_disk / "filler").unlink()
    assert cli("filter", data).code == 0
