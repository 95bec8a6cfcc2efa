"""``vsotools train``, ``evaluate`` and ``predict`` on tiny real shard sets, through the library,
the command line, a killed and resumed subprocess, and ``torchrun`` with two CPU processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_vsotools, vsotools_command
from shardkit import sample_image, tiny_recipe_overrides, tiny_set_arguments, write_shard_set

from vsotools.core.config import Recipe
from vsotools.core.errors import ConfigError, ExistingOutput
from vsotools.core.metrics import Metrics
from vsotools.training import checkpoint as ckpt
from vsotools.training.evaluate import evaluate
from vsotools.training.loader import LoaderError
from vsotools.training.predict import predict
from vsotools.training.state import Selection
from vsotools.training.train import train

EMPTY_METRICS = dict(
    n=10, accuracy=0.5, precision=0.5, recall=0.5, f1=0.5, macro_f1=0.5, majority_rate=0.5,
    roc_auc=0.5, confusion=[[0, 0], [0, 0]],
)  # fmt: skip


def recipe(**changes) -> Recipe:
    return Recipe().override(tiny_recipe_overrides(**changes))


def read_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """240 train samples in 4 shards, 80 test samples in 2."""
    return write_shard_set(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """A text, an image and a fusion run of 3 epochs each."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("text", "image", "fusion"):
        train(recipe(model=kind, epochs=3), shards, root / kind, progress=False)
    return {kind: root / kind for kind in ("text", "image", "fusion")}


@pytest.mark.slow
def test_training_reduces_the_loss_and_learns_the_signal(runs):
    for kind in ("image", "fusion"):
        lines = read_lines(runs[kind])
        assert [r["epoch"] for r in lines] == [1, 2, 3]
        assert [r["step"] for r in lines] == [12, 24, 36]  # 240 samples / batch 20
        assert lines[-1]["train_loss"] < lines[0]["train_loss"]
        final = json.loads((runs[kind] / "metrics.json").read_text())
        assert final["n"] == 80 and final["selected_epoch"] == 3
        assert final["accuracy"] > final["majority_rate"] + 0.15


@pytest.mark.slow
def test_epoch_lines_show_training_and_the_test_split_is_scored_once(runs):
    for line in read_lines(runs["fusion"]):
        for key in ("epoch", "step", "lr", "train_loss", "train_accuracy", "seconds",
                    "samples_per_s", "selected"):  # fmt: skip
            assert key in line, key
        assert line["train_samples"] == 240
        # Nobody can tune on test figures that are not there.
        assert not [key for key in line if key.startswith("test_")]
    final = json.loads((runs["fusion"] / "metrics.json").read_text())
    assert {"accuracy", "macro_f1", "roc_auc", "confusion", "selected_epoch"} <= set(final)


@pytest.mark.slow
def test_the_run_folder_holds_recipe_vectors_and_a_weights_only_checkpoint(runs):
    run = runs["fusion"]
    assert {p.name for p in run.iterdir()} >= {
        "recipe.toml", "word2vec.bin", "last.pt", "checkpoint.pt", "metrics.jsonl", "metrics.json",
    }  # fmt: skip
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["model_type"] == "fusion"
    assert state["epoch"] == 3 and state["step"] == 36
    assert {"model", "optimizer", "scheduler", "rng", "recipe", "vocab"} <= set(state)
    assert state["vocab"][:2] == ["<pad>", "<unk>"]
    assert "[train]" in state["recipe"]
    assert ckpt.recipe_of(state).train.crop_size == 64


@pytest.mark.slow
def test_evaluate_reproduces_the_metrics_train_saved(runs, shards):
    saved = json.loads((runs["fusion"] / "metrics.json").read_text())
    report = evaluate(runs["fusion"] / "checkpoint.pt", shards, progress=False)
    m = report.metrics
    assert m.n == saved["n"] == 80
    assert m.confusion == saved["confusion"]
    for key in ("accuracy", "precision", "recall", "f1", "macro_f1", "majority_rate"):
        assert getattr(m, key) == saved[key], key
    assert m.loss == pytest.approx(saved["loss"], rel=1e-4)
    assert m.roc_auc == pytest.approx(saved["roc_auc"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_command_text_and_json(cli, runs, shards):
    result = cli("evaluate", "--checkpoint", runs["image"] / "checkpoint.pt", "--shards", shards)
    assert result.code == 0, result.err
    assert "predicted ->" in result.out and "true positive" in result.out
    assert "| image |" in result.out
    result = cli(
        "evaluate", "--checkpoint", runs["text"] / "checkpoint.pt", "--shards", shards,
        "--split", "train", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert {"accuracy", "precision", "recall", "f1", "n", "macro_f1", "roc_auc"} <= set(data)
    assert data["n"] == 240 and data["split"] == "train"


@pytest.mark.slow
def test_evaluate_names_a_missing_checkpoint_or_split(cli, runs, shards, tmp_path):
    result = cli("evaluate", "--checkpoint", tmp_path / "nope.pt", "--shards", shards)
    assert result.code == 1 and "checkpoint not found" in result.err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = cli("evaluate", "--checkpoint", tmp_path / "bad.pt", "--shards", shards)
    assert result.code == 1 and "not a readable checkpoint" in result.err
    result = cli(
        "evaluate", "--checkpoint", runs["text"] / "checkpoint.pt", "--shards", shards,
        "--split", "val",
    )  # fmt: skip
    assert result.code == 1 and "no 'val' split" in result.err


@pytest.mark.slow
def test_predict_reads_what_each_model_reads_and_gets_clear_cases_right(cli, runs, tmp_path):
    import random

    warm, cold = tmp_path / "warm.jpg", tmp_path / "cold.jpg"
    warm.write_bytes(sample_image(random.Random(1), 1, 300))  # larger than the shard size
    cold.write_bytes(sample_image(random.Random(2), 0, 300))
    cases = [
        ("fusion", ["--image", warm, "--text", "a lovely sunny day, happy joy"], "positive"),
        ("fusion", ["--image", cold, "--text", "a sad gloomy awful day"], "negative"),
        ("text", ["--text", "happy sunny lovely joy smile"], "positive"),
        ("text", ["--text", "sad gloomy awful broken grief"], "negative"),
        ("image", ["--image", warm], "positive"),
        ("image", ["--image", cold], "negative"),
    ]
    for model, inputs, expected in cases:
        result = cli("predict", "--checkpoint", runs[model] / "checkpoint.pt", *inputs, "--json")
        assert result.code == 0, result.err
        data = json.loads(result.out)
        assert data["label"] == expected, (model, inputs, data)
        positive = data["positive_probability"]
        assert data["probability"] == (positive if expected == "positive" else 1 - positive)
    result = cli("predict", "--checkpoint", runs["text"] / "checkpoint.pt", "--text", "sad day")
    label, probability = result.out.split()
    assert result.code == 0 and label in ("positive", "negative") and float(probability) >= 0.5
    result = cli("predict", "--checkpoint", runs["fusion"] / "checkpoint.pt", "--text", "hi")
    assert result.code == 1 and "this fusion model reads image: it is missing" in result.err
    # One image is checked as predict --pairs and fetch check one (the recipe's fetch limits).
    tiny = tmp_path / "tiny.jpg"
    tiny.write_bytes(sample_image(random.Random(3), 1, 20))
    result = cli("predict", "--checkpoint", runs["image"] / "checkpoint.pt", "--image", tiny)
    assert result.code == 1 and f"{tiny}: image refused: too_small" in result.err
    out = tmp_path / "labels.parquet"
    result = cli("predict", "--checkpoint", runs["text"] / "checkpoint.pt", "--text", "hi",
                 "--out", out)  # fmt: skip
    assert result.code == 1 and "--out and --batch-size go with --pairs" in result.err
    assert not out.exists()


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_and_resume_refuses_another_recipe(runs, shards, cli):
    with pytest.raises(ExistingOutput, match="already holds a training") as refused:
        train(recipe(model="text", epochs=3), shards, runs["text"], progress=False)
    assert refused.value.remedies == ("resume", "elsewhere")
    result = cli("train", "--shards", shards, "--out", runs["text"], *tiny_set_arguments())
    assert result.code == 1
    assert "pass --resume to continue it, or choose another --out" in result.err
    with pytest.raises(ConfigError, match=r"train.lr is 0.01 here but 0.003"):
        train(recipe(model="text", lr=0.01), shards, runs["text"], resume=True, progress=False)


@pytest.mark.slow
def test_train_command_prints_the_table_row(cli, shards, tmp_path):
    result = cli("train", "--shards", shards, "--out", tmp_path / "run", "--model", "text",
                 *tiny_set_arguments(), "--epochs", "1")  # fmt: skip
    assert result.code == 0, result.err
    assert "| Method | Prec. | Rec. | F1 | Acc. |" in result.out
    assert "| text |" in result.out
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_too_few_shards_for_the_workers_is_a_clear_error(cli, shards, tmp_path):
    result = cli("train", "--shards", shards, "--out", tmp_path / "run", *tiny_set_arguments(),
                 "--workers", "5")  # fmt: skip
    assert result.code == 1
    assert "4 shard(s) but training reads it with 1 process(es) x 5 loader worker(s)" in result.err
    with pytest.raises(LoaderError):
        train(recipe(workers=5), shards, tmp_path / "run2", progress=False)


@pytest.mark.slow
def test_warm_start_from_branch_checkpoints_with_frozen_branches(runs, shards, tmp_path):
    text_state = ckpt.load_checkpoint(runs["text"] / "checkpoint.pt")
    image_state = ckpt.load_checkpoint(runs["image"] / "checkpoint.pt")
    warm = recipe(
        model="fusion",
        epochs=1,
        init_text=str(runs["text"] / "checkpoint.pt"),
        init_image=str(runs["image"] / "checkpoint.pt"),
        freeze_branches_epochs=1,
    )
    train(warm, shards, tmp_path / "warm", progress=False)
    state = ckpt.load_checkpoint(tmp_path / "warm" / "checkpoint.pt")
    assert state["vocab"] == text_state["vocab"]
    for name, source in (("text.", text_state), ("image.", image_state)):
        for key, value in source["model"].items():
            if key.startswith(name):
                assert torch.equal(state["model"][key], value), key  # frozen in epoch 1
    # Resuming for a second epoch unfreezes the branches.
    longer = warm.override({"train.epochs": 2})
    train(longer, shards, tmp_path / "warm", resume=True, progress=False)
    state = ckpt.load_checkpoint(tmp_path / "warm" / "checkpoint.pt")
    assert not torch.equal(
        state["model"]["image.layers.0.weight"], image_state["model"]["image.layers.0.weight"]
    )
    assert [r["frozen_branches"] for r in read_lines(tmp_path / "warm")] == [["image", "text"], []]


@pytest.mark.slow
def test_the_tweet_token_rule_travels_with_the_checkpoint(shards, tmp_path):
    train(recipe(model="text", epochs=1, tweet_tokens=True), shards, tmp_path / "t", progress=False)
    checkpoint = tmp_path / "t" / "checkpoint.pt"
    assert ckpt.vocabulary_of(ckpt.load_checkpoint(checkpoint)).tweets
    # "#sad" reads as "#", "sad" at prediction time too (without the rule it would be <unk>).
    split = predict(checkpoint, text="# sad # awful @me", device="cpu")
    joined = predict(checkpoint, text="#sad #awful @someone", device="cpu")
    assert joined.positive_probability == split.positive_probability
    # A fusion started from that branch must read text the same way.
    mismatched = recipe(model="fusion", epochs=1, init_text=str(checkpoint))
    with pytest.raises(ConfigError, match=r"train\.tweet_tokens = true, this recipe with false"):
        train(mismatched, shards, tmp_path / "f", progress=False)


def torchvision_alexnet_features(channels: list[int]) -> torch.nn.Sequential:
    """torchvision's ``alexnet().features``, written out: its layer order sets the state-dict
    keys of an ImageNet weights file (``features.0.weight`` ... ``features.10.bias``)."""
    c1, c2, c3, c4, c5 = channels
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )  # fmt: skip


@pytest.mark.slow
def test_the_image_branch_starts_from_torchvision_alexnet_weights(shards, tmp_path):
    channels = [8, 16, 16, 16, 16]
    torch.manual_seed(5)
    features = torchvision_alexnet_features(channels)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 16 * 6 * 6)  # the ImageNet head is left out
    weights = tmp_path / "alexnet.pth"
    torch.save(state, weights)

    imagenet = recipe(model="image", epochs=1, lrn=False, init_image=str(weights),
                      freeze_branches_epochs=1)  # fmt: skip
    train(imagenet, shards, tmp_path / "run", progress=False)
    model, _, _ = ckpt.model_of(ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.image(images), features(images).flatten(1), atol=1e-6)

    # Each mismatch is named, with the setting that fixes it.
    with pytest.raises(ConfigError, match=r"set train\.lrn = false"):
        train(imagenet.override({"train.lrn": True}), shards, tmp_path / "a", progress=False)
    wider = imagenet.override({"train.conv_channels": [8, 16, 24, 16, 16]})
    with pytest.raises(ConfigError, match=r"set train\.conv_channels = \[8, 16, 16, 16, 16\]"):
        train(wider, shards, tmp_path / "b", progress=False)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    other = imagenet.override({"train.init_image": str(tmp_path / "other.pth")})
    with pytest.raises(ConfigError, match="neither a vsotools checkpoint nor an AlexNet"):
        train(other, shards, tmp_path / "c", progress=False)
    # A branch trained without LRN cannot start one with it: the features would differ.
    fusion = recipe(model="fusion", init_image=str(tmp_path / "run" / "checkpoint.pt"))
    with pytest.raises(
        ConfigError, match=r"trained with train\.lrn = false, this recipe with true"
    ):
        train(fusion, shards, tmp_path / "d", progress=False)


@pytest.mark.slow
def test_a_branch_from_a_model_without_it_is_refused(runs, shards, tmp_path):
    bad = recipe(model="fusion", init_image=str(runs["text"] / "checkpoint.pt"))
    with pytest.raises(ConfigError, match="holds a text model, which has no image branch"):
        train(bad, shards, tmp_path / "bad", progress=False)


@pytest.mark.slow
def test_validation_carve_selects_the_best_epoch_and_stops_early(tmp_path):
    skewed = write_shard_set(tmp_path / "skewed", train=240, test=60, positive_rate=0.75, seed=4)
    settings = recipe(
        model="image", epochs=4, val_fraction=0.25, select="val_loss", patience=1,
        class_weights="balanced", scale_jitter=0.2, color_jitter=0.3, lr=3e-3,
    )  # fmt: skip
    report = train(settings, skewed, tmp_path / "run", progress=False)
    lines = read_lines(tmp_path / "run")
    assert all("val_loss" in r and "val_macro_f1" in r for r in lines)
    assert lines[0]["val_n"] + lines[0]["train_samples"] >= 240 - 20  # one partial batch dropped
    best = min(lines, key=lambda r: r["val_loss"])
    assert report.selected_epoch == best["epoch"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["selected_epoch"] == best["epoch"] and saved["selected_by"] == "val_loss"
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == best["epoch"]
    # The test figures are those of the selected model, whichever epoch the run ended on.
    again = evaluate(tmp_path / "run" / "checkpoint.pt", skewed, progress=False).metrics
    assert saved["accuracy"] == again.accuracy and saved["confusion"] == again.confusion


@pytest.mark.parametrize(
    ("losses", "patience", "selected", "stopped_after"),
    [
        ([0.9, 0.8, 0.85, 0.7, 0.75, 0.76], 2, 4, 6),  # two epochs without a lower loss
        ([0.9, 0.8, 0.85, 0.7, 0.75, 0.76], 3, 4, None),  # three would be needed
        ([0.9, 0.9, 0.9], 1, 1, 2),  # an equal score is no improvement
        ([0.9, 0.8, 0.7], 0, 3, None),  # patience 0: never stop
    ],
)
def test_selection_keeps_the_best_epoch_and_stops_after_patience_epochs(
    losses, patience, selected, stopped_after
):
    selection = Selection("val_loss", patience)
    stopped = None
    for epoch, loss in enumerate(losses, start=1):
        selection.update(epoch, Metrics(loss=loss, **EMPTY_METRICS))
        if selection.stopped:
            stopped = epoch
            break
    assert selection.epoch == selected
    assert stopped == stopped_after


def test_selection_by_accuracy_keeps_the_highest():
    selection = Selection("val_accuracy", patience=1)
    kept = [selection.update(e, Metrics(loss=None, **{**EMPTY_METRICS, "accuracy": a}))
            for e, a in enumerate([0.6, 0.7, 0.65], start=1)]  # fmt: skip
    assert kept == [True, True, False] and selection.epoch == 2 and selection.stopped


def test_a_resumed_training_counts_its_epochs_and_steps_on(shards, tmp_path):
    run = tmp_path / "run"
    first = train(recipe(model="text", epochs=1, workers=0), shards, run, progress=False)
    assert (first.epochs, first.steps, first.resumed_after) == (1, 12, None)
    more = train(
        recipe(model="text", epochs=2, workers=0), shards, run, resume=True, progress=False
    )
    assert (more.epochs, more.steps, more.resumed_after) == (2, 24, 1)
    assert [(r["epoch"], r["step"]) for r in read_lines(run)] == [(1, 12), (2, 24)]
    assert ckpt.load_checkpoint(run / "last.pt")["scheduler"]["last_epoch"] == 24


def test_a_checkpoint_is_built_from_the_train_state_and_restored_to_it():
    """What a resumed training goes on from: weights, optimizer, schedule, the epoch and step
    counters, the history and the selection, all as they were saved."""
    from vsotools.training import branches
    from vsotools.training.folder import EpochRecord
    from vsotools.training.state import TrainState

    config = recipe(model="image", select="val_loss", val_fraction=0.2, patience=3).train
    torch.manual_seed(0)
    model = branches.build(config, branches.Branches(None, None, None, None))
    state = TrainState.start(model, config, frozenset())
    images = torch.rand(4, 3, config.crop_size, config.crop_size)
    for epoch in (1, 2):
        for _ in range(3):
            loss = model(images=images).logsumexp(dim=1).mean()
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
        val = Metrics(loss=1.0 / epoch, **EMPTY_METRICS)
        state.record(EpochRecord(epoch, 3 * epoch, state.lr, 0.5, 0.5, 4, 1.0, 4.0, val=val))
    saved = state.to_checkpoint(
        Recipe(), None, steps_per_epoch=3, world_size=1, shards="x", starts={}
    )

    torch.manual_seed(1)
    fresh = TrainState.start(
        branches.build(config, branches.Branches(None, None, None, None)), config, frozenset()
    )
    fresh.restore(saved, config)
    assert (fresh.epoch, fresh.step, fresh.resumed_after) == (2, 6, 2)
    assert fresh.history == state.history and fresh.selection == state.selection
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict()
    for key, value in state.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[key], value, msg=key)
    assert str(fresh.optimizer.state_dict()) == str(state.optimizer.state_dict())


@pytest.mark.slow
def test_a_killed_run_resumes_where_its_checkpoint_left_off(shards, tmp_path, cli):
    run = tmp_path / "run"
    command = [*vsotools_command(), "-q", "train", "--shards", str(shards), "--out", str(run),
               "--model", "fusion", *tiny_set_arguments(), "--epochs", "40"]  # fmt: skip
    # Its own process group, so that the kill takes its loader workers too (as a machine's loss
    # would) and leaves no orphan behind.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = ckpt.load_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= killed_at < 40
    epochs = str(killed_at + 1)
    result = cli("train", "--shards", shards, "--out", run, "--resume", "--epochs", epochs)
    assert result.code == 0, result.err
    assert f"resuming after epoch {killed_at} (step {12 * killed_at})" in result.err
    lines = read_lines(run)
    assert [r["epoch"] for r in lines] == list(range(1, killed_at + 2))
    assert [r["step"] for r in lines] == [12 * e for e in range(1, killed_at + 2)]

    # The resumed run ends where an uninterrupted one does.
    straight = tmp_path / "straight"
    train(recipe(model="fusion", epochs=killed_at + 1), shards, straight, progress=False)
    resumed = ckpt.load_checkpoint(run / "checkpoint.pt")["model"]
    uninterrupted = ckpt.load_checkpoint(straight / "checkpoint.pt")["model"]
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


@pytest.mark.slow
def test_torchrun_trains_on_two_cpu_processes_with_equal_steps(shards, tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vsotools", "train", "--shards", str(shards), "--out", str(run),
        "--model", "fusion", *tiny_set_arguments(), "--epochs", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for epoch in (1, 2):
        # 240 samples / (batch 20 x 2 ranks) = 6 steps per rank per epoch, 2 shards per rank
        for rank in (0, 1):
            assert f"rank {rank}/2 epoch {epoch}: 6 steps, 120 samples" in done.stderr
    lines = read_lines(run)
    assert [r["step"] for r in lines] == [6, 12]
    assert all(r["train_samples"] == 240 for r in lines)
    assert json.loads((run / "metrics.json").read_text())["n"] == 80
    assert done.stdout.count("| fusion |") == 1  # rank 0 alone prints the report
    result = run_vsotools(
        "evaluate", "--checkpoint", run / "checkpoint.pt", "--shards", shards, "--json"
    )
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(result.stdout)["accuracy"]
        == json.loads((run / "metrics.json").read_text())["accuracy"]
    )


RETURN_CHECK = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from shardkit import tiny_recipe_overrides
from vsotools.core.config import Recipe
from vsotools.training.folder import TrainingFolder
from vsotools.training.train import train

report = train(Recipe().override(tiny_recipe_overrides(model="text", epochs=1)), {shards!r},
               {out!r}, progress=False)
finished = TrainingFolder({out!r}).read_final() is not None
Path({out!r}).with_name(f"rank-{{report.rank}}.json").write_text(json.dumps(finished))
"""


@pytest.mark.slow
def test_every_torchrun_rank_returns_once_the_training_folder_is_finished(shards, tmp_path):
    """A rank other than 0 used to return (and its process exit) while rank 0 was still writing
    the final record; gloo's threads could then still be releasing the last collective's tensors
    at interpreter exit, which aborted the process (CI, 2026-11-30)."""
    script = tmp_path / "train_and_look.py"
    out = tmp_path / "ddp"
    script.write_text(
        RETURN_CHECK.format(tests=str(Path(__file__).parent), shards=str(shards), out=str(out))
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) is True, rank


def test_gpu_decode_on_a_cpu_is_refused_before_any_work(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.gpu_decode needs a CUDA device"):
        train(recipe(gpu_decode=True), shards, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_training_whose_loss_turns_nan_stops_naming_epoch_and_step(shards, tmp_path):
    # A real divergence: Adam's steps of 1e30 turn the weights, then the loss, into NaN. With a
    # time limit: a NaN score once made the first validation loop for ever.
    run = tmp_path / "run"
    settings = tiny_set_arguments(epochs=2, workers=1)
    done = run_vsotools(
        "train", "--shards", shards, "--out", run, *settings, "--set", "train.lr=1e30",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"vsotools: error: {run}: epoch 1, step ")
    assert "the training loss became NaN or infinite" in error
    assert "no epoch finished, nothing was saved" in error
    assert not (run / "last.pt").exists() and not (run / "checkpoint.pt").exists()
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_resume_refuses_a_starting_checkpoint_that_changed(shards, tmp_path):
    """A fusion started from a text branch's checkpoint, resumed after that checkpoint was
    trained again, would go on from the old branch and be recorded as made from the new one."""
    text = tmp_path / "text"
    train(recipe(model="text", epochs=1, workers=0), shards, text, progress=False)
    fusion = recipe(model="fusion", epochs=1, workers=0, init_text=str(text / "checkpoint.pt"))
    train(fusion, shards, tmp_path / "fusion", progress=False)
    other = tmp_path / "other"
    train(recipe(model="text", epochs=1, workers=0, lr=0.01), shards, other, progress=False)
    (text / "checkpoint.pt").unlink()
    (text / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    longer = recipe(model="fusion", epochs=2, workers=0, init_text=str(text / "checkpoint.pt"))
    with pytest.raises(ConfigError, match=r"train\.init_text .* is not the checkpoint it started"):
        train(longer, shards, tmp_path / "fusion", resume=True, progress=False)
