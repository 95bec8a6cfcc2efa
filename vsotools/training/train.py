"""``vsotools train``: train the fusion model or a baseline on a shard set, streaming it.

Read top to bottom, in the shape of torchvision's reference scripts: ``train`` sets up
(``set_up``: the training folder and the checkpoint to resume, the branches and the model, the
``TrainState`` and the data), runs the epochs (``run_epochs``: ``train_one_epoch``, the model
on the validation carve, a checkpoint, model selection) and finishes (``finish``: the selected
model scored once on the test split, and the final record). One process trains on the CPU or
one GPU; under ``torchrun`` every process runs this same code on its part of the shards,
wrapped in DistributedDataParallel. What the branches start from is ``training.branches``; the
state that travels from step to step, ``training.state``; the files it leaves,
``training.folder``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vsotools.core import schema
from vsotools.core.config import Recipe, TrainConfig, output_settings, write_recipe
from vsotools.core.errors import ConfigError, ExistingOutput, VsoError
from vsotools.core.metrics import Metrics
from vsotools.training import branches, distributed, encoders
from vsotools.training import checkpoint as ckpt
from vsotools.training import vocab as vocab_rules
from vsotools.training.data import ModelInput, ShardSet, split_stream
from vsotools.training.features import (
    FeatureStore,
    FrozenFeatures,
    compute_features,
    frozen_now,
    without_branches,
)
from vsotools.training.folder import (
    SELECTED_FILE,
    VECTORS_FILE,
    EpochRecord,
    TrainingFolder,
    TrainingFolderError,
    training_inputs,
)
from vsotools.training.inference import Outputs, autocast, autocast_dtype, evaluate_batches
from vsotools.training.loader import (
    BatchMover,
    TextEncoder,
    check_shard_count,
    gpu_jpeg_decoder,
    make_loader,
    raise_errors,
    steps_per_epoch,
)
from vsotools.training.state import TrainState
from vsotools.training.vocab import Vocabulary

log = logging.getLogger(__name__)

RESUMABLE_CHANGES = ("epochs", "patience")
"""Settings a resumed training may change besides those that shape no output (workers, device,
precision...): how long it goes on."""
STARTS = ("init_text", "init_image")
"""Settings naming the checkpoints the branches start from: compared by their bytes."""


class ResumeMismatch(ConfigError):
    """A training folder holds an unfinished training of other settings, shards or starting
    checkpoints than those it is asked to resume with."""


@dataclass
class TrainReport:
    out: Path
    checkpoint: Path
    model: str
    epochs: int
    """Epochs finished (fewer than asked when early stopping ended the training)."""
    steps: int
    selected_epoch: int
    test: Metrics
    """The selected model on the test split."""
    validation: Metrics | None
    seconds: float
    """Wall time of this invocation."""
    resumed_after: int | None
    """The epoch a resumed training continued after, or None."""
    rank: int = 0
    """This process's rank (under torchrun every rank returns a report)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["test"] = self.test.to_json()
        data["validation"] = self.validation.to_json() if self.validation else None
        return data


@dataclass
class Session:
    """What a training reads and where it writes: fixed once it is set up."""

    recipe: Recipe
    shard_set: ShardSet
    folder: TrainingFolder
    context: distributed.Context
    reader: TextEncoder | None
    """What turns the model's text into token ids (None: the model reads no text)."""
    model_input: ModelInput
    mover: BatchMover
    dtype: torch.dtype | None
    """The autocast type (None: full fp32)."""
    criterion: nn.Module
    steps: int
    """Optimizer steps of an epoch, the same on every rank."""
    features: FrozenFeatures
    starts: dict[str, Any]
    """The checkpoints the branches start from, by their sha256 (``training_inputs``)."""
    check: bool
    """Compare what every shard gives with its manifest entry."""
    show: bool
    """Progress bars (on rank 0, when asked for)."""

    @property
    def config(self) -> TrainConfig:
        return self.recipe.train

    def loader(self, which: str, cached: frozenset[str], epoch: int = 0):
        """A DataLoader over the ``train``, ``val`` or ``test`` stream of this rank, without
        the input of the ``cached`` branches (their features come from a store)."""
        config = self.config
        stream = split_stream(
            self.shard_set, schema.TEST if which == "test" else schema.TRAIN,
            without_branches(self.model_input, cached), config, self.context,
            train=which == "train", steps=self.steps, validation=which == "val",
            gpu_decode=config.gpu_decode, check=self.check,
        )  # fmt: skip
        stream.set_epoch(epoch)
        return make_loader(stream, config.workers, self.context.device.type == "cuda")

    def score(self, model: nn.Module, which: str, features: FeatureStore | None) -> Metrics:
        """Metrics of ``model`` on the validation carve (``val``) or the test split: each rank
        reads its shards, and the ranks' outputs are merged."""
        cached = features.branches if features else frozenset()
        outputs = evaluate_batches(
            model, self.loader(which, cached), self.mover, self.dtype, desc=which, features=features
        )
        return Outputs.merge(distributed.gather_objects(self.context, outputs)).metrics()

    def save(self, state: TrainState) -> None:
        """Rank 0: ``last.pt``, ``checkpoint.pt`` when the last epoch's model is the one kept,
        and ``metrics.jsonl``."""
        checkpoint = state.to_checkpoint(
            self.recipe, self.reader, steps_per_epoch=self.steps,
            world_size=self.context.world_size, shards=self.shard_set.fingerprint,
            starts=self.starts,
        )  # fmt: skip
        ckpt.save_checkpoint(self.folder.last, checkpoint)
        if state.history[-1].selected:
            ckpt.publish(self.folder.last, self.folder.selected)
        self.folder.write_epochs(state.history)


def train(
    recipe: Recipe,
    shards: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    check: bool = True,
) -> TrainReport:
    """Train ``recipe.train.model`` on the shard set at ``shards`` into the training folder
    ``out``; ``resume`` continues a training there. ``check`` compares what every shard gives
    with its manifest entry."""
    context = distributed.setup(recipe.train.device)
    folder = TrainingFolder(out)
    try:
        shard_set = ShardSet.open(str(shards))
        _check_inputs(recipe.train, shard_set, context)
        with folder.lock() if context.is_main else contextlib.nullcontext():
            started = time.perf_counter()
            session, state = set_up(
                recipe, shard_set, folder, context, resume=resume, progress=progress, check=check
            )
            run_epochs(session, state)
            report = finish(session, state, started)
        # Every rank returns once rank 0 has finished the training folder and let go of it. A
        # rank that left straight after the last collective could reach interpreter exit while
        # gloo's threads still released that collective's tensors, and abort
        # (https://github.com/pytorch/pytorch/issues/190489).
        distributed.barrier(context)
        return report
    finally:
        distributed.teardown(context)


def _check_inputs(config: TrainConfig, shard_set: ShardSet, context: distributed.Context) -> None:
    """Refuse, before anything is written, what cannot train: a pretrained encoder whose
    package is missing, too few shards for the readers, GPU decoding without a GPU."""
    encoders.require_packages(config)
    check_shard_count(
        len(shard_set.shards(schema.TRAIN)), context.world_size, config.workers, schema.TRAIN
    )
    if config.gpu_decode:
        if context.device.type != "cuda":
            raise ConfigError("train.gpu_decode needs a CUDA device (set gpu_decode=false)")
        gpu_jpeg_decoder()  # a clear error now, not after building the vocabulary


# --- set up: the folder, the model, the state, the data -----------------------------------------


def set_up(
    recipe: Recipe,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    *,
    resume: bool,
    progress: bool,
    check: bool,
) -> tuple[Session, TrainState]:
    """The session of a training and its state at epoch 0, or where ``last.pt`` left it."""
    config = recipe.train
    device = context.device

    # --- the training folder, and the checkpoint to resume ---
    if resume and context.is_main:
        _repair_links(folder)
    distributed.barrier(context)
    resumed = _checkpoint_to_resume(folder, recipe, shard_set, resume)
    if context.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, folder.recipe)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # --- the branches (the paper's networks or pretrained encoders) and the model ---
    start = branches.start(config, resumed, shard_set, folder, context, check)
    if resumed is not None and context.is_main:
        _restore_vectors(folder, config, start.reader, resumed)
    model = branches.build(config, start)
    if resumed is None:
        branches.initialise(model, config)
    model.to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last and model.image is not None:
        model.image.to(memory_format=torch.channels_last)
    branches.set_trainable(model, branches.frozen_throughout(model, config))
    log.info(
        "%s model: %s trainable parameters", config.model, f"{branches.trainable_count(model):,}"
    )

    # --- the state: Adam, staircase decay stepped every batch, where the loop starts ---
    pretrained = frozenset(b for b in ("text", "image") if encoders.is_pretrained(config, b))
    state = TrainState.start(model, config, pretrained)
    if resumed is not None:
        state.restore(resumed, config)
        log.info("resuming after epoch %d (step %d)", state.epoch, state.step)

    # --- the data, and the features of frozen pretrained encoders ---
    model_input = ModelInput.of(config, start.reader)
    dtype = autocast_dtype(config.precision, device)
    n_fit = round(shard_set.samples(schema.TRAIN) * (1 - config.val_fraction))
    show = progress and context.is_main
    mover = model_input.mover(
        device, channels_last=channels_last, color_jitter=config.color_jitter, seed=config.seed,
        rank=context.rank,
    )  # fmt: skip
    features = FrozenFeatures(
        pretrained,
        functools.partial(
            compute_features, model, shard_set=shard_set, model_input=model_input, config=config,
            context=context, folder=Path(config.features_dir or folder.root), dtype=dtype,
            check=check, progress=show,
        ),
    )  # fmt: skip
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(config, shard_set.labels(schema.TRAIN), device)
    )
    session = Session(
        recipe=recipe,
        shard_set=shard_set,
        folder=folder,
        context=context,
        reader=start.reader,
        model_input=model_input,
        mover=mover,
        dtype=dtype,
        criterion=criterion,
        steps=steps_per_epoch(n_fit, config.batch_size, context.world_size),
        features=features,
        starts=training_inputs(recipe, shard_set.fingerprint)["starts"],
        check=check,
        show=show,
    )
    return session, state


def _checkpoint_to_resume(
    folder: TrainingFolder, recipe: Recipe, shard_set: ShardSet, resume: bool
) -> dict[str, Any] | None:
    if not resume:
        if folder.holds_training():
            raise ExistingOutput(f"{folder} already holds a training", "resume", "elsewhere")
        return None
    if not folder.last.exists():
        log.info("%s has no checkpoint yet: starting from the beginning", folder)
        return None
    checkpoint = ckpt.load_checkpoint(folder.last)
    selection = checkpoint.get("selection") or {}
    kept = int(selection.get("epoch", 0))
    if kept and kept != int(checkpoint["epoch"]) and not folder.selected.exists():
        raise TrainingFolderError(
            f"{folder.selected} is missing: it held epoch {kept}'s model, the one selected, and"
            " only training again brings it back; train into another folder"
        )
    saved = ckpt.recipe_of(checkpoint).train
    ours, theirs = output_settings(recipe.train), output_settings(saved)
    for name, value in ours.items():
        if name not in RESUMABLE_CHANGES and name not in STARTS and theirs[name] != value:
            raise ResumeMismatch(
                f"resuming {folder}: train.{name} is {value!r} here but {theirs[name]!r} in"
                f" {folder.last}; resume with the training's recipe ({folder.recipe})"
            )
    trained_on = checkpoint.get("shards")
    if trained_on is not None and trained_on != shard_set.fingerprint:
        raise ResumeMismatch(
            f"resuming {folder}: it trained on the shard set with fingerprint"
            f" {trained_on[:16]}..., but {shard_set.location} has {shard_set.fingerprint[:16]}...;"
            " resume with the shards it started on"
        )
    # The checkpoints its branches started from count by their bytes, wherever they lie now.
    started = checkpoint.get("starts")
    today = training_inputs(recipe, shard_set.fingerprint)["starts"]
    changed = [name for name in STARTS if (started or {}).get(name) != today[name]]
    if started is not None and changed:
        raise ResumeMismatch(
            f"resuming {folder}: train.{changed[0]} ({getattr(recipe.train, changed[0])}) is not"
            f" the checkpoint it started from; resume with that one, or train afresh"
        )
    return checkpoint


def _repair_links(folder: TrainingFolder) -> None:
    """Before a resume (rank 0): ``last.pt`` and ``checkpoint.pt`` are one file when the last
    epoch's model is the one kept. A ``last.pt`` that is gone comes back from ``checkpoint.pt``
    (a finished training's, whose record says so); a ``checkpoint.pt`` that is gone, or was not
    yet published when the training was killed, comes back from ``last.pt``."""
    if folder.last.exists():
        checkpoint = ckpt.load_checkpoint(folder.last)
        kept = int((checkpoint.get("selection") or {}).get("epoch", 0))
        if kept and kept == int(checkpoint["epoch"]):
            ckpt.publish(folder.last, folder.selected)
        return
    if not folder.selected.exists():
        return
    try:
        final = folder.read_final()
    except TrainingFolderError:
        return
    if final is None:
        return
    if final.get("selected_epoch") == final.get("epochs"):
        ckpt.publish(folder.selected, folder.last)
        log.warning(
            "%s was missing: restored from %s (the same epoch)", folder.last, folder.selected
        )


def _restore_vectors(
    folder: TrainingFolder, config: TrainConfig, reader: Any, resumed: dict[str, Any]
) -> None:
    """``word2vec.bin``, which the final record lists only while the word vectors stay as they
    started (``train.tune_vectors`` off), comes back from the checkpoint when it is gone or
    cut: the checkpoint holds those very vectors."""
    if VECTORS_FILE not in folder.damage() or config.tune_vectors:
        return
    if isinstance(reader, Vocabulary):
        matrix = resumed["model"]["text.embedding.weight"]
        vocab_rules.save_word_vectors(reader, matrix, folder.vectors)
        log.warning("%s was missing or damaged: written again from the checkpoint", folder.vectors)


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


# --- the epochs ---------------------------------------------------------------------------------


def run_epochs(session: Session, state: TrainState) -> None:
    """Train until ``train.epochs`` are done or early stopping ends it; after each epoch, a
    checkpoint of the state and the epoch's record."""
    config = session.config
    frozen: frozenset[str] | None = None
    model: nn.Module = state.model
    while state.epoch < config.epochs and not state.selection.stopped:
        now = frozen_now(state.model, config, state.epoch)
        if frozen != now:
            frozen = now
            branches.set_trainable(state.model, frozen)
            model = distributed.wrap(state.model, session.context)
            if frozen:
                log.info(
                    "from epoch %d: the %s branch stays frozen",
                    state.epoch + 1,
                    " and ".join(sorted(frozen)),
                )
        state.record(run_epoch(session, state, model, frozen))
        if session.context.is_main:
            _log_epoch(state.history[-1], config.epochs)
            session.save(state)
        distributed.barrier(session.context)


def run_epoch(
    session: Session, state: TrainState, model: nn.Module, frozen: frozenset[str]
) -> EpochRecord:
    """One epoch of ``state`` (``model`` is its model, wrapped for DDP where several ranks
    train), then its model on the validation carve: the epoch's record."""
    config, context = session.config, session.context
    epoch = state.epoch  # finished so far: this is epoch + 1
    features = session.features.of(frozen)
    # Every random draw of an epoch follows from (seed, epoch, rank), so a resumed training
    # continues exactly as an uninterrupted one would.
    torch.manual_seed(_epoch_seed(config.seed, epoch, context.rank))
    session.mover.set_epoch(epoch)
    loader = session.loader("train", features.branches if features else frozenset(), epoch)
    stats = train_one_epoch(
        state, model, loader, session, frozen=frozen, features=features,
        desc=f"epoch {epoch + 1}/{config.epochs}",
    )  # fmt: skip
    stop_if_diverged(session, state, stats)
    # Per-rank step counts matter (and are shown) when several processes train.
    log.log(
        logging.INFO if context.world_size > 1 else logging.DEBUG,
        "rank %d/%d epoch %d: %d steps, %d samples",
        context.rank, context.world_size, epoch + 1, stats.steps, stats.samples,
    )  # fmt: skip

    evaluated = time.perf_counter()
    val = session.score(state.model, "val", features) if config.val_fraction > 0 else None
    record = _epoch_record(epoch + 1, state.step + stats.steps, state.lr, stats, context, val)
    record.eval_seconds = round(time.perf_counter() - evaluated, 3)
    record.frozen_branches = sorted(frozen)
    return record


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


@dataclass
class EpochStats:
    """What one rank's epoch did: loss and accuracy summed over its samples, its wall time."""

    steps: int
    samples: int
    loss_sum: float
    correct: int
    seconds: float
    diverged_at: int | None = None
    """The first of the epoch's steps whose loss was NaN or infinite, on any rank."""
    diverged: bool = False
    """Whether the loss of some rank was NaN or infinite (the epoch then stopped early)."""


def train_one_epoch(
    state: TrainState,
    model: nn.Module,
    loader,
    session: Session,
    *,
    frozen: frozenset[str] = frozenset(),
    features: FeatureStore | None = None,
    desc: str = "train",
) -> EpochStats:
    """``session.steps`` optimizer steps of ``state`` over ``loader``'s batches; loss and
    accuracy summed on the device (no sync per step).

    ``model`` is ``state.model`` or its DDP wrapper. ``frozen`` branches stay in evaluation
    mode (their batch norm statistics and dropout as in evaluation); ``features`` gives the
    features of the branches it holds.
    """
    model.train()
    net = distributed.unwrapped(model)
    for name in frozen:
        getattr(net, name).eval()
    mover, steps = session.mover, session.steps
    device = mover.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    diverged_at = torch.full((), -1, device=device, dtype=torch.int64)
    samples = 0
    done = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not session.show, leave=False)
    for batch in raise_errors(loader):
        inputs = mover.inputs(batch, train=True)
        if features is not None:
            inputs.update(features.inputs(batch["keys"], device))
        labels = mover.labels(batch)
        with autocast(device, session.dtype):
            logits = model(**inputs)
        loss = session.criterion(logits.float(), labels)
        diverged_at = _first_nonfinite(diverged_at, loss, done + 1)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()

        n = labels.shape[0]
        samples += n
        done += 1
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        if session.show and (done % 10 == 0 or done == steps):
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                loss=f"{loss.item():.4f}",
                samples_s=f"{samples / elapsed:.1f}",
                lr=f"{state.lr:.2e}",
            )
        bar.update()
        # Every rank asks at the same steps, and all stop together: a rank that stopped alone
        # would leave the others waiting for it in their next gradient all-reduce.
        if done % DIVERGENCE_CHECK_STEPS == 0 and distributed.any_rank(
            session.context, diverged_at >= 0
        ):
            break
    bar.close()
    # The first step at which any rank's loss stopped being a number (steps + 1: none did).
    mine = int(diverged_at.item())
    first = distributed.min_over_ranks(session.context, mine if mine >= 0 else steps + 1)
    diverged = first <= steps
    if done != steps and not diverged:
        raise VsoError(f"the loader gave {done} batches where the epoch has {steps} steps")
    return EpochStats(
        steps=done,
        samples=samples,
        loss_sum=loss_sum.item(),
        correct=int(correct.item()),
        seconds=time.perf_counter() - started,
        diverged_at=first if diverged else None,
        diverged=diverged,
    )


DIVERGENCE_CHECK_STEPS = 20
"""Every this many steps the ranks ask their devices whether the loss is still a number: asking
every step would wait for the GPU each time."""


class TrainingDiverged(VsoError):
    """The training loss, or the weights, stopped being numbers (NaN or infinite)."""


def _first_nonfinite(diverged_at: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``step`` if it is the first whose ``loss`` is NaN or infinite, else ``diverged_at``
    (-1 while every loss was a number); computed on the device, without waiting for it."""
    first = (diverged_at < 0) & ~torch.isfinite(loss.detach())
    return torch.where(first, torch.full_like(diverged_at, step), diverged_at)


def stop_if_diverged(session: Session, state: TrainState, stats: EpochStats) -> None:
    """Stop a training whose loss or weights are no longer numbers, before the epoch's model is
    evaluated or saved: the checkpoints of the last good epoch stay as they are (``state``
    still counts the epochs and steps finished before this one)."""
    # Buffers too: a batch norm's running variance can overflow while its weights stay finite,
    # and evaluate and predict refuse a model with any non-finite tensor.
    weights_finite = all(
        bool(torch.isfinite(tensor).all())
        for tensor in state.model.state_dict().values()
        if tensor.is_floating_point()
    )
    if not stats.diverged and weights_finite:
        return
    at = stats.diverged_at
    where = (
        f"step {state.step + at}"
        if at is not None
        else f"its last step ({state.step + stats.steps})"
    )
    what = "the training loss" if stats.diverged else "the weights"
    folder = session.folder
    kept = (
        f"{folder.last} keeps epoch {state.epoch}"
        if state.epoch
        else "no epoch finished, nothing was saved"
    )
    raise TrainingDiverged(
        f"{folder}: epoch {state.epoch + 1}, {where}: {what} became NaN or infinite; the training"
        f" diverged (a learning rate too high?) and stopped; {kept}"
    )


def _epoch_record(
    epoch: int,
    step: int,
    lr: float,
    stats: EpochStats,
    context: distributed.Context,
    val: Metrics | None,
) -> EpochRecord:
    """The record of an epoch: the ranks' figures summed, their wall time averaged."""
    samples, loss_sum, correct, seconds = distributed.all_sum(
        context, [stats.samples, stats.loss_sum, stats.correct, stats.seconds]
    )
    seconds /= context.world_size
    return EpochRecord(
        epoch=epoch,
        step=step,
        lr=lr,
        train_loss=loss_sum / samples,
        train_accuracy=correct / samples,
        train_samples=int(samples),
        seconds=round(seconds, 3),
        samples_per_s=round(samples / seconds, 2),
        val=val,
    )


def _log_epoch(record: EpochRecord, epochs: int) -> None:
    val = ""
    if record.val is not None:
        val = (
            f", val loss {record.val.loss:.4f} accuracy {record.val.accuracy:.4f}"
            f" macro-F1 {record.val.macro_f1:.4f}"
        )
    log.info(
        "epoch %d/%d: train loss %.4f accuracy %.4f%s (%.1f s, %.1f samples/s)%s",
        record.epoch,
        epochs,
        record.train_loss,
        record.train_accuracy,
        val,
        record.seconds,
        record.samples_per_s,
        " *" if record.selected else "",
    )


# --- finish: the selected model, scored once on the test split -----------------------------------


def finish(session: Session, state: TrainState, started: float) -> TrainReport:
    """Score the selected model once on the test split and record that the training finished
    (``metrics.json``, last)."""
    config, context = session.config, session.context
    _load_selected(session, state)
    features = session.features.of(branches.frozen_throughout(state.model, config))
    test = session.score(state.model, "test", features)
    chosen = state.selected_record()
    validation = chosen.val if config.val_fraction > 0 else None
    if context.is_main:
        log.info(
            "test, epoch %d's model: accuracy %.4f macro-F1 %.4f (scored once)",
            chosen.epoch, test.accuracy, test.macro_f1,
        )  # fmt: skip
        folder = session.folder
        # What a resumed training found gone comes back here, the same bytes: the last epoch's
        # model, when it is the one kept, and the epochs' records (as they were written).
        if chosen.epoch == state.epoch:
            ckpt.publish(folder.last, folder.selected)
        folder.write_epochs(state.history)
        folder.finish(
            _final_record(session, state, test),
            training_inputs(session.recipe, session.shard_set.fingerprint),
            vectors=not config.tune_vectors,
        )
    return TrainReport(
        out=session.folder.root,
        checkpoint=session.folder.selected,
        model=config.model,
        epochs=state.epoch,
        steps=state.step,
        selected_epoch=chosen.epoch,
        test=test,
        validation=validation,
        seconds=time.perf_counter() - started,
        resumed_after=state.resumed_after,
        rank=context.rank,
    )


def _load_selected(session: Session, state: TrainState) -> None:
    """Put the selected epoch's weights into the model on every rank, unless it holds them."""
    if state.selection.epoch == state.epoch:
        return
    if session.context.is_main:
        state.model.load_state_dict(ckpt.load_checkpoint(session.folder.selected)["model"])
    distributed.broadcast_module(session.context, state.model)


def _final_record(session: Session, state: TrainState, test: Metrics) -> dict[str, Any]:
    config = session.config
    chosen = state.selected_record()
    validation = chosen.val if config.val_fraction > 0 else None
    return {
        "model": config.model,
        "split": schema.TEST,
        **test.to_json(),
        "selected_epoch": chosen.epoch,
        "selected_by": config.select,
        "step": chosen.step,
        "epochs": state.epoch,
        "validation": validation.to_json() if validation is not None else None,
        "checkpoint": SELECTED_FILE,
        "shards": session.shard_set.location,
    }
