"""Applying a model: mixed precision, the evaluation pass over a split, one prediction.

Shared by ``train`` (evaluation after each epoch) and ``evaluate`` / ``predict``, so the numbers a
run saves and the numbers ``vsotools evaluate`` prints come from the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vsotools.core import images as image_rules
from vsotools.core import schema
from vsotools.core.config import Recipe
from vsotools.core.errors import VsoError
from vsotools.core.metrics import Metrics, compute_metrics
from vsotools.training.data import ModelInput
from vsotools.training.loader import BatchMover, collate, raise_errors
from vsotools.training.models import SentimentNet


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where asked (``auto``: on GPU); None for full fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Outputs:
    """What an evaluation pass saw: true labels, positive-class probabilities, summed loss."""

    labels: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    loss_sum: float = 0.0

    @classmethod
    def merge(cls, parts: Iterable[Outputs]) -> Outputs:
        merged = cls()
        for part in parts:
            merged.labels += part.labels
            merged.probabilities += part.probabilities
            merged.loss_sum += part.loss_sum
        return merged

    def metrics(self) -> Metrics:
        loss = self.loss_sum / len(self.labels) if self.labels else None
        return compute_metrics(self.labels, self.probabilities, loss)


@torch.no_grad()
def evaluate_batches(
    model: SentimentNet,
    batches: Iterable[dict[str, Any]],
    mover: BatchMover,
    dtype: torch.dtype | None,
    *,
    progress: bool = False,
    desc: str = "evaluate",
    features: Any = None,
) -> Outputs:
    """Run ``model`` (in eval mode) over ``batches``; unweighted cross-entropy. ``features``
    (a ``training.features.FeatureStore``) gives the features of frozen branches."""
    model.eval()
    outputs = Outputs()
    batches = raise_errors(batches)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        inputs = mover.inputs(batch, train=False)
        if features is not None:
            inputs.update(features.inputs(batch["keys"], mover.device))
        labels = mover.labels(batch)
        with autocast(mover.device, dtype):
            logits = model(**inputs)
        logits = logits.float()
        outputs.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        outputs.labels += labels.tolist()
        outputs.probabilities += torch.softmax(logits, dim=1)[:, schema.POSITIVE].tolist()
    return outputs


@dataclass(frozen=True)
class Prediction:
    label: str
    """``negative`` or ``positive``."""
    probability: float
    """Probability of ``label``."""
    positive_probability: float

    @classmethod
    def of(cls, positive: float) -> Prediction:
        """The prediction for a positive-class probability (positive above one half)."""
        index = int(positive > 0.5)
        probability = positive if index == schema.POSITIVE else 1 - positive
        return cls(schema.LABEL_NAMES[index], probability, positive)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def predict_one(
    model: SentimentNet,
    model_input: ModelInput,
    recipe: Recipe,
    *,
    image: bytes | None,
    text: str | None,
) -> Prediction:
    """Classify one image and/or text as ``evaluate`` would after ``shard`` re-encoded it."""
    missing = [
        name
        for name, needed, given in (
            ("text", model.uses_text, text),
            ("image", model.uses_image, image),
        )
        if needed and given is None
    ]
    if missing:
        raise PredictionInputError(
            f"this {recipe.train.model} model reads {' and '.join(missing)}: it is missing"
        )
    sample = shard_sample("input", model, recipe, text=text, image=image)
    decoder = model_input.decoder(recipe.train, train=False)
    batch = collate([decoder(sample, rng=None)])  # type: ignore[arg-type]
    mover = model_input.mover(next(model.parameters()).device)
    model.eval()
    dtype = autocast_dtype(recipe.train.precision, mover.device)
    return Prediction.of(positive_probabilities(model, batch, mover, dtype)[0])


@torch.no_grad()
def positive_probabilities(
    model: SentimentNet, batch: dict[str, Any], mover: BatchMover, dtype: torch.dtype | None
) -> list[float]:
    """The positive-class probability of each sample of a collated ``batch``, in the recipe's
    precision (``model`` in eval mode): one post or a chunk of a pairs file."""
    with autocast(mover.device, dtype):
        logits = model(**mover.inputs(batch, train=False))
    return torch.softmax(logits.float(), dim=1)[:, schema.POSITIVE].tolist()


class PredictionInputError(VsoError):
    """A prediction lacks an input the model reads (its text or its image)."""


def shard_sample(
    key: str, model: SentimentNet, recipe: Recipe, *, text: str | None, image: bytes | None
) -> dict[str, Any]:
    """A sample as a shard holds it, with what ``model`` reads of ``text`` and ``image`` (the
    image re-encoded as ``shard`` stores it; ``VsoError`` where it is not a usable image)."""
    sample: dict[str, Any] = {schema.SAMPLE_KEY: key, schema.SAMPLE_CLASS: b"0"}
    if model.uses_text:
        sample[schema.SAMPLE_TEXT] = (text or "").encode("utf-8")
    if model.uses_image:
        sample[schema.SAMPLE_IMAGE] = as_shard_jpeg(image or b"", recipe)
    return sample


def as_shard_jpeg(data: bytes, recipe: Recipe) -> bytes:
    """An image file re-encoded the way ``vsotools shard`` stores it (shorter side, quality)."""
    size = recipe.shard.image_size
    image = image_rules.load_rgb(
        data, shorter_side_at_least=size, max_pixels=recipe.fetch.max_pixels
    )
    return image_rules.encode_jpeg(
        image_rules.resize_shorter_side(image, size), recipe.shard.quality
    )
