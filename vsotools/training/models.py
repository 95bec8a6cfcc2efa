"""The deep fusion CNN of Chen, Wang and Liu (2017) and its two baselines, in plain torch.

- ``TextCNN`` (the ST branch): Kim's CNN over frozen word vectors; filters of several widths, and
  for each filter the max, average and minimum over the valid positions of the sentence.
- ``AlexNetFeatures`` (the SV branch): five convolutional layers with ReLU, local response
  normalisation and max pooling as in AlexNet; the last max-pool, flattened, is the feature.
  ``from_torchvision_alexnet`` reads ImageNet weights saved in torchvision's AlexNet layout into it.
- ``SentimentNet``: one or both branches, their features concatenated, three fully connected
  layers with dropout, two logits. ``build_model`` makes the ``fusion``, ``text`` or ``image``
  variant from a recipe's train section.

Inputs are tensors already on the device: token ids ``(N, L)`` padded with 0 and their lengths
``(N,)``, and normalised images ``(N, 3, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vsotools.core.config import TrainConfig
from vsotools.training import encoders


class TextCNN(nn.Module):
    """Kim's sentence CNN with max, average and min pooling over the valid positions.

    Position ``p`` of a filter of width ``w`` covers tokens ``p .. p + w - 1``; it is valid when
    all of them are real tokens (``p <= length - w``). A sentence shorter than ``w`` keeps its
    first position, so every filter has at least one. Padding never enters the average or the
    minimum (nor the maximum).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        filter_widths: list[int],
        num_filters: int,
        tune_vectors: bool = False,
    ):
        super().__init__()
        vocab_size, word_dim = embeddings.shape
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.embedding.weight.data.copy_(embeddings)
        # Static word vectors (the paper's setting) are never updated, nor synchronised by DDP.
        self.tune_vectors = tune_vectors
        self.embedding.weight.requires_grad_(tune_vectors)
        self.filter_widths = list(filter_widths)
        self.convs = nn.ModuleList(nn.Conv1d(word_dim, num_filters, w) for w in filter_widths)
        self.feature_dim = 3 * num_filters * len(filter_widths)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features ``(N, 3 x filters x widths)`` of ``tokens`` ``(N, L)`` padded with 0 to any
        length ``L`` (the result does not depend on it)."""
        shortfall = max(self.filter_widths) - tokens.shape[1]
        if shortfall > 0:
            tokens = F.pad(tokens, (0, shortfall), value=0)
        words = self.embedding(tokens).transpose(1, 2)  # (N, word_dim, L)
        features = []
        for width, conv in zip(self.filter_widths, self.convs, strict=True):
            activations = torch.relu(conv(words))  # (N, F, L - width + 1)
            features.extend(masked_max_avg_min(activations, (lengths - width + 1).clamp(min=1)))
        return torch.cat(features, dim=1)


def masked_max_avg_min(
    values: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Max, mean and min of ``values`` ``(N, C, P)`` over the first ``valid[n]`` positions."""
    positions = torch.arange(values.shape[2], device=values.device)
    mask = (positions[None, :] < valid[:, None])[:, None, :]  # (N, 1, P)
    count = mask.sum(dim=2).to(values.dtype)
    highest = values.masked_fill(~mask, float("-inf")).amax(dim=2)
    lowest = values.masked_fill(~mask, float("inf")).amin(dim=2)
    mean = values.masked_fill(~mask, 0.0).sum(dim=2) / count
    return highest, mean, lowest


class AlexNetFeatures(nn.Module):
    """AlexNet's five convolutional layers (ReLU, LRN after the first two unless ``lrn`` is off,
    three max-pools). Without LRN the layer indices stay the same (an identity takes its place),
    so checkpoints of both kinds share one state-dict layout."""

    def __init__(self, channels: list[int], crop_size: int, lrn: bool = True):
        super().__init__()
        c1, c2, c3, c4, c5 = channels

        def norm() -> nn.Module:
            if not lrn:
                return nn.Identity()
            return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)

        self.layers = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        side = alexnet_output_side(crop_size)
        self.feature_dim = c5 * side * side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.layers(images), 1)


TORCHVISION_ALEXNET_LAYERS = {0: 0, 3: 4, 6: 8, 8: 10, 10: 12}
"""Index of each convolution in torchvision's ``alexnet().features`` -> in ``AlexNetFeatures``."""


def is_torchvision_alexnet(state: object) -> bool:
    """Whether ``state`` is a state dict in torchvision's AlexNet layout (``features.0.weight``
    ... ``features.10.bias``; its ``classifier`` is not needed)."""
    return isinstance(state, dict) and all(
        f"features.{index}.{part}" in state
        for index in TORCHVISION_ALEXNET_LAYERS
        for part in ("weight", "bias")
    )


def torchvision_alexnet_channels(state: dict[str, torch.Tensor]) -> list[int]:
    """The five convolutions' output widths in a torchvision AlexNet state dict."""
    return [int(state[f"features.{index}.weight"].shape[0]) for index in TORCHVISION_ALEXNET_LAYERS]


def from_torchvision_alexnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of an ``AlexNetFeatures`` (built with ``lrn=False``) holding the
    convolutions of a torchvision AlexNet state dict: the same kernels, strides, paddings and
    pools, so the features are the same for the same input. Its fully connected layers are
    left out: the head is trained anew."""
    return {
        f"layers.{ours}.{part}": state[f"features.{theirs}.{part}"]
        for theirs, ours in TORCHVISION_ALEXNET_LAYERS.items()
        for part in ("weight", "bias")
    }


def alexnet_output_side(crop_size: int) -> int:
    """Side of the last max-pool's output for a ``crop_size`` input (6 for 224)."""
    side = (crop_size + 2 * 2 - 11) // 4 + 1
    for _ in range(3):
        side = (side - 3) // 2 + 1
    if side < 1:
        raise ValueError(f"crop size {crop_size} is too small for the AlexNet-like branch")
    return side


class SentimentNet(nn.Module):
    """The text branch, the image branch or both, then the fully connected head.

    A branch is any module with a ``feature_dim`` (the paper's networks, or the pretrained
    encoders of ``training.encoders``).
    """

    def __init__(
        self,
        text: nn.Module | None,
        image: nn.Module | None,
        fc_sizes: list[int],
        dropout: float,
        num_classes: int = 2,
        modality_dropout: float = 0.0,
    ):
        super().__init__()
        if text is None and image is None:
            raise ValueError("a model needs at least one branch")
        self.text = text
        self.image = image
        self.modality_dropout = modality_dropout
        width = (text.feature_dim if text else 0) + (image.feature_dim if image else 0)
        layers: list[nn.Module] = []
        for size in fc_sizes:
            layers += [nn.Dropout(dropout), nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        layers += [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.head = nn.Sequential(*layers)

    @property
    def uses_text(self) -> bool:
        return self.text is not None

    @property
    def uses_image(self) -> bool:
        return self.image is not None

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(N, 2)``; each branch needs its inputs, or its features computed before
        (``text_features``, ``image_features``: a frozen branch's, see ``training.features``)."""
        features = []
        if self.text is not None:
            if text_features is None:
                if tokens is None or lengths is None:
                    raise ValueError("this model reads text: pass tokens and lengths")
                text_features = self.text(tokens, lengths)
            features.append(text_features)
        if self.image is not None:
            if image_features is None:
                if images is None:
                    raise ValueError("this model reads images: pass images")
                image_features = self.image(images)
            features.append(image_features)
        if len(features) == 1:
            return self.head(features[0])
        if self.training and self.modality_dropout:
            features = drop_modalities(features[0], features[1], self.modality_dropout)
        return self.head(torch.cat(features, dim=1))

    def branches(self) -> dict[str, nn.Module]:
        """The branches this model has, by name (``text``, ``image``)."""
        return {
            name: module
            for name, module in (("text", self.text), ("image", self.image))
            if module is not None
        }


def drop_modalities(text: torch.Tensor, image: torch.Tensor, p: float) -> list[torch.Tensor]:
    """Per sample: the text features zeroed with probability ``p``, else the image features
    with probability ``p`` (``p`` at most 0.5: never both)."""
    draw = torch.rand(text.shape[0], 1, device=text.device)
    keep_text = (draw >= p).to(text.dtype)
    keep_image = ((draw < p) | (draw >= 2 * p)).to(image.dtype)
    return [text * keep_text, image * keep_image]


def build_model(
    config: TrainConfig,
    embeddings: torch.Tensor | None = None,
    *,
    text: nn.Module | None = None,
    image: nn.Module | None = None,
) -> SentimentNet:
    """The ``config.model`` variant. The paper's branches are built here (the Kim CNN needs
    ``embeddings`` ``(vocab, word_dim)``); a pretrained branch is passed in as ``text`` or
    ``image`` (``training.encoders``)."""
    if not encoders.has_branch(config, "text"):
        text = None
    elif text is None:
        if embeddings is None:
            raise ValueError(f"a {config.model} model needs word embeddings")
        text = TextCNN(embeddings, config.filter_widths, config.num_filters, config.tune_vectors)
    if not encoders.has_branch(config, "image"):
        image = None
    elif image is None:
        image = AlexNetFeatures(config.conv_channels, config.crop_size, config.lrn)
    return SentimentNet(
        text, image, config.fc_sizes, config.dropout, modality_dropout=config.modality_dropout
    )
