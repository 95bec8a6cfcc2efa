"""What each branch of a model starts from, and which branches train.

The text branch reads with a vocabulary and word vectors (the Kim CNN's: from the checkpoint a
training resumes, from ``init_text``, or built from the training texts with word2vec) or is a
pretrained encoder with its tokenizer (MiniLM); the image branch is the AlexNet-like network
(random, or from ``init_image``: a vsotools checkpoint or torchvision's ImageNet weights) or a
pretrained encoder (EfficientNet-Lite0). ``start`` gathers them, ``build`` makes the model,
``initialise`` copies the ``init_*`` branches in; ``set_trainable`` says which branches learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vsotools.core import schema
from vsotools.core.config import TrainConfig
from vsotools.core.errors import ConfigError
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed, encoders
from vsotools.training import vocab as vocab_rules
from vsotools.training.data import ShardSet
from vsotools.training.features import frozen_now
from vsotools.training.folder import TrainingFolder
from vsotools.training.loader import KeepValidation, LoaderError, Shard, TextEncoder, read_samples
from vsotools.training.models import (
    SentimentNet,
    build_model,
    from_torchvision_alexnet,
    is_torchvision_alexnet,
    torchvision_alexnet_channels,
)
from vsotools.training.vocab import Vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Branches:
    """What a model is built from: what turns its text into token ids (a vocabulary or a
    tokenizer; None without a text branch), its pretrained encoders (None: the paper's network
    or no such branch) and the Kim CNN's word vectors."""

    reader: TextEncoder | None
    text: nn.Module | None
    image: nn.Module | None
    embeddings: torch.Tensor | None


def start(
    config: TrainConfig,
    resumed: dict[str, Any] | None,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    check: bool,
) -> Branches:
    """The branches of ``config``'s model: those of the checkpoint being ``resumed`` (its
    vocabulary, its encoders' descriptions; the weights come with the checkpoint's state), or
    new ones (the vocabulary built on rank 0 and sent to every rank, pretrained weights)."""
    reader, text, embeddings = _text_branch(config, resumed, shard_set, folder, context, check)
    return Branches(reader, text, _image_branch(config, resumed), embeddings)


def build(config: TrainConfig, branches: Branches) -> SentimentNet:
    """The model of ``config`` over ``branches`` (on the CPU; the paper's branches random)."""
    return build_model(config, branches.embeddings, text=branches.text, image=branches.image)


# --- the text branch: vocabulary and word vectors, or a pretrained encoder --------------------


def _text_branch(
    config: TrainConfig,
    resumed: dict[str, Any] | None,
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
        if resumed is not None:
            branch, tokenizer = encoders.text_from_spec(resumed["text_spec"])
        else:
            branch, tokenizer = encoders.load_text(config)
        return tokenizer, branch, None
    vocab, embeddings = _vocabulary(config, resumed, shard_set, folder, context, check)
    return vocab, None, embeddings


def _image_branch(config: TrainConfig, resumed: dict[str, Any] | None) -> nn.Module | None:
    """The pretrained image encoder if the model has one (the AlexNet-like branch is built by
    ``build_model``): its ImageNet weights, or a blank one a checkpoint's state goes into."""
    if not encoders.is_pretrained(config, "image"):
        return None
    return encoders.blank_image() if resumed is not None else encoders.load_image(config)


def _vocabulary(
    config: TrainConfig,
    resumed: dict[str, Any] | None,
    shard_set: ShardSet,
    folder: TrainingFolder,
    context: distributed.Context,
    check: bool,
) -> tuple[Vocabulary, torch.Tensor]:
    """The Kim CNN's vocabulary and embedding matrix: from the checkpoint being resumed, from
    ``init_text``, or built on rank 0 from the training texts and sent to every rank."""
    if resumed is not None:
        vocab = ckpt.vocabulary_of(resumed)
        assert vocab is not None
        return vocab, resumed["model"]["text.embedding.weight"]
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


# --- warm starts: init_text, init_image ------------------------------------------------------


def initialise(model: SentimentNet, config: TrainConfig) -> None:
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


# --- which branches train ---------------------------------------------------------------------


def frozen_throughout(model: SentimentNet, config: TrainConfig) -> frozenset[str]:
    """The branches of ``model`` that never train (``train.frozen_branches``): those frozen
    once ``train.freeze_branches_epochs`` are over."""
    return frozen_now(model, config, config.freeze_branches_epochs)


def set_trainable(model: SentimentNet, frozen: frozenset[str]) -> None:
    """Every branch trains but those ``frozen``; the Kim CNN's word vectors only when tuned."""
    for name, branch in model.branches().items():
        trainable = name not in frozen
        for parameter_name, parameter in branch.named_parameters():
            if name == "text" and parameter_name.startswith("embedding."):
                parameter.requires_grad_(trainable and model.text.tune_vectors)  # type: ignore[union-attr]
            else:
                parameter.requires_grad_(trainable)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
