"""Features of frozen pretrained encoders: computed once per sample, reused every epoch.

A pretrained encoder that does not train (``train.frozen_branches``, or every branch during
``train.freeze_branches_epochs``) gives each sample the same features every epoch, so they are
computed once, from the evaluation crop and the whole text, and the loop feeds them to the head
instead of running the encoder again: on two CPU cores the difference between minutes and an
hour. The features are kept in ``train.features_dir`` (default: the training folder), one file
per branch, named by a fingerprint of the encoder's weights, its input preparation and the shard
set, so that other trainings on the same shards with the same encoder reuse them. Under
``torchrun`` each rank computes its share and every rank gets them all; stored ones are read by
rank 0 and sent to the others.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vsotools.core.config import TrainConfig
from vsotools.core.errors import VsoError
from vsotools.core.extras import first_line
from vsotools.core.files import atomic_open, json_sha256
from vsotools.training import distributed
from vsotools.training.data import ModelInput, ShardSet, split_stream
from vsotools.training.inference import autocast
from vsotools.training.loader import BatchMover, make_loader, raise_errors
from vsotools.training.models import SentimentNet

log = logging.getLogger(__name__)

INPUT_OF = {"text": "text_features", "image": "image_features"}
"""The ``SentimentNet.forward`` argument that takes each branch's features."""


class FeaturesError(VsoError):
    """Stored features lack a sample the loader gives."""


@dataclass
class FeatureStore:
    """For each branch it holds: its feature vector per sample key."""

    rows: dict[str, dict[str, int]]
    """Branch -> sample key -> row of its matrix."""
    matrices: dict[str, torch.Tensor]
    """Branch -> ``(samples, feature_dim)`` float32 features."""

    @property
    def branches(self) -> frozenset[str]:
        return frozenset(self.matrices)

    def inputs(self, keys: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The ``forward`` arguments that give the model these samples' features."""
        found = {}
        for branch, rows in self.rows.items():
            try:
                index = torch.tensor([rows[key] for key in keys])
            except KeyError as exc:
                raise FeaturesError(
                    f"the stored {branch} features have none for sample {exc.args[0]}"
                ) from None
            found[INPUT_OF[branch]] = self.matrices[branch][index].to(device, non_blocking=True)
        return found


def without_branches(model_input: ModelInput, branches: frozenset[str]) -> ModelInput:
    """What a model reads when these branches' features come from a store: not their input."""
    if "text" in branches:
        model_input = replace(model_input, text=None)
    if "image" in branches:
        model_input = replace(model_input, crop_size=None)
    return model_input


def only_branch(model_input: ModelInput, branch: str) -> ModelInput:
    """What one branch reads."""
    return without_branches(model_input, frozenset({"text", "image"} - {branch}))


def compute_features(
    model: SentimentNet,
    branches: frozenset[str],
    shard_set: ShardSet,
    model_input: ModelInput,
    config: TrainConfig,
    context: distributed.Context,
    folder: Path,
    *,
    dtype: torch.dtype | None,
    check: bool = True,
    progress: bool = False,
) -> FeatureStore:
    """The features of ``branches`` for every sample of the shard set: read from ``folder``
    when a training on the same shards with the same encoder computed them, else computed."""
    store = FeatureStore({}, {})
    for branch in sorted(branches):
        module = getattr(model, branch)
        branch_input = only_branch(model_input, branch)
        path = folder / f"features-{branch}-{_fingerprint(module, branch_input, shard_set)[:20]}.pt"
        # Rank 0 alone looks for the file (only it writes there; other machines may not see
        # it), so every rank either receives the stored features or joins in computing them.
        found = (None, None)
        if context.is_main and path.is_file():
            found = _read(path, branch, module.feature_dim, _samples(shard_set))
        keys, matrix = distributed.broadcast_object(context, found)
        if keys is None:
            keys, matrix = _compute(
                module, branch, branch_input, shard_set, config, context, dtype, check, progress
            )
            if context.is_main:
                _write(path, branch, keys, matrix)
        else:
            log.info("%s features of %s samples read from %s", branch, f"{len(keys):,}", path)
        store.rows[branch] = {key: row for row, key in enumerate(keys)}
        store.matrices[branch] = matrix
    return store


def _compute(
    module: torch.nn.Module,
    branch: str,
    branch_input: ModelInput,
    shard_set: ShardSet,
    config: TrainConfig,
    context: distributed.Context,
    dtype: torch.dtype | None,
    check: bool,
    progress: bool,
) -> tuple[list[str], torch.Tensor]:
    mover = branch_input.mover(context.device)
    keys: list[str] = []
    rows: list[torch.Tensor] = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for split in shard_set.manifest.splits:
            stream = split_stream(shard_set, split, branch_input, config, context, check=check)
            loader = make_loader(stream, config.workers, context.device.type == "cuda")
            desc = f"{branch} features, {split}"
            for batch in tqdm(raise_errors(loader), desc=desc, unit="batch", disable=not progress):
                keys += batch["keys"]
                rows.append(_branch_output(module, branch, batch, mover, dtype).float().cpu())
    module.train(was_training)
    matrix = torch.cat(rows) if rows else torch.zeros(0, module.feature_dim)
    if context.distributed:
        parts = distributed.gather_objects(context, (keys, matrix))
        keys = [key for part_keys, _ in parts for key in part_keys]
        matrix = torch.cat([part for _, part in parts])
    log.info("%s features of %s samples computed", branch, f"{len(keys):,}")
    return keys, matrix


def _branch_output(
    module: torch.nn.Module,
    branch: str,
    batch: dict[str, Any],
    mover: BatchMover,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    inputs = mover.inputs(batch, train=False)
    with autocast(mover.device, dtype):
        if branch == "text":
            return module(inputs["tokens"], inputs["lengths"])
        return module(inputs["images"])


def _fingerprint(module: torch.nn.Module, branch_input: ModelInput, shard_set: ShardSet) -> str:
    """The encoder's weights, what it reads and how, and the shards: equal fingerprints, equal
    features."""
    weights = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    prepared: dict[str, Any] = {}  # how the branch's own input is prepared, nothing else
    if branch_input.text is not None:
        prepared["max_tokens"] = branch_input.max_tokens
    if branch_input.crop_size is not None:
        prepared.update(
            crop_size=branch_input.crop_size, mean=branch_input.mean, std=branch_input.std
        )
    return json_sha256(
        {"weights": weights.hexdigest(), "input": prepared, "shards": shard_set.fingerprint}
    )


def _samples(shard_set: ShardSet) -> int:
    return sum(shard_set.samples(split) for split in shard_set.manifest.splits)


def _read(
    path: Path, branch: str, width: int, samples: int
) -> tuple[list[str] | None, torch.Tensor | None]:
    """The keys and features stored at ``path``, when they are what its name says: ``branch``'s
    features, ``width`` wide, one row for each of the ``samples`` samples of the shard set, all
    numbers. Anything else is computed again, saying why, never trusted."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        log.warning("%s is unreadable (%s): computing the features again", path, first_line(exc))
        return None, None
    why = _misfit(saved, branch, width, samples)
    if why is not None:
        log.warning("%s does not fit: %s; computing the features again", path, why)
        return None, None
    return list(saved["keys"]), saved["features"]


def _misfit(saved: Any, branch: str, width: int, samples: int) -> str | None:
    """Why ``saved`` is not the stored features of ``branch``, or None when it is."""
    if not isinstance(saved, dict) or not {"keys", "features"} <= saved.keys():
        return "it holds no keys and features"
    keys, matrix = saved["keys"], saved["features"]
    if saved.get("branch", branch) != branch:
        return f"it holds the {saved['branch']} branch's features, not the {branch} branch's"
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        return "its keys are not a list of sample keys"
    if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point() or matrix.dim() != 2:
        return "its features are not a matrix of numbers"
    if matrix.shape[1] != width:
        return f"its features are {matrix.shape[1]} wide, the {branch} branch's {width}"
    if not len(keys) == len(set(keys)) == matrix.shape[0] == samples:
        return (
            f"it holds {len(set(keys)):,} keys and {matrix.shape[0]:,} rows for the shard set's"
            f" {samples:,} samples"
        )
    if not torch.isfinite(matrix).all():
        return "its features hold NaN or infinite values"
    return None


def _write(path: Path, branch: str, keys: list[str], matrix: torch.Tensor) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save({"branch": branch, "keys": keys, "features": matrix}, fh)


def frozen_now(model: SentimentNet, config: TrainConfig, epoch: int) -> frozenset[str]:
    """The branches of ``model`` that do not train in ``epoch`` (0-based)."""
    frozen = set(config.frozen_branches)
    if epoch < config.freeze_branches_epochs:
        frozen |= {"text", "image"}
    return frozenset(frozen & model.branches().keys())


def restricted(store: FeatureStore | None, branches: frozenset[str]) -> FeatureStore | None:
    """The part of ``store`` for ``branches`` (None when there are none)."""
    if store is None or not branches:
        return None
    return FeatureStore(
        {b: store.rows[b] for b in branches}, {b: store.matrices[b] for b in branches}
    )


class FrozenFeatures:
    """The stored features of a model's frozen pretrained branches, computed when first needed
    (``of``) and kept for the rest of the training."""

    def __init__(
        self,
        pretrained: frozenset[str],
        compute: Callable[[frozenset[str]], FeatureStore],
    ) -> None:
        """``compute`` gives the features of a set of branches (``compute_features``)."""
        self.pretrained = pretrained
        self._compute = compute
        self._store: FeatureStore | None = None

    def of(self, frozen: frozenset[str]) -> FeatureStore | None:
        """The features of the branches among ``frozen`` that are pretrained (None: none)."""
        cached = frozen & self.pretrained
        if cached and (self._store is None or not cached <= self._store.branches):
            self._store = self._compute(cached)
        return restricted(self._store, cached)
