"""``vsotools train``: train the fusion model or a baseline on a shard set, streaming it.

Read top to bottom: the run folder and the checkpoint to resume, the vocabulary and word vectors,
the model, the optimizer, the data, then the loop (train one epoch, evaluate, checkpoint, select),
and the final report. One process trains on the CPU or one GPU; under ``torchrun`` every process
runs this same code on its part of the shards, wrapped in DistributedDataParallel.

A run folder holds::

    RUN/recipe.toml       the resolved recipe
    RUN/word2vec.bin      the text model's word vectors (word2vec binary; reusable)
    RUN/last.pt           the state after the last finished epoch (for --resume)
    RUN/checkpoint.pt     the selected model (the last epoch's, or the best on validation)
    RUN/metrics.jsonl     one line per finished epoch
    RUN/metrics.json      the selected model's metrics on the test split, written last
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vsotools.core import schema
from vsotools.core.config import Recipe, TrainConfig, write_recipe
from vsotools.core.errors import ConfigError, VsoError
from vsotools.core.files import atomic_write_json, atomic_write_text
from vsotools.core.metrics import Metrics
from vsotools.shards.format import read_manifest, shard_urls
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed
from vsotools.training import vocab as vocab_rules
from vsotools.training.inference import Outputs, autocast, autocast_dtype, evaluate_batches
from vsotools.training.loader import (
    BatchMover,
    KeepValidation,
    SampleDecoder,
    Shard,
    ShardStream,
    check_shard_count,
    gpu_jpeg_decoder,
    make_loader,
    read_samples,
    steps_per_epoch,
)
from vsotools.training.models import (
    SentimentNet,
    build_model,
    from_torchvision_alexnet,
    is_torchvision_alexnet,
    torchvision_alexnet_channels,
)
from vsotools.training.vocab import Vocabulary

log = logging.getLogger(__name__)

METRICS_LINES = "metrics.jsonl"
METRICS_FINAL = "metrics.json"
RECIPE_NAME = "recipe.toml"
VECTORS_NAME = "word2vec.bin"

RESUMABLE_CHANGES = ("epochs", "patience", "workers", "device", "precision", "channels_last")
"""train settings a resumed run may change; any other difference is refused."""


class RunError(VsoError):
    """The run folder cannot be used as asked (already holds a run, recipe differs on resume)."""


@dataclass
class TrainReport:
    out: Path
    checkpoint: Path
    model: str
    epochs: int
    """Epochs finished (fewer than asked when early stopping ended the run)."""
    steps: int
    selected_epoch: int
    test: Metrics
    """The selected model on the test split."""
    validation: Metrics | None
    seconds: float
    """Wall time of this invocation."""
    resumed_after: int | None
    """The epoch a resumed run continued after, or None."""
    rank: int = 0
    """This process's rank (under torchrun every rank returns a report)."""


def train(
    recipe: Recipe,
    shards: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainReport:
    """Train ``recipe.train.model`` on the shard set at ``shards`` into the run folder ``out``."""
    context = distributed.setup(recipe.train.device)
    try:
        return _train(recipe, str(shards), Path(out), context, resume=resume, progress=progress)
    finally:
        distributed.teardown(context)


def _train(
    recipe: Recipe,
    shards: str,
    out: Path,
    context: distributed.Context,
    *,
    resume: bool,
    progress: bool,
) -> TrainReport:
    started = time.perf_counter()
    config = recipe.train
    device = context.device
    main = context.is_main
    show = progress and main

    # --- the data set and the run folder ---
    manifest = read_manifest(shards)
    train_shards = [
        Shard(url, info.samples)
        for url, info in zip(
            shard_urls(shards, manifest, schema.TRAIN), manifest.shards(schema.TRAIN), strict=True
        )
    ]
    test_shards = [
        Shard(url, info.samples)
        for url, info in zip(
            shard_urls(shards, manifest, schema.TEST), manifest.shards(schema.TEST), strict=True
        )
    ]
    check_shard_count(len(train_shards), context.world_size, config.workers, schema.TRAIN)
    if config.gpu_decode:
        if device.type != "cuda":
            raise ConfigError("train.gpu_decode needs a CUDA device (set gpu_decode=false)")
        gpu_jpeg_decoder()  # a clear error now, not after building the vocabulary
    state = _state_to_resume(out, recipe, resume)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, out / RECIPE_NAME)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # --- vocabulary and word vectors, the model ---
    vocab, embeddings = _vocabulary(config, state, train_shards, out, context)
    model = build_model(config, embeddings)
    if state is not None:
        model.load_state_dict(state["model"])
    else:
        _initialise_branches(model, config)
    model.to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last and model.image is not None:
        model.image.to(memory_format=torch.channels_last)
    log.info("%s model: %s trainable parameters", config.model, f"{_trainable(model):,}")

    # --- the optimizer: Adam, staircase decay stepped every batch ---
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_steps, gamma=config.lr_decay
    )
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(config, manifest.labels(schema.TRAIN), device)
    )

    # --- the data ---
    n_fit = round(manifest.samples(schema.TRAIN) * (1 - config.val_fraction))
    steps = steps_per_epoch(n_fit, config.batch_size, context.world_size)
    train_stream = _stream(train_shards, config, vocab, context, train=True, steps=steps)
    val_stream = None
    if config.val_fraction > 0:
        val_stream = _stream(train_shards, config, vocab, context, train=False, validation=True)
    test_stream = _stream(test_shards, config, vocab, context, train=False)
    pin = device.type == "cuda"
    mover = BatchMover(
        device,
        crop_size=config.crop_size,
        channels_last=channels_last,
        color_jitter=config.color_jitter,
        seed=config.seed,
        rank=context.rank,
    )
    dtype = autocast_dtype(config.precision, device)

    # --- where the loop starts ---
    epoch, step, history = 0, 0, []
    selection = {"best": None, "epoch": 0, "since": 0, "stopped": False}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        selection = dict(state["selection"])
        log.info("resuming after epoch %d (step %d)", epoch, step)
    resumed_after = epoch if state is not None else None

    # --- the loop ---
    frozen: bool | None = None
    wrapped: nn.Module = model
    while epoch < config.epochs and not selection["stopped"]:
        if frozen != (epoch < config.freeze_branches_epochs):
            frozen = epoch < config.freeze_branches_epochs
            _set_branches_trainable(model, not frozen)
            wrapped = _wrap(model, context)
        # Every random draw of an epoch follows from (seed, epoch, rank), so a resumed run
        # continues exactly as an uninterrupted one would.
        torch.manual_seed(_epoch_seed(config.seed, epoch, context.rank))
        mover.set_epoch(epoch)
        train_stream.set_epoch(epoch)
        loader = make_loader(train_stream, config.workers, pin)
        stats = _train_one_epoch(
            wrapped, loader, mover, optimizer, scheduler, criterion, dtype,
            steps=steps, desc=f"epoch {epoch + 1}/{config.epochs}", progress=show,
        )  # fmt: skip
        step += stats["steps"]
        # Per-rank step counts matter (and are shown) when several processes train.
        log.log(
            logging.INFO if context.world_size > 1 else logging.DEBUG,
            "rank %d/%d epoch %d: %d steps, %d samples",
            context.rank, context.world_size, epoch + 1, stats["steps"], stats["samples"],
        )  # fmt: skip
        epoch += 1

        evaluated = time.perf_counter()
        val = (
            _evaluate(model, val_stream, config.workers, mover, dtype, context, "val")
            if val_stream
            else None
        )
        test = _evaluate(model, test_stream, config.workers, mover, dtype, context, "test")
        record = _epoch_record(epoch, step, scheduler.get_last_lr()[0], stats, context, val, test)
        record["eval_seconds"] = round(time.perf_counter() - evaluated, 3)
        record["frozen_branches"] = bool(frozen)
        record["selected"] = _select(config, selection, epoch, val)
        history.append(record)
        if main:
            _log_epoch(record, config.epochs)
            _save_epoch(
                out,
                model,
                optimizer,
                scheduler,
                recipe,
                vocab,
                epoch,
                step,
                steps,
                context,
                history,
                selection,
            )
        distributed.barrier(context)

    # --- the report: the selected model on the test split ---
    chosen = next(r for r in history if r["epoch"] == selection["epoch"])
    test_metrics = _metrics_from_record(chosen, "test")
    val_metrics = _metrics_from_record(chosen, "val") if val_stream else None
    if main:
        _write_final(out, config, shards, chosen, test_metrics, val_metrics, epoch)
    return TrainReport(
        out=out,
        checkpoint=out / ckpt.SELECTED_NAME,
        model=config.model,
        epochs=epoch,
        steps=step,
        selected_epoch=int(selection["epoch"]),
        test=test_metrics,
        validation=val_metrics,
        seconds=time.perf_counter() - started,
        resumed_after=resumed_after,
        rank=context.rank,
    )


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


# --- the run folder and resuming -------------------------------------------------------------


def _state_to_resume(out: Path, recipe: Recipe, resume: bool) -> dict[str, Any] | None:
    last = out / ckpt.LAST_NAME
    if not resume:
        if last.exists() or (out / ckpt.SELECTED_NAME).exists():
            raise RunError(
                f"{out} already holds a training run; pass --resume to continue it,"
                " or choose another --out"
            )
        return None
    if not last.exists():
        log.info("%s has no checkpoint yet: starting from the beginning", out)
        return None
    state = ckpt.load_checkpoint(last)
    saved = ckpt.recipe_of(state).train
    for name in TrainConfig.__dataclass_fields__:
        if name not in RESUMABLE_CHANGES and getattr(saved, name) != getattr(recipe.train, name):
            raise RunError(
                f"--resume: train.{name} is {getattr(recipe.train, name)!r} here but"
                f" {getattr(saved, name)!r} in {last}; resume with the run's recipe"
                f" ({out / RECIPE_NAME})"
            )
    return state


# --- vocabulary and word vectors -------------------------------------------------------------


def _vocabulary(
    config: TrainConfig,
    state: dict[str, Any] | None,
    train_shards: list[Shard],
    out: Path,
    context: distributed.Context,
) -> tuple[Vocabulary | None, torch.Tensor | None]:
    """The text model's vocabulary and embedding matrix: from the checkpoint being resumed, from
    ``init_text``, or built on rank 0 from the training texts and sent to every rank."""
    if config.model == "image":
        return None, None
    if state is not None:
        vocab = ckpt.vocabulary_of(state)
        assert vocab is not None
        return vocab, state["model"]["text.embedding.weight"]
    if config.init_text:
        source = ckpt.load_checkpoint(config.init_text)
        vocab = ckpt.vocabulary_of(source)
        if vocab is None:
            raise ConfigError(f"train.init_text: {config.init_text} has no text branch")
        _require_same_settings(
            "text", config, {"lowercase": vocab.lowercase, "tweet_tokens": vocab.tweets}
        )
        return vocab, source["model"]["text.embedding.weight"]
    built = _build_vocabulary(config, train_shards, out) if context.is_main else None
    words, lowercase, tweets, matrix = distributed.broadcast_object(context, built)
    return Vocabulary(words, lowercase, tweets), matrix


def _build_vocabulary(
    config: TrainConfig, train_shards: list[Shard], out: Path
) -> tuple[list[str], bool, bool, torch.Tensor]:
    keep = KeepValidation(config.seed, config.val_fraction, wanted=False)
    sentences = [
        vocab_rules.model_tokens(
            sample[schema.SAMPLE_TEXT].decode("utf-8"), config.lowercase, config.tweet_tokens
        )
        for sample in read_samples(train_shards, skip_images=True)
        if keep(sample[schema.SAMPLE_KEY])
    ]
    vocab = Vocabulary.build(sentences, config.w2v_min_count, config.lowercase, config.tweet_tokens)
    if config.word_vectors:
        vectors = vocab_rules.load_word_vectors(config.word_vectors, config.word_dim)
        source = config.word_vectors
    else:
        vectors = vocab_rules.train_word2vec(sentences, config)
        source = f"word2vec trained on {len(sentences):,} training texts"
    known = vocab_rules.count_known(vocab, vectors)
    log.info(
        "vocabulary: %s words, %s with vectors (%s), %s random",
        f"{len(vocab) - 2:,}", f"{known:,}", source, f"{len(vocab) - 2 - known:,}",
    )  # fmt: skip
    matrix = vocab_rules.embedding_matrix(
        vocab, vectors, config.word_dim, config.oov_scale, config.seed, config.drop_components
    )
    vocab_rules.save_word_vectors(vocab, matrix, out / VECTORS_NAME)
    return vocab.words[len(vocab_rules.SPECIALS) :], vocab.lowercase, vocab.tweets, matrix


# --- the model ---------------------------------------------------------------------------------


def _initialise_branches(model: SentimentNet, config: TrainConfig) -> None:
    """Copy the text and image branches from ``init_text`` / ``init_image`` checkpoints (or the
    image branch from ImageNet weights in torchvision's AlexNet layout)."""
    for name, path in (("text", config.init_text), ("image", config.init_image)):
        if not path:
            continue
        if name == "image":
            weights = _image_weights(path, config)
        else:
            weights = _branch_weights(ckpt.load_checkpoint(path), name, path)
        try:
            getattr(model, name).load_state_dict(weights)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"train.init_{name}: the {name} branch in {path} does not fit this recipe ({detail})"
            ) from None
        log.info("%s branch initialised from %s", name, path)


def _require_same_settings(name: str, config: TrainConfig, theirs: dict[str, bool]) -> None:
    """A branch started from ``init_NAME`` must compute what it was trained to: the settings
    that shape it (how text is read, LRN) must be the recipe's."""
    path = getattr(config, f"init_{name}")
    for key, value in theirs.items():
        ours = getattr(config, key)
        if value != ours:
            raise ConfigError(
                f"train.init_{name}: {path} was trained with train.{key} = {str(value).lower()},"
                f" this recipe with {str(ours).lower()}"
            )


def _branch_weights(source: dict[str, Any], name: str, path: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    weights = {k[len(prefix) :]: v for k, v in source["model"].items() if k.startswith(prefix)}
    if not weights:
        raise ConfigError(
            f"train.init_{name}: {path} is a {source.get('model_type')} model without"
            f" a {name} branch"
        )
    return weights


def _image_weights(path: str, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The image branch of a vsotools checkpoint, or the convolutions of a torchvision AlexNet
    state dict (ImageNet weights), checked against the recipe's image branch."""
    source = ckpt.load_weights_file(path)
    if ckpt.is_checkpoint(source):
        weights = _branch_weights(ckpt.checked_version(source, path), "image", path)
        _require_same_settings("image", config, {"lrn": ckpt.recipe_of(source).train.lrn})
        return weights
    if not is_torchvision_alexnet(source):
        raise ConfigError(
            f"train.init_image: {path} is neither a vsotools checkpoint nor an AlexNet state dict"
            " in torchvision's layout (features.0.weight ... features.10.bias)"
        )
    channels = torchvision_alexnet_channels(source)
    if channels != list(config.conv_channels):
        raise ConfigError(
            f"train.init_image: {path} holds an AlexNet with convolutions {channels} wide;"
            f" set train.conv_channels = {channels} (the recipe has {list(config.conv_channels)})"
        )
    if config.lrn:
        raise ConfigError(
            f"train.init_image: {path} holds torchvision AlexNet weights, trained without local"
            " response normalisation; set train.lrn = false"
        )
    log.info("image branch: ImageNet weights in torchvision's AlexNet layout")
    return from_torchvision_alexnet(source)


def _set_branches_trainable(model: SentimentNet, trainable: bool) -> None:
    for name, branch in model.branches().items():
        for parameter_name, parameter in branch.named_parameters():
            if name == "text" and parameter_name.startswith("embedding."):
                parameter.requires_grad_(trainable and model.text.tune_vectors)  # type: ignore[union-attr]
            else:
                parameter.requires_grad_(trainable)
    if not trainable:
        log.info("branches frozen: training the head only")


def _wrap(model: SentimentNet, context: distributed.Context) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several ranks (built again
    whenever the set of trainable parameters changes)."""
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _class_weights(
    config: TrainConfig, labels: dict[str, int], device: torch.device
) -> torch.Tensor | None:
    """``balanced``: n / (2 n_class) from the train split's label counts in the manifest."""
    if config.class_weights == "none":
        return None
    counts = [labels.get(name, 0) for name in schema.LABEL_NAMES]
    if min(counts) == 0:
        raise ConfigError(
            f"train.class_weights: the train split has no {schema.LABEL_NAMES[counts.index(0)]}"
            " samples"
        )
    total = sum(counts)
    weights = [total / (len(counts) * c) for c in counts]
    log.info(
        "class weights: %s",
        ", ".join(f"{n} {w:.3f}" for n, w in zip(schema.LABEL_NAMES, weights, strict=True)),
    )
    return torch.tensor(weights, dtype=torch.float32, device=device)


# --- the data ----------------------------------------------------------------------------------


def _stream(
    shards: list[Shard],
    config: TrainConfig,
    vocab: Vocabulary | None,
    context: distributed.Context,
    *,
    train: bool,
    steps: int | None = None,
    validation: bool = False,
) -> ShardStream:
    decoder = SampleDecoder(
        vocab=vocab if config.model != "image" else None,
        max_words=config.max_words,
        crop_size=config.crop_size if config.model != "text" else None,
        train=train,
        hflip=config.hflip,
        scale_jitter=config.scale_jitter,
        gpu_decode=config.gpu_decode,
    )
    keep = None
    if config.val_fraction > 0 and shards and (train or validation):
        keep = KeepValidation(config.seed, config.val_fraction, wanted=validation)
    return ShardStream(
        shards,
        decoder,
        batch_size=config.batch_size,
        rank=context.rank,
        world_size=context.world_size,
        num_workers=config.workers,
        steps=steps if train else None,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer if train else 0,
        keep=keep,
    )


# --- one epoch ---------------------------------------------------------------------------------


def _train_one_epoch(
    model: nn.Module,
    loader,
    mover: BatchMover,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    dtype: torch.dtype | None,
    *,
    steps: int,
    desc: str,
    progress: bool,
) -> dict[str, Any]:
    """``steps`` optimizer steps; loss and accuracy summed on the device (no sync per step)."""
    model.train()
    device = mover.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    samples = 0
    done = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    for batch in loader:
        inputs = mover.inputs(batch, train=True)
        labels = mover.labels(batch)
        with autocast(device, dtype):
            logits = model(**inputs)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        n = labels.shape[0]
        samples += n
        done += 1
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        if progress and (done % 10 == 0 or done == steps):
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                loss=f"{loss.item():.4f}",
                samples_s=f"{samples / elapsed:.1f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
            )
        bar.update()
    bar.close()
    if done != steps:
        raise VsoError(f"the loader gave {done} batches where the epoch has {steps} steps")
    return {
        "steps": done,
        "samples": samples,
        "loss_sum": loss_sum.item(),
        "correct": int(correct.item()),
        "seconds": time.perf_counter() - started,
    }


def _evaluate(
    model: SentimentNet,
    stream: ShardStream,
    workers: int,
    mover: BatchMover,
    dtype: torch.dtype | None,
    context: distributed.Context,
    name: str,
) -> Metrics:
    """Metrics of ``model`` on a split: each rank reads its shards, rank outputs are merged."""
    loader = make_loader(stream, workers, mover.device.type == "cuda")
    outputs = evaluate_batches(model, loader, mover, dtype, desc=name)
    return Outputs.merge(distributed.gather_objects(context, outputs)).metrics()


# --- records, selection, checkpoints -------------------------------------------------------------


def _epoch_record(
    epoch: int,
    step: int,
    lr: float,
    stats: dict[str, Any],
    context: distributed.Context,
    val: Metrics | None,
    test: Metrics,
) -> dict[str, Any]:
    samples, loss_sum, correct, seconds = distributed.all_sum(
        context, [stats["samples"], stats["loss_sum"], stats["correct"], stats["seconds"]]
    )
    seconds /= context.world_size
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "lr": lr,
        "train_loss": loss_sum / samples,
        "train_accuracy": correct / samples,
        "train_samples": int(samples),
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 2),
    }
    if val is not None:
        record.update(_metrics_record(val, "val"))
    record.update(_metrics_record(test, "test"))
    return record


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    val = ""
    if "val_loss" in record:
        val = f", val loss {record['val_loss']:.4f} accuracy {record['val_accuracy']:.4f}"
    log.info(
        "epoch %d/%d: train loss %.4f accuracy %.4f%s, test accuracy %.4f macro-F1 %.4f"
        " (%.1f s, %.1f samples/s)%s",
        record["epoch"],
        epochs,
        record["train_loss"],
        record["train_accuracy"],
        val,
        record["test_accuracy"],
        record["test_macro_f1"],
        record["seconds"],
        record["samples_per_s"],
        " *" if record["selected"] else "",
    )


def _metrics_record(metrics: Metrics, prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{key}": value for key, value in metrics.to_json().items() if key != "labels"}


def _metrics_from_record(record: dict[str, Any], prefix: str) -> Metrics:
    fields = Metrics.__dataclass_fields__
    return Metrics(**{key: record[f"{prefix}_{key}"] for key in fields})


def _select(
    config: TrainConfig, selection: dict[str, Any], epoch: int, val: Metrics | None
) -> bool:
    """Whether this epoch's model becomes RUN/checkpoint.pt; updates early-stopping state."""
    if config.select == "last" or val is None:
        selection["epoch"] = epoch
        return True
    score = {
        "val_loss": -(val.loss if val.loss is not None else float("inf")),
        "val_accuracy": val.accuracy,
        "val_macro_f1": val.macro_f1,
    }[config.select]
    if selection["best"] is None or score > selection["best"]:
        selection.update(best=score, epoch=epoch, since=0)
        return True
    selection["since"] += 1
    if config.patience and selection["since"] >= config.patience:
        selection["stopped"] = True
        log.info("early stop: %s has not improved for %d epochs", config.select, config.patience)
    return False


def _save_epoch(
    out: Path,
    model: SentimentNet,
    optimizer: torch.optim.Optimizer,
    scheduler,
    recipe: Recipe,
    vocab: Vocabulary | None,
    epoch: int,
    step: int,
    steps: int,
    context: distributed.Context,
    history: list[dict[str, Any]],
    selection: dict[str, Any],
) -> None:
    """last.pt, then checkpoint.pt when this epoch is selected, then metrics.jsonl (rank 0)."""
    state = {
        "model_type": recipe.train.model,
        "recipe": ckpt.recipe_text(recipe),
        "vocab": vocab.words if vocab is not None else None,
        "lowercase": vocab.lowercase if vocab is not None else recipe.train.lowercase,
        "tweet_tokens": vocab.tweets if vocab is not None else recipe.train.tweet_tokens,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "steps_per_epoch": steps,
        "world_size": context.world_size,
        "rng": ckpt.rng_state(),
        "history": history,
        "selection": selection,
    }
    ckpt.save_checkpoint(out / ckpt.LAST_NAME, state)
    if history[-1]["selected"]:
        ckpt.publish(out / ckpt.LAST_NAME, out / ckpt.SELECTED_NAME)
    atomic_write_text(out / METRICS_LINES, "".join(json.dumps(r) + "\n" for r in history))


def _write_final(
    out: Path,
    config: TrainConfig,
    shards: str,
    chosen: dict[str, Any],
    test: Metrics,
    val: Metrics | None,
    epochs: int,
) -> None:
    atomic_write_json(
        out / METRICS_FINAL,
        {
            "model": config.model,
            "split": schema.TEST,
            **test.to_json(),
            "selected_epoch": chosen["epoch"],
            "selected_by": config.select,
            "step": chosen["step"],
            "epochs": epochs,
            "validation": val.to_json() if val is not None else None,
            "checkpoint": ckpt.SELECTED_NAME,
            "shards": shards,
        },
    )
