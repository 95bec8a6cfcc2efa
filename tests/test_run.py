"""vsotools run on a pairs recipe: every stage, per-model settings, fusion from the branches."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vsotools.core.config import load_recipe
from vsotools.core.errors import ConfigError
from vsotools.core.images import encode_jpeg
from vsotools.demo import corpus
from vsotools.training.checkpoint import load_checkpoint
from vsotools.training.predict import predict

pytestmark = pytest.mark.slow

RECIPE = """
name = "tiny-pairs"

[fetch]
pairs = "pairs.jsonl"

[filter]
min_words = 1

[shard]
image_size = 72
maxcount = 30
readers = 1

[train]
batch_size = 16
lr = 1e-3
epochs = 2
word_dim = 16
num_filters = 8
crop_size = 64
conv_channels = [8, 16, 16, 16, 16]
fc_sizes = [32, 16]
workers = 1
w2v_epochs = 5

[run]
models = ["fusion", "text", "image"]
fusion_from_branches = true
image_set = ["train.epochs=1", "train.class_weights=balanced"]
fusion_set = ["train.freeze_branches_epochs=1"]
"""


@pytest.fixture(scope="module")
def pairs_recipe(tmp_path_factory) -> Path:
    """A pairs file of 120 photos whose label shows in the text and the image."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(5)
    (root / "images").mkdir()
    lines = []
    for i in range(120):
        label = i % 2
        image = f"images/{i}.jpg"
        (root / image).write_bytes(encode_jpeg(corpus.draw_image(rng, label)))
        words = corpus._POSITIVE_WORDS if label else corpus._NEGATIVE_WORDS
        text = f"a {rng.choice(words)} day by the sea, {rng.choice(words)} indeed"
        label_name = "positive" if label else "negative"
        lines.append(json.dumps({"id": f"t{i}", "text": text, "label": label_name, "image": image}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "tiny.toml").write_text(RECIPE)
    return root / "tiny.toml"


@pytest.fixture(scope="module")
def finished(pairs_recipe, tmp_path_factory):
    from conftest import run_vsotools

    workdir = tmp_path_factory.mktemp("run") / "work"
    done = run_vsotools("run", pairs_recipe, "--workdir", workdir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


@pytest.mark.slow
def test_every_stage_runs_and_branches_train_before_fusion(finished):
    _, stdout = finished
    assert stdout.startswith("plan:\n  fetch ")
    assert "  train fusion  after the stages before it" in stdout
    stages = [line.split("]")[0][1:] for line in stdout.splitlines() if line.startswith("[")]
    assert stages == [
        "fetch", "filter", "shard", "train text", "train image", "train fusion", "evaluate",
        "report",
    ]  # fmt: skip
    assert "Deep fusion CNN" in stdout and "Text CNN (ST)" in stdout


@pytest.mark.slow
def test_each_model_gets_its_own_settings(finished):
    workdir, _ = finished
    epochs = {
        model: len((workdir / f"train-{model}" / "metrics.jsonl").read_text().splitlines())
        for model in ("text", "image", "fusion")
    }
    assert epochs == {"text": 2, "image": 1, "fusion": 2}
    image = load_recipe(workdir / "train-image" / "recipe.toml").train
    assert (image.model, image.class_weights) == ("image", "balanced")
    fusion = load_recipe(workdir / "train-fusion" / "recipe.toml").train
    assert fusion.init_text == str(workdir / "train-text" / "checkpoint.pt")
    assert fusion.init_image == str(workdir / "train-image" / "checkpoint.pt")
    assert fusion.freeze_branches_epochs == 1


@pytest.mark.slow
def test_the_fusion_starts_from_the_trained_branches(finished):
    workdir, _ = finished
    text = load_checkpoint(workdir / "train-text" / "checkpoint.pt")
    fusion = load_checkpoint(workdir / "train-fusion" / "checkpoint.pt")
    assert fusion["vocab"] == text["vocab"], "the fusion reads with the text run's vocabulary"


@pytest.mark.slow
def test_a_second_run_does_no_work_and_says_so(pairs_recipe, finished, cli):
    workdir, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    again = cli("run", pairs_recipe, "--workdir", workdir)
    assert again.code == 0, again.err
    plan = again.out.split("[fetch]")[0]
    assert plan.count("skip: complete and current") == 6, plan
    assert "nothing to do: every output is complete and current" in again.out
    assert "Deep fusion CNN" in again.out
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == stamps


@pytest.mark.slow
def test_checkpoints_evaluate_on_a_held_out_pairs_file(pairs_recipe, finished, cli, tmp_path):
    """How a team checks a recipe on pairs it has never seen: every pair into test, then evaluate."""
    workdir, _ = finished
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    lines = (pairs_recipe.parent / "pairs.jsonl").read_text().splitlines()[:40]
    for line in lines:  # the same photos under new ids and paths: a second, separate pairs file
        record = json.loads(line)
        image = held_out / Path(record["image"]).name
        image.write_bytes((pairs_recipe.parent / record["image"]).read_bytes())
        record.update(id="h" + record["id"], image=str(image))
        with (held_out / "pairs.jsonl").open("a") as out:
            out.write(json.dumps(record) + "\n")
    data, shards = tmp_path / "data", tmp_path / "shards"
    assert cli("fetch", "--pairs", held_out / "pairs.jsonl", "--out", data).code == 0
    filtered = cli("filter", data, "--recipe", pairs_recipe, "--test-fraction", "1")
    assert filtered.code == 0, filtered.err
    sharded = cli("shard", data, "--out", shards, "--recipe", pairs_recipe)
    assert sharded.code == 0 and "readers would get no shard" not in sharded.err + sharded.out
    splits = json.loads((shards / "manifest.json").read_text())["splits"]
    assert sum(shard["samples"] for shard in splits["test"]) == 40
    assert not splits.get("train")
    held = [json.loads(line) for line in (held_out / "pairs.jsonl").read_text().splitlines()]
    for model in ("text", "image", "fusion"):
        checkpoint = workdir / f"train-{model}" / "checkpoint.pt"
        result = cli("evaluate", "--checkpoint", checkpoint, "--shards", shards, "--json")
        assert result.code == 0, result.err
        metrics = json.loads(result.out)
        # Scoring the shards agrees with predicting every pair on its own, from its file.
        right = sum(
            predict(checkpoint, image=pair["image"], text=pair["text"], device="cpu").label
            == pair["label"]
            for pair in held
        )
        assert metrics["n"] == 40 and metrics["accuracy"] == right / 40


RETRY_RECIPE = """
name = "retried"

[fetch]
pairs = "pairs.jsonl"
allowed_hosts = ["127.0.0.1:{port}"]
download_retries = 0

[filter]
min_words = 1

[shard]
image_size = 72
maxcount = 40
readers = 1

[train]
batch_size = 16
epochs = 1
word_dim = 8
num_filters = 4
workers = 1
w2v_epochs = 1

[run]
models = ["text"]
"""


@contextlib.contextmanager
def image_host(images: dict[str, bytes], missing: set[str]):
    """A real HTTP server on 127.0.0.1 serving ``images`` by name, 404 for names in ``missing``
    (a set the test may empty later)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            if name not in images or name in missing:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(images[name])))
            self.end_headers()
            self.wfile.write(images[name])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_new_images_and_edited_inputs_reach_every_stage(cli, tmp_path):
    """Bug: after `fetch --retry-failed` brought more images, `run` skipped filter (it compared
    only recipe sections), so the filter and the shards silently stayed at the old data; the
    same when the pairs file was edited in place. Every stage now follows its inputs."""
    rng = random.Random(8)
    images, lines = {}, []
    for i in range(150):
        label = i % 2
        images[f"{i}.jpg"] = encode_jpeg(corpus.draw_image(rng, label))
        words = corpus._POSITIVE_WORDS if label else corpus._NEGATIVE_WORDS
        lines.append({"id": f"p{i}", "text": f"a {rng.choice(words)} day", "label": label})
    missing = {f"{i}.jpg" for i in range(0, 150, 5)}  # 30 images not served at first
    work = tmp_path / "work"
    with image_host(images, missing) as port:
        for line in lines:
            line.update(
                image=f"http://127.0.0.1:{port}/{line['id'][1:]}.jpg",
                label=("positive" if line["label"] else "negative"),
            )
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
        recipe = tmp_path / "retried.toml"
        recipe.write_text(RETRY_RECIPE.replace("{port}", str(port)))

        first = cli("run", recipe, "--workdir", work, "--json")
        assert first.code == 0, first.err
        assert json.loads((work / "data" / "filter-report.json").read_text())["kept"] == 120
        assert _samples(work / "shards") == 120

        missing.clear()
        retried = cli("fetch", "--out", work / "data", "--retry-failed")
        assert retried.code == 0, retried.err
        assert "downloaded 150" in retried.out

        second = cli("run", recipe, "--workdir", work)
        # Bug: the text model trained on 120 photos was refused as stale and the run stopped;
        # run brings every output up to date, as make does: it says so, then trains it again.
        assert second.code == 0, second.err
        plan = " ".join(second.out.split("[fetch]")[0].split())
        assert "fetch skip: complete and current" in plan
        assert "filter run again: stale, made from other inputs (metadata.part-00000" in plan
        assert "train text after the stages before it" in plan
        assert json.loads((work / "data" / "filter-report.json").read_text())["kept"] == 150
        assert _samples(work / "shards") == 150
        assert "[train text] done: trained again (made from other inputs (shards changed)" in (
            second.out
        )
        assert json.loads((work / "train-text" / "metrics.json").read_text())["n"] == _samples(
            work / "shards", "test"
        )
        assert not (work / "train-text.next").exists()
        third = cli("run", recipe, "--workdir", work, "--json")
        assert third.code == 0, third.err
        assert json.loads(third.out)["already_complete"] is True

        # The pairs file edited in place (every label flipped) is noticed, not trained on.
        flipped = [
            {**line, "label": "negative" if line["label"] == "positive" else "positive"}
            for line in lines
        ]
        pairs.write_text("".join(json.dumps(line) + "\n" for line in flipped))
        fourth = cli("run", recipe, "--workdir", work)
        assert fourth.code == 1, fourth.out
        assert f"{pairs} when its sha256 was" in fourth.err and "has changed since" in fourth.err
        # Refused before the plan, which would have said that fetch runs again.
        assert "plan:" not in fourth.out and "[fetch]" not in fourth.out


@pytest.mark.slow
def test_a_fetch_setting_the_dataset_was_started_with_is_refused_before_the_plan(
    pairs_recipe, finished, cli, tmp_path
):
    workdir, _ = finished
    state = workdir / "data" / "fetch-state.sqlite"
    before = state.read_bytes()
    changed = cli("run", pairs_recipe, "--workdir", workdir, "--set", "fetch.max_side=48")
    assert changed.code == 1, changed.out
    assert changed.err.splitlines()[-1].startswith(
        f"vsotools: error: {workdir / 'data'} was started with fetch.max_side = 0, now 48;"
    )
    assert "plan:" not in changed.out
    assert state.read_bytes() == before
    # A setting that leaves the photos as they are runs the plan as before.
    same = cli("run", pairs_recipe, "--workdir", workdir, "--set", "fetch.download_retries=1")
    assert same.code == 0, same.err
    assert "plan:" in same.out


def _samples(shards: Path, split: str | None = None) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = [split] if split else list(manifest["splits"])
    return sum(s["samples"] for name in splits for s in manifest["splits"].get(name, []))


def test_a_model_set_may_undo_what_train_gives_every_model(tmp_path):
    """[train]'s init_text suits the fusion model; run.image_set clears it for the image model.
    The model's settings are applied with train.model as one layer, checked once (an image
    model with an init_text used to be refused before image_set could clear it)."""
    from vsotools import pipeline
    from vsotools.core.config import Recipe

    recipe = Recipe().override(
        {
            "train.init_text": str(tmp_path / "text.pt"),
            "run.models": ["fusion", "image"],
            "run.image_set": ["train.init_text=", "train.epochs=1"],
        }
    )
    runs = {model: tmp_path / model for model in ("fusion", "image")}
    image = pipeline._model_recipe(recipe, "image", runs)
    assert (image.train.model, image.train.init_text, image.train.epochs) == ("image", "", 1)
    assert image.train.features_dir == str(tmp_path / "features")
    fusion = pipeline._model_recipe(recipe, "fusion", runs)
    assert fusion.train.init_text == str(tmp_path / "text.pt")
    with pytest.raises(ConfigError, match=r"run.text_set: train.init_image: .*no image branch"):
        pipeline._model_recipe(
            recipe.override({"run.text_set": ["train.init_image=x.pt"]}), "text", runs
        )


@pytest.mark.slow
def test_a_stale_training_is_kept_until_its_replacement_has_finished(pairs_recipe, tmp_path):
    """run trains a stale model again beside the old one (train-MODEL.next) and swaps them only
    once the new one has finished: a rerun killed midway loses nothing."""
    import os
    import signal
    import subprocess
    import time

    from conftest import run_vsotools, vsotools_command

    work = tmp_path / "work"
    only_text = ["--set", "run.models=text", "--set", "run.fusion_from_branches=false"]
    first = run_vsotools("run", pairs_recipe, "--workdir", work, *only_text, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    old = work / "train-text"
    finished = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}

    longer = [*only_text, "--set", "train.epochs=40"]
    command = [*vsotools_command(), "run", str(pairs_recipe), "--workdir", str(work), *longer]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (work / "train-text.next" / "last.pt").exists():
            assert process.poll() is None, process.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the replacement never saved an epoch"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == finished

    again = run_vsotools("run", pairs_recipe, "--workdir", work, *longer, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained again (made from other inputs (train.epochs 2 there, 40 now)" in again.stdout
    assert len((old / "metrics.jsonl").read_text().splitlines()) == 40
    assert not (work / "train-text.next").exists()
    assert not (work / "train-text.replaced").exists()


@pytest.mark.slow
def test_a_report_page_that_is_gone_is_written_again(pairs_recipe, finished, cli):
    workdir, _ = finished
    (workdir / "train-image" / "report.html").unlink()
    again = cli("run", pairs_recipe, "--workdir", workdir)
    assert again.code == 0, again.err
    assert "nothing to do" not in again.out
    assert (workdir / "train-image" / "report.html").is_file()
    assert "[train image] skipped" in again.out and "[report] done" in again.out
    third = cli("run", pairs_recipe, "--workdir", workdir)
    assert "nothing to do: every output is complete and current" in third.out


@pytest.mark.slow
def test_train_without_a_recipe_follows_the_one_its_shard_set_was_written_with(finished, tmp_path):
    from conftest import run_vsotools

    workdir, _ = finished
    run = tmp_path / "text"
    done = run_vsotools(
        "train", "--shards", workdir / "shards", "--out", run,
        "--set", "train.model=text", "--epochs", "1", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_recipe(run / "recipe.toml")
    assert trained.name == "tiny-pairs"
    assert (trained.train.word_dim, trained.train.num_filters, trained.train.batch_size) == (
        16, 8, 16,
    )  # fmt: skip
    assert (trained.train.model, trained.train.epochs) == ("text", 1)  # --set and flags still win


WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None
from vsotools.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_run_checks_every_stage_s_packages_before_the_first_stage(pairs_recipe, tmp_path):
    workdir = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRANSFORMERS, "run", str(pairs_recipe),
         "--workdir", str(workdir), "--set", "train.text_encoder=minilm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "vsotools: error: the MiniLM text encoder (train.text_encoder = minilm) needs"
        " transformers: pip install 'vsotools[pretrained]'"
    ]
    assert not workdir.exists(), "no stage ran: nothing fetched, filtered or sharded"


@pytest.mark.slow
def test_a_work_folder_moved_elsewhere_is_still_current(pairs_recipe, finished, cli, tmp_path):
    """The fusion starts from the branches' checkpoints by their bytes, not by where they lie:
    a work folder copied elsewhere holds the same, current trainings."""
    workdir, _ = finished
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    again = cli("run", pairs_recipe, "--workdir", moved)
    assert again.code == 0, again.err
    assert "nothing to do: every output is complete and current" in again.out


@pytest.mark.slow
def test_damaged_checkpoints_and_plots_are_made_again(pairs_recipe, finished, cli, tmp_path):
    """A cut last.pt (and so checkpoint.pt, its link) cannot be resumed from: run trains the
    model again beside it instead of failing on every rerun; a report's plots that are gone
    are drawn again."""
    workdir, _ = finished
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    last = work / "train-image" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    plots = work / "report-files"
    shutil.rmtree(plots, ignore_errors=True)
    again = cli("run", pairs_recipe, "--workdir", work)
    assert again.code == 0, again.err
    assert "[train image] done: trained again (" in again.out
    assert "last.pt has 1,000 bytes" in again.out
    assert (work / "train-image" / "metrics.json").is_file()
    assert plots.is_dir() and any(plots.iterdir())
    third = cli("run", pairs_recipe, "--workdir", work)
    assert "nothing to do" in third.out
