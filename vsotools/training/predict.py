"""``vsotools predict``: apply a trained model to one post, or to every pair of a pairs file.

Each input is prepared as the pipeline would have prepared it for the model: the text cleaned as
``filter`` cleans it, the image validated as ``fetch`` validates it and re-encoded as ``shard``
stores it, then decoded and cropped as evaluation does (``training.data``). ``predict_pairs``
reads a pairs file in any format ``fetch --pairs`` reads (the label column may be absent),
applies the model in batches, and writes one Parquet row per pair: its id, the predicted label
and the probability of positive, or the reason the pair could not be read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from vsotools.core.config import Recipe
from vsotools.core.errors import VsoError
from vsotools.core.files import atomic_open, check_output_file
from vsotools.core.text import clean_text
from vsotools.fetch.download import Downloader, DownloadSettings, read_local_image
from vsotools.fetch.pairs import BadRow, Pair, read_pairs_leniently
from vsotools.training import checkpoint as ckpt
from vsotools.training import distributed
from vsotools.training.data import ModelInput
from vsotools.training.inference import (
    Prediction,
    PredictionInputError,
    autocast_dtype,
    positive_probabilities,
    predict_one,
    shard_sample,
)
from vsotools.training.loader import batches, collate

log = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("positive_probability", pa.float64()),
        pa.field("error", pa.string()),
    ]
)
"""One row per pair: ``label`` and ``positive_probability``, or why there is none (``error``)."""


def predict(
    checkpoint: str | Path,
    *,
    image: str | Path | None = None,
    text: str | None = None,
    device: str = "auto",
) -> Prediction:
    """The label and its probability for one image and/or text (what the model reads)."""
    model, recipe, reader = ckpt.load_model(checkpoint)
    model.to(distributed.resolve_device(device))
    data = _read_image(Path(image), recipe) if image is not None else None
    text = clean_text(_utf8(text)) if text is not None else None
    return predict_one(model, ModelInput.of(recipe.train, reader), recipe, image=data, text=text)


def _read_image(path: Path, recipe: Recipe) -> bytes:
    """The image file checked as ``predict_pairs`` and ``fetch`` check one (the recipe's limits)."""
    outcome = read_local_image(path.parent, path.name, DownloadSettings.from_config(recipe.fetch))
    if not outcome.ok:
        raise VsoError(f"{path}: image refused: {outcome.error}: {outcome.detail}".rstrip(": "))
    return outcome.data or b""


def _utf8(text: str) -> str:
    """``text``, refused in one line when it holds what UTF-8 cannot write: the command line
    hands bytes that are not UTF-8 over as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PredictionInputError(
            f"the text is not UTF-8: character {exc.start + 1} stands for a byte that is not"
        ) from None
    return text


@dataclass
class PredictionsReport:
    """What ``predict_pairs`` did."""

    pairs: str
    out: str
    predicted: int = 0
    failed: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    """Predicted label -> pairs."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    """The first failures: line, id and reason."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FAILURES_KEPT = 20
"""Failures listed in the report (all of them are in the output file)."""


def predict_pairs(
    checkpoint: str | Path,
    pairs: str | Path,
    out: str | Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> PredictionsReport:
    """Label every pair of ``pairs`` with the checkpoint's model into the Parquet file ``out``.

    Images are local files (relative to the pairs file's folder, inside it) or URLs fetched as
    ``fetch`` fetches them (the checkpoint recipe's allowed hosts and limits). A pair whose row,
    image or text cannot be used gets its reason in the ``error`` column, not a prediction.
    """
    pairs, out = Path(pairs), Path(out)
    check_output_file(out, inputs=(checkpoint, pairs))
    model, recipe, reader = ckpt.load_model(checkpoint)
    target = distributed.resolve_device(device)
    model.to(target).eval()
    model_input = ModelInput.of(recipe.train, reader)
    decoder = model_input.decoder(recipe.train, train=False)
    mover = model_input.mover(target)
    dtype = autocast_dtype(recipe.train.precision, target)
    settings = DownloadSettings.from_config(recipe.fetch)
    report = PredictionsReport(pairs=str(pairs), out=str(out))
    size = batch_size or recipe.train.batch_size

    with (
        Downloader(settings) as downloader,
        atomic_open(out, "wb") as fh,
        pq.ParquetWriter(fh, PREDICTIONS_SCHEMA) as writer,
        tqdm(unit="pair", desc="predict", disable=not progress) as bar,
    ):
        # this generates a stream of (pair id, shard-like sample) or (pair id, reason)
        prepared = (
            _prepare(found, pairs, model, recipe, settings, downloader)
            for found in read_pairs_leniently(pairs)
        )
        for chunk in batches(prepared, size, keep_partial=True):
            rows = _predict_chunk(chunk, model, decoder, mover, dtype)
            writer.write_table(pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA))
            _count(report, rows, chunk)
            bar.update(len(rows))
    return report


def _prepare(
    found: Pair | BadRow,
    pairs: Path,
    model: Any,
    recipe: Any,
    settings: DownloadSettings,
    downloader: Downloader,
) -> tuple[str, int, dict[str, Any] | str]:
    """``(id, line, sample)`` ready for the decoder, or ``(id, line, reason)``."""
    if isinstance(found, BadRow):
        return found.id or "", found.line, found.reason
    image = None
    if model.uses_image:
        if found.is_url:
            outcome = downloader.get(found.image)
        else:
            outcome = read_local_image(pairs.parent, found.image, settings)
        if not outcome.ok:
            return found.id, found.line, f"image: {outcome.error}: {outcome.detail}".rstrip(": ")
        image = outcome.data or b""
    text = clean_text(found.text) if model.uses_text else None
    try:
        sample = shard_sample(found.id, model, recipe, text=text, image=image)
    except VsoError as exc:  # only the image is checked
        return found.id, found.line, f"image: {exc}"
    sample["__url__"] = f"{pairs}:{found.line}"
    return found.id, found.line, sample


@torch.no_grad()
def _predict_chunk(
    chunk: list[tuple[str, int, dict[str, Any] | str]],
    model: Any,
    decoder: Any,
    mover: Any,
    dtype: torch.dtype | None,
) -> list[dict[str, Any]]:
    """Output rows of one chunk, in input order: the usable samples are batched."""
    rows: list[dict[str, Any]] = []
    usable: list[tuple[int, dict[str, Any]]] = []
    for pair_id, _line, item in chunk:
        rows.append({"id": pair_id, "label": None, "positive_probability": None, "error": None})
        if isinstance(item, str):
            rows[-1]["error"] = item
            continue
        try:
            usable.append((len(rows) - 1, decoder(item, rng=None)))
        except VsoError as exc:
            rows[-1]["error"] = str(exc)
    if usable:
        batch = collate([decoded for _, decoded in usable])
        positive = positive_probabilities(model, batch, mover, dtype)
        for (row, _), p in zip(usable, positive, strict=True):
            prediction = Prediction.of(p)
            rows[row].update(label=prediction.label, positive_probability=p)
    return rows


def _count(
    report: PredictionsReport,
    rows: list[dict[str, Any]],
    chunk: list[tuple[str, int, Any]],
) -> None:
    for row, (_, line, _) in zip(rows, chunk, strict=True):
        if row["error"] is None:
            report.predicted += 1
            report.labels[row["label"]] = report.labels.get(row["label"], 0) + 1
            continue
        report.failed += 1
        if len(report.failures) < FAILURES_KEPT:
            report.failures.append({"line": line, "id": row["id"], "reason": row["error"]})
