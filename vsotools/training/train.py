"""``vsotools train``: train the fusion model or a baseline on a shard set, streaming it.

Read top to bottom, in the shape of torchvision's reference scripts: ``train`` sets up the
training folder and the state to resume, the vocabulary and word vectors, the model, the
optimizer and the data, then loops over epochs (``train_one_epoch``, ``evaluate`` on the
validation carve, a checkpoint, model selection), and at the end scores the selected model once
on the test split. One process trains on the CPU or one GPU; under ``torchrun`` every process
runs this same code on its part of the shards, wrapped in DistributedDataParallel. The files it
leaves are described in ``training.folder``.
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
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vsotools.core import schema
from vsotools.core.config import Recipe, TrainConfig, output_settings, write_recipe
from vsotools.core.errors import ConfigError, ExistingOutput, VsoError
from vsotools.core.metrics import Metrics
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed, encoders
from vsotools.training import vocab as vocab_rules
from vsotools.training.data import ModelInput, ShardSet, split_stream
from vsotools.training.features import (
    FeatureStore,
    FrozenFeatures,
    compute_features,
    frozen_now,
    without_branches,
)
from vsotools.training.folder import SELECTED_FILE, TrainingFolder, training_fingerprint
from vsotools.training.inference import Outputs, autocast, autocast_dtype, evaluate_batches
from vsotools.training.loader import (
    BatchMover,
    KeepValidation,
    LoaderError,
    Shard,
    ShardStream,
    TextEncoder,
    check_shard_count,
    gpu_jpeg_decoder,
    make_loader,
    raise_errors,
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

RESUMABLE_CHANGES = ("epochs", "patience")
"""Settings a resumed training may change besides those that shape no output (workers, device,
precision...): how long it goes on."""


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
class Selection:
    """Which epoch's model is kept, and early stopping: the best validation score so far, its
    epoch, and the epochs since it (``metric`` ``last`` keeps every latest epoch)."""

    metric: str
    patience: int
    best: float | None = None
    epoch: int = 0
    since: int = 0
    stopped: bool = False

    def update(self, epoch: int, val: Metrics | None) -> bool:
        """Whether the model after ``epoch`` is the one to keep; counts towards stopping."""
        if self.metric == "last" or val is None:
            self.epoch = epoch
            return True
        score = {
            "val_loss": -(val.loss if val.loss is not None else float("inf")),
            "val_accuracy": val.accuracy,
            "val_macro_f1": val.macro_f1,
        }[self.metric]
        if self.best is None or score > self.best:
            self.best, self.epoch, self.since = score, epoch, 0
            return True
        self.since += 1
        if self.patience and self.since >= self.patience:
            self.stopped = True
            log.info("early stop: %s has not improved for %d epochs", self.metric, self.patience)
        return False

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "epoch": self.epoch,
            "since": self.since,
            "stopped": self.stopped,
        }

    @classmethod
    def restore(cls, config: TrainConfig, state: dict[str, Any] | None) -> Selection:
        selection = cls(config.select, config.patience)
        if state:
            selection.best, selection.epoch = state["best"], int(state["epoch"])
            selection.since, selection.stopped = int(state["since"]), bool(state["stopped"])
        return selection


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
            report = _train(recipe, shard_set, folder, context, resume, progress, check)
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


def _train(
    recipe: Recipe,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    resume: bool,
    progress: bool,
    check: bool,
) -> TrainReport:
    started = time.perf_counter()
    config = recipe.train
    device = context.device
    show = progress and context.is_main

    # --- the training folder, and the state to resume ---
    state = _state_to_resume(folder, recipe, shard_set, resume)
    if context.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, folder.recipe)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # --- the branches (the paper's networks or pretrained encoders) and the model ---
    text_reader, text_branch, embeddings = _text_branch(
        config, state, shard_set, folder, context, check
    )
    model = build_model(config, embeddings, text=text_branch, image=_image_branch(config, state))
    if state is not None:
        model.load_state_dict(state["model"])
    else:
        _initialise_branches(model, config)
    model.to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last and model.image is not None:
        model.image.to(memory_format=torch.channels_last)
    pretrained = frozenset(b for b in ("text", "image") if encoders.is_pretrained(config, b))
    _set_trainable(model, _frozen_throughout(model, config))
    log.info("%s model: %s trainable parameters", config.model, f"{_trainable(model):,}")

    # --- the optimizer: Adam, staircase decay stepped every batch ---
    optimizer = torch.optim.Adam(
        _parameter_groups(model, config, pretrained), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_decay_steps, gamma=config.lr_decay
    )
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(config, shard_set.labels(schema.TRAIN), device)
    )

    # --- the data, and the features of frozen pretrained encoders ---
    model_input = ModelInput.of(config, text_reader)
    n_fit = round(shard_set.samples(schema.TRAIN) * (1 - config.val_fraction))
    steps = steps_per_epoch(n_fit, config.batch_size, context.world_size)

    def stream(which: str, cached: frozenset[str]) -> ShardStream:
        """The ``train``, ``val`` or ``test`` stream, without the input of the ``cached``
        branches (their features come from a store)."""
        return split_stream(
            shard_set, schema.TEST if which == "test" else schema.TRAIN,
            without_branches(model_input, cached), config, context,
            train=which == "train", steps=steps, validation=which == "val",
            gpu_decode=config.gpu_decode, check=check,
        )  # fmt: skip

    mover = model_input.mover(
        device,
        channels_last=channels_last,
        color_jitter=config.color_jitter,
        seed=config.seed,
        rank=context.rank,
    )
    dtype = autocast_dtype(config.precision, device)
    stored = FrozenFeatures(
        pretrained,
        functools.partial(
            compute_features, model, shard_set=shard_set, model_input=model_input, config=config,
            context=context, folder=Path(config.features_dir or folder.root), dtype=dtype,
            check=check, progress=show,
        ),
    )  # fmt: skip

    # --- where the loop starts ---
    epoch, step, history = 0, 0, []
    selection = Selection.restore(config, None)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        selection = Selection.restore(config, state["selection"])
        log.info("resuming after epoch %d (step %d)", epoch, step)
    resumed_after = epoch if state is not None else None

    # --- the loop: train, validate, checkpoint, select ---
    frozen: frozenset[str] | None = None
    wrapped: nn.Module = model
    while epoch < config.epochs and not selection.stopped:
        now = frozen_now(model, config, epoch)
        if frozen != now:
            frozen = now
            _set_trainable(model, frozen)
            wrapped = _wrap(model, context)
            if frozen:
                log.info(
                    "from epoch %d: the %s branch stays frozen",
                    epoch + 1,
                    " and ".join(sorted(frozen)),
                )
        features = stored.of(frozen)
        cached = features.branches if features else frozenset()
        # Every random draw of an epoch follows from (seed, epoch, rank), so a resumed training
        # continues exactly as an uninterrupted one would.
        torch.manual_seed(_epoch_seed(config.seed, epoch, context.rank))
        mover.set_epoch(epoch)
        train_stream = stream("train", cached)
        train_stream.set_epoch(epoch)
        loader = make_loader(train_stream, config.workers, device.type == "cuda")
        stats = train_one_epoch(
            wrapped, loader, mover, optimizer, scheduler, criterion, dtype,
            steps=steps, desc=f"epoch {epoch + 1}/{config.epochs}", progress=show,
            frozen=frozen, features=features,
        )  # fmt: skip
        stop_if_diverged(model, stats, epoch, step, folder)
        step += stats["steps"]
        # Per-rank step counts matter (and are shown) when several processes train.
        log.log(
            logging.INFO if context.world_size > 1 else logging.DEBUG,
            "rank %d/%d epoch %d: %d steps, %d samples",
            context.rank, context.world_size, epoch + 1, stats["steps"], stats["samples"],
        )  # fmt: skip
        epoch += 1

        evaluated = time.perf_counter()
        val = None
        if config.val_fraction > 0:
            val = evaluate(
                model, stream("val", cached), config.workers, mover, dtype, context, "val",
                features=features,
            )  # fmt: skip
        record = _epoch_record(epoch, step, scheduler.get_last_lr()[0], stats, context, val)
        record["eval_seconds"] = round(time.perf_counter() - evaluated, 3)
        record["frozen_branches"] = sorted(frozen)
        record["selected"] = selection.update(epoch, val)
        history.append(record)
        if context.is_main:
            _log_epoch(record, config.epochs)
            training = ckpt.training_state(
                recipe=recipe, model=model, vocab=text_reader, optimizer=optimizer,
                scheduler=scheduler, epoch=epoch, step=step, steps_per_epoch=steps,
                world_size=context.world_size, history=history, selection=selection.state(),
                shards=shard_set.fingerprint,
            )  # fmt: skip
            ckpt.save_checkpoint(folder.last, training)
            if record["selected"]:
                ckpt.publish(folder.last, folder.selected)
            folder.write_epochs(history)
        distributed.barrier(context)

    # --- the selected model, scored once on the test split ---
    _load_selected(model, folder, selection.epoch, epoch, context)
    features = stored.of(_frozen_throughout(model, config))
    cached = features.branches if features else frozenset()
    test = evaluate(
        model, stream("test", cached), config.workers, mover, dtype, context, "test",
        features=features,
    )  # fmt: skip
    chosen = next(r for r in history if r["epoch"] == selection.epoch)
    validation = _metrics_from_record(chosen, "val") if config.val_fraction > 0 else None
    if context.is_main:
        log.info(
            "test, epoch %d's model: accuracy %.4f macro-F1 %.4f (scored once)",
            selection.epoch, test.accuracy, test.macro_f1,
        )  # fmt: skip
        folder.finish(
            _final_record(config, shard_set, chosen, test, validation, epoch),
            training_fingerprint(recipe, shard_set.fingerprint),
        )
    return TrainReport(
        out=folder.root,
        checkpoint=folder.selected,
        model=config.model,
        epochs=epoch,
        steps=step,
        selected_epoch=selection.epoch,
        test=test,
        validation=validation,
        seconds=time.perf_counter() - started,
        resumed_after=resumed_after,
        rank=context.rank,
    )


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


# --- the training folder and resuming -------------------------------------------------------


def _state_to_resume(
    folder: TrainingFolder, recipe: Recipe, shard_set: ShardSet, resume: bool
) -> dict[str, Any] | None:
    if not resume:
        if folder.holds_training():
            raise ExistingOutput(f"{folder} already holds a training", "resume", "elsewhere")
        return None
    if not folder.last.exists():
        log.info("%s has no checkpoint yet: starting from the beginning", folder)
        return None
    state = ckpt.load_checkpoint(folder.last)
    saved = ckpt.recipe_of(state).train
    ours, theirs = output_settings(recipe.train), output_settings(saved)
    for name, value in ours.items():
        if name not in RESUMABLE_CHANGES and theirs[name] != value:
            raise ConfigError(
                f"resuming {folder}: train.{name} is {value!r} here but {theirs[name]!r} in"
                f" {folder.last}; resume with the training's recipe ({folder.recipe})"
            )
    trained_on = state.get("shards")
    if trained_on is not None and trained_on != shard_set.fingerprint:
        raise ConfigError(
            f"resuming {folder}: it trained on the shard set with fingerprint"
            f" {trained_on[:16]}..., but {shard_set.location} has {shard_set.fingerprint[:16]}...;"
            " resume with the shards it started on"
        )
    return state


def _load_selected(
    model: SentimentNet,
    folder: TrainingFolder,
    selected: int,
    current: int,
    context: distributed.Context,
) -> None:
    """Put the selected epoch's weights into ``model`` on every rank, unless it holds them."""
    if selected == current:
        return
    if context.is_main:
        model.load_state_dict(ckpt.load_checkpoint(folder.selected)["model"])
    distributed.broadcast_module(context, model)


# --- the branches: vocabulary and word vectors, or pretrained encoders ---------------------------


def _text_branch(
    config: TrainConfig,
    state: dict[str, Any] | None,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    check: bool,
) -> tuple[TextEncoder | None, nn.Module | None, torch.Tensor | None]:
    """What turns text into token ids (a vocabulary or a tokenizer), the pretrained text
    encoder if the model has one, and the Kim CNN's word vectors if it has that."""
    if not encoders.has_branch(config, "text"):
        return None, None, None
    if config.text_encoder == "minilm":
        if state is not None:
            branch, tokenizer = encoders.text_from_spec(state["text_spec"])
        else:
            branch, tokenizer = encoders.load_text(config)
        return tokenizer, branch, None
    vocab, embeddings = _vocabulary(config, state, shard_set, folder, context, check)
    return vocab, None, embeddings


def _image_branch(config: TrainConfig, state: dict[str, Any] | None) -> nn.Module | None:
    """The pretrained image encoder if the model has one (the AlexNet-like branch is built by
    ``build_model``): its ImageNet weights, or a blank one a checkpoint's state goes into."""
    if not encoders.is_pretrained(config, "image"):
        return None
    return encoders.blank_image() if state is not None else encoders.load_image(config)


def _vocabulary(
    config: TrainConfig,
    state: dict[str, Any] | None,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    check: bool,
) -> tuple[Vocabulary, torch.Tensor]:
    """The Kim CNN's vocabulary and embedding matrix: from the checkpoint being resumed, from
    ``init_text``, or built on rank 0 from the training texts and sent to every rank."""
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
    built = None
    if context.is_main:
        built = _build_vocabulary(config, shard_set.shards(schema.TRAIN), folder, check)
    words, lowercase, tweets, matrix = distributed.broadcast_object(context, built)
    return Vocabulary(words, lowercase, tweets), matrix


def _build_vocabulary(
    config: TrainConfig, train_shards: list[Shard], folder: TrainingFolder, check: bool
) -> tuple[list[str], bool, bool, torch.Tensor]:
    keep = KeepValidation(config.seed, config.val_fraction, wanted=False)
    sentences = [
        vocab_rules.model_tokens(_text_of(sample), config.lowercase, config.tweet_tokens)
        for sample in read_samples(train_shards, skip_images=True, check=check)
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
    vocab_rules.save_word_vectors(vocab, matrix, folder.vectors)
    return vocab.words[len(vocab_rules.SPECIALS) :], vocab.lowercase, vocab.tweets, matrix


def _text_of(sample: dict[str, Any]) -> str:
    try:
        return sample[schema.SAMPLE_TEXT].decode("utf-8")
    except KeyError:
        raise LoaderError(
            f"{sample.get('__url__')}: sample {sample.get(schema.SAMPLE_KEY)} has no"
            f" .{schema.SAMPLE_TEXT} member"
        ) from None
    except UnicodeDecodeError as exc:
        raise LoaderError(
            f"{sample.get('__url__')}: sample {sample.get(schema.SAMPLE_KEY)}: its text is not"
            f" UTF-8 ({exc.reason})"
        ) from None


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
            source = ckpt.load_checkpoint(path)
            encoder = ckpt.recipe_of(source).train.text_encoder
            _require_same_settings("text", config, {"text_encoder": encoder})
            weights = _branch_weights(source, name, path)
        try:
            getattr(model, name).load_state_dict(weights)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"train.init_{name}: the {name} branch in {path} does not fit this recipe ({detail})"
            ) from None
        log.info("%s branch initialised from %s", name, path)


def _require_same_settings(name: str, config: TrainConfig, theirs: dict[str, Any]) -> None:
    """A branch started from ``init_NAME`` must compute what it was trained to: the settings
    that shape it (its encoder, how text is read, LRN) must be the recipe's."""
    path = getattr(config, f"init_{name}")
    for key, value in theirs.items():
        ours = getattr(config, key)
        if value != ours:
            raise ConfigError(
                f"train.init_{name}: {path} was trained with train.{key} = {_toml(value)},"
                f" this recipe with {_toml(ours)}"
            )


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _branch_weights(source: dict[str, Any], name: str, path: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    weights = {k[len(prefix) :]: v for k, v in source["model"].items() if k.startswith(prefix)}
    if not weights:
        raise ConfigError(
            f"train.init_{name}: {path} holds a {source.get('model_type')} model, which has no"
            f" {name} branch"
        )
    return weights


def _image_weights(path: str, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The image branch of a vsotools checkpoint, or the convolutions of a torchvision AlexNet
    state dict (ImageNet weights), checked against the recipe's image branch."""
    source = ckpt.load_weights_file(path)
    if ckpt.is_checkpoint(source):
        weights = _branch_weights(ckpt.checked_version(source, path), "image", path)
        trained = ckpt.recipe_of(source).train
        _require_same_settings(
            "image", config, {"image_encoder": trained.image_encoder, "lrn": trained.lrn}
        )
        return weights
    if config.image_encoder != "alexnet":
        raise ConfigError(
            f"train.init_image: {path} is not a vsotools checkpoint; an {config.image_encoder}"
            " branch starts from train.image_weights instead"
        )
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


def _frozen_throughout(model: SentimentNet, config: TrainConfig) -> frozenset[str]:
    """The branches of ``model`` that never train (``train.frozen_branches``): those frozen
    once ``train.freeze_branches_epochs`` are over."""
    return frozen_now(model, config, config.freeze_branches_epochs)


def _set_trainable(model: SentimentNet, frozen: frozenset[str]) -> None:
    """Every branch trains but those ``frozen``; the Kim CNN's word vectors only when tuned."""
    for name, branch in model.branches().items():
        trainable = name not in frozen
        for parameter_name, parameter in branch.named_parameters():
            if name == "text" and parameter_name.startswith("embedding."):
                parameter.requires_grad_(trainable and model.text.tune_vectors)  # type: ignore[union-attr]
            else:
                parameter.requires_grad_(trainable)


def _parameter_groups(
    model: SentimentNet, config: TrainConfig, pretrained: frozenset[str]
) -> list[dict[str, Any]]:
    """The trainable parameters: the pretrained encoders' at ``train.encoder_lr`` (when set),
    the rest at ``train.lr``."""
    encoder_ids = {id(p) for name in pretrained for p in getattr(model, name).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in encoder_ids]
    groups: list[dict[str, Any]] = [{"params": rest}]
    ours = [p for p in trainable if id(p) in encoder_ids]
    if ours:
        groups.append({"params": ours, "lr": config.encoder_lr or config.lr})
    return groups


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


# --- one epoch, one evaluation -----------------------------------------------------------------


def train_one_epoch(
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
    frozen: frozenset[str] = frozenset(),
    features: FeatureStore | None = None,
) -> dict[str, Any]:
    """``steps`` optimizer steps; loss and accuracy summed on the device (no sync per step).

    ``frozen`` branches stay in evaluation mode (their batch norm statistics and dropout as in
    evaluation); ``features`` gives the features of the branches it holds.
    """
    model.train()
    net = model.module if isinstance(model, DistributedDataParallel) else model
    for name in frozen:
        getattr(net, name).eval()
    device = mover.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    diverged_at = torch.full((), -1, device=device, dtype=torch.int64)
    samples = 0
    done = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    for batch in raise_errors(loader):
        inputs = mover.inputs(batch, train=True)
        if features is not None:
            inputs.update(features.inputs(batch["keys"], device))
        labels = mover.labels(batch)
        with autocast(device, dtype):
            logits = model(**inputs)
        loss = criterion(logits.float(), labels)
        diverged_at = _first_nonfinite(diverged_at, loss, done + 1)
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
        if done % DIVERGENCE_CHECK_STEPS == 0 and diverged_at.item() >= 0:
            break
    bar.close()
    first_nonfinite = int(diverged_at.item())
    if done != steps and first_nonfinite < 0:
        raise VsoError(f"the loader gave {done} batches where the epoch has {steps} steps")
    return {
        "diverged_at": first_nonfinite if first_nonfinite >= 0 else None,
        "steps": done,
        "samples": samples,
        "loss_sum": loss_sum.item(),
        "correct": int(correct.item()),
        "seconds": time.perf_counter() - started,
    }


DIVERGENCE_CHECK_STEPS = 20
"""Every this many steps the loop asks the device whether the loss is still a number: asking
every step would wait for the GPU each time."""


class TrainingDiverged(VsoError):
    """The training loss, or the weights, stopped being numbers (NaN or infinite)."""


def _first_nonfinite(diverged_at: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``step`` if it is the first whose ``loss`` is NaN or infinite, else ``diverged_at``
    (-1 while every loss was a number); computed on the device, without waiting for it."""
    first = (diverged_at < 0) & ~torch.isfinite(loss.detach())
    return torch.where(first, torch.full_like(diverged_at, step), diverged_at)


def stop_if_diverged(
    model: nn.Module, stats: dict[str, Any], epoch: int, step: int, folder: TrainingFolder
) -> None:
    """Stop a training whose loss or weights are no longer numbers, before its weights are
    evaluated or saved: the checkpoints of the last good epoch stay as they are. ``epoch`` and
    ``step`` are those finished before this epoch."""
    at = stats["diverged_at"]
    if at is None and all(torch.isfinite(p).all() for p in model.parameters()):
        return
    where = f"step {step + at}" if at is not None else f"its last step ({step + stats['steps']})"
    kept = f"{folder.last} keeps epoch {epoch}" if epoch else "no epoch finished, nothing was saved"
    what = "the training loss" if at is not None else "the weights"
    raise TrainingDiverged(
        f"{folder}: epoch {epoch + 1}, {where}: {what} became NaN or infinite; the training"
        f" diverged (a learning rate too high?) and stopped; {kept}"
    )


def evaluate(
    model: SentimentNet,
    stream: ShardStream,
    workers: int,
    mover: BatchMover,
    dtype: torch.dtype | None,
    context: distributed.Context,
    name: str,
    features: FeatureStore | None = None,
) -> Metrics:
    """Metrics of ``model`` on a split: each rank reads its shards, rank outputs are merged."""
    loader = make_loader(stream, workers, mover.device.type == "cuda")
    outputs = evaluate_batches(model, loader, mover, dtype, desc=name, features=features)
    return Outputs.merge(distributed.gather_objects(context, outputs)).metrics()


# --- what each epoch and the training leave ------------------------------------------------------


def _epoch_record(
    epoch: int,
    step: int,
    lr: float,
    stats: dict[str, Any],
    context: distributed.Context,
    val: Metrics | None,
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
    return record


def _log_epoch(record: dict[str, Any], epochs: int) -> None:
    val = ""
    if "val_loss" in record:
        val = (
            f", val loss {record['val_loss']:.4f} accuracy {record['val_accuracy']:.4f}"
            f" macro-F1 {record['val_macro_f1']:.4f}"
        )
    log.info(
        "epoch %d/%d: train loss %.4f accuracy %.4f%s (%.1f s, %.1f samples/s)%s",
        record["epoch"],
        epochs,
        record["train_loss"],
        record["train_accuracy"],
        val,
        record["seconds"],
        record["samples_per_s"],
        " *" if record["selected"] else "",
    )


def _metrics_record(metrics: Metrics, prefix: str) -> dict[str, Any]:
    return {f"{prefix}_{key}": value for key, value in metrics.to_json().items() if key != "labels"}


def _metrics_from_record(record: dict[str, Any], prefix: str) -> Metrics:
    fields = Metrics.__dataclass_fields__
    return Metrics(**{key: record[f"{prefix}_{key}"] for key in fields})


def _final_record(
    config: TrainConfig,
    shard_set: ShardSet,
    chosen: dict[str, Any],
    test: Metrics,
    validation: Metrics | None,
    epochs: int,
) -> dict[str, Any]:
    return {
        "model": config.model,
        "split": schema.TEST,
        **test.to_json(),
        "selected_epoch": chosen["epoch"],
        "selected_by": config.select,
        "step": chosen["step"],
        "epochs": epochs,
        "validation": validation.to_json() if validation is not None else None,
        "checkpoint": SELECTED_FILE,
        "shards": shard_set.location,
    }
