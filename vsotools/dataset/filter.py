"""vsotools filter: the paper's rules turn fetched photo records into a labelled, split dataset.

The rules, in order, each counted in the report:

1. the image was fetched (``status == "ok"``);
2. the text (the description, optionally with title and tags) has ``min_words`` to ``max_words``
   words, bounds inclusive (``vsotools.core.text``);
3. the label: for crawled photos each ANP that found the photo is labelled by the manifest rule
   (``vsotools.core.anps.label_for_score``); a photo whose labelled ANPs disagree, or with no labelled
   ANP, is dropped. Pairs keep their given label; ``neutral`` is dropped (2-way task);
4. duplicates: one photo is kept of each set with the same image bytes, and of each set posted by
   one owner with the same text (bulk uploads leak between train and test);
5. the split: a photo goes to test when a hash of its group key (photo id, or owner) and the seed
   falls below the test fraction, so a photo's split never depends on the other photos.

The input is streamed in batches and the output written batch by batch, so memory stays flat
except for 16 bytes per surviving photo held for the duplicate rules. Rules 1-3 are a pure
function of one batch (``label_part``: cleaning, word counting, labels), which the engine
(``core.engine``) runs in this process, in local worker processes or as Ray tasks; the global
rules 4 and 5 stay in this process, which takes the parts' results in input order, so the
output is the same whichever engine ran them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm import tqdm

from vsotools.core import schema
from vsotools.core.anps import anp_scores, label_for_score, read_manifest
from vsotools.core.config import Recipe
from vsotools.core.engine import Task, open_engine
from vsotools.core.errors import VsoError
from vsotools.core.files import naming_errors
from vsotools.core.text import clean_text, count_words
from vsotools.dataset.folder import FILTERED_FILE, DatasetFolder, StageReport

log = logging.getLogger(__name__)

# Why a record is dropped, in rule order; the keys of the report's "dropped" table.
NOT_FETCHED = "not_fetched"
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
NO_LABEL = "no_labelled_anp"
CONFLICTING = "conflicting_anps"
NEUTRAL = "neutral_label"
DUPLICATE_IMAGE = "duplicate_image"
DUPLICATE_OWNER_TEXT = "duplicate_owner_text"
DROP_REASONS = (
    NOT_FETCHED,
    TOO_FEW_WORDS,
    TOO_MANY_WORDS,
    NO_LABEL,
    CONFLICTING,
    NEUTRAL,
    DUPLICATE_IMAGE,
    DUPLICATE_OWNER_TEXT,
)

_BATCH_ROWS = 20_000
"""Most records per part (a part is labelled in one worker: a process, or a Ray task); a photo
record file of fewer records is a part of its own."""
_PARALLEL_MIN_TEXTS = 5_000
"""Fewer records are labelled in the command's own process."""


class FilterError(VsoError):
    """The dataset cannot be filtered as asked."""


@dataclass
class FilterReport(StageReport):
    """What ``filter_dataset`` did; written as ``DATA/filter-report.json``."""

    input: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    kept: int = 0
    splits: dict[str, dict[str, int]] = field(
        default_factory=lambda: {s: dict.fromkeys(schema.LABEL_NAMES, 0) for s in schema.SPLITS}
    )
    test_fraction: dict[str, float | None] = field(default_factory=dict)
    """Asked fraction and, per label, the fraction of that label's photos that went to test."""
    unknown_anps: int = 0
    """Distinct ANPs found on photos but absent from the manifest (treated as unlabelled)."""
    words_histogram: dict[str, int] = field(default_factory=dict)
    """Words per text -> fetched photos with that many (before the word rule), for plots."""
    seconds: float = 0.0
    already_complete: bool = False
    """``filtered.parquet`` was already made from the same records and settings: nothing done."""
    repaired: list[str] = field(default_factory=list)
    """Files of a finished filter that were missing or damaged and were written again."""


# --- the rules, on single records and on plain lists ----------------------------------------


def photo_text(record: dict[str, Any], fields: Sequence[str]) -> str:
    """The cleaned text of a photo: its ``fields`` (e.g. title, description, tags) joined."""
    parts = (clean_text(record.get(name)) for name in fields)
    return " ".join(p for p in parts if p)


def anp_label(
    anps: Iterable[str], scores: dict[str, float], pos_threshold: float, neg_threshold: float
) -> tuple[int | None, str | None]:
    """The label of a crawled photo from the ANPs that found it, or why it has none.

    Returns ``(label, None)`` when every labelled ANP agrees, ``(None, NO_LABEL)`` when no ANP
    is labelled (unknown ANPs count as unlabelled), ``(None, CONFLICTING)`` when they disagree.
    """
    labels = {label_for_score(scores[a], pos_threshold, neg_threshold) for a in anps if a in scores}
    labels.discard(None)
    if not labels:
        return None, NO_LABEL
    if len(labels) > 1:
        return None, CONFLICTING
    return labels.pop(), None


def given_label(label: str | None) -> tuple[int | None, str | None]:
    """The label of a pairs record: positive/negative kept, neutral (or none) dropped."""
    if label in schema.LABEL_NAMES:
        return schema.LABEL_NAMES.index(label), None
    if label == schema.NEUTRAL:
        return None, NEUTRAL
    return None, NO_LABEL


def split_of(group_key: str, seed: int, test_fraction: float) -> str:
    """``test`` when the hash of (seed, group key) falls below ``test_fraction``, else ``train``.

    A pure function of the key: adding photos never moves a photo from one side to the other,
    and every photo of a group (an owner, with ``group_by = "owner"``) lands on the same side.
    """
    return schema.TEST if _unit_hash(group_key, seed) < test_fraction else schema.TRAIN


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _key64(text: str) -> int:
    """A 63-bit key for a duplicate rule (collisions: about 1 in 10^7 at 10^6 photos)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# --- the stage ------------------------------------------------------------------------------


def filter_dataset(data_dir: str | Path, recipe: Recipe, *, progress: bool = False) -> FilterReport:
    """Apply the recipe's rules to the photo records of ``DATA`` and write its
    ``filtered.parquet``, then ``filter-report.json`` (last) and the recipe.

    An existing output is replaced only once the new one is complete; one already made from the
    same records, manifest and settings is left as it is (``already_complete``).
    """
    folder = DatasetFolder(data_dir)
    if not folder.metadata_files():  # refused before the lock, so a wrong path stays untouched
        raise FilterError(f"{folder}: no photo records in {folder.metadata_dir}; fetch them first")
    with folder.lock():
        damaged = [
            p for p in folder.damage("fetch") if folder.part_of(p.split(" ", 1)[0]) is not None
        ]
        if damaged:
            raise FilterError(
                f"{folder}: {damaged[0]}, as fetch recorded it; run fetch on the folder again to"
                " write it again"
            )
        # The part files read and the inputs recorded are taken at one moment, under the lock.
        dataset = _open_metadata(folder)
        inputs = folder.filter_inputs(recipe)
        status = folder.status("filter", inputs)
        if status.current:
            return FilterReport.from_saved(status.record)
        if status.damaged:
            log.warning("%s: %s; filtering again", folder, status.why)
        report = _filter(folder, dataset, recipe, progress)
        report.repaired = list(status.damaged)
        folder.finish("filter", recipe, report.to_json(), inputs, [FILTERED_FILE])
    return report


def _filter(
    folder: DatasetFolder, dataset: ds.Dataset, recipe: Recipe, progress: bool
) -> FilterReport:
    started = time.monotonic()
    cfg = recipe.filter
    scores = _manifest_scores(recipe, dataset)
    report = FilterReport()
    unknown: set[str] = set()

    work = folder.root / ".filter-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        # Pass 1: rules 1-3, one part (a batch of records) at a time, in the engine's workers;
        # the survivors written in input order to a work file, keys kept for the duplicates.
        survivors = work / "labelled.parquet"
        sha_keys: list[np.ndarray] = []
        text_keys: list[np.ndarray] = []
        rows = dataset.count_rows()
        rules = _Rules.of(recipe, scores)
        tasks = (
            Task(f"batch {index}", (batch,), size=batch.num_rows)
            for index, batch in enumerate(_batches(dataset))
        )
        with (
            naming_errors(survivors),
            pq.ParquetWriter(survivors, _LABELLED_SCHEMA) as writer,
            tqdm(total=rows, unit="photo", desc="filter", disable=not progress) as bar,
            open_engine(recipe.engine) as engine,
        ):
            for _, part in engine.map(
                label_part,
                tasks,
                shared=(rules,),
                workers=_workers(cfg.workers, rows),
                progress=bar.update,
                ordered=True,
            ):
                part.add_to(report, unknown)
                if part.kept.num_rows:
                    writer.write_table(part.kept)
                    sha_keys.append(part.image_keys)
                    text_keys.append(part.owner_text_keys)

        # Rule 4: keep the first photo (in input order) of every duplicate set.
        keep = np.ones(sum(len(k) for k in sha_keys), dtype=bool)
        if cfg.dedup_images:
            report.dropped[DUPLICATE_IMAGE] = _drop_repeats(np.concatenate(sha_keys or [[]]), keep)
        if cfg.dedup_owner_text:
            report.dropped[DUPLICATE_OWNER_TEXT] = _drop_repeats(
                np.concatenate(text_keys or [[]]), keep
            )
        del sha_keys, text_keys

        # Pass 2: rule 5, written batch by batch to the final file.
        _write_split(survivors, keep, folder.filtered, cfg, report, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report.words_histogram = dict(
        sorted(report.words_histogram.items(), key=lambda item: int(item[0]))
    )
    report.kept = sum(sum(labels.values()) for labels in report.splits.values())
    report.unknown_anps = len(unknown)
    report.test_fraction = _test_fractions(report, cfg.test_fraction)
    report.seconds = round(time.monotonic() - started, 3)
    if unknown:
        log.warning(
            "%d ANPs found on photos are not in the manifest and count as unlabelled, e.g. %s",
            len(unknown),
            ", ".join(sorted(unknown)[:5]),
        )
    return report


_LABELLED_SCHEMA = pa.schema([f for f in schema.FILTERED_SCHEMA if f.name != "split"])


def _open_metadata(folder: DatasetFolder) -> ds.Dataset:
    files = [str(p) for p in folder.metadata_files()]
    try:
        dataset = ds.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise FilterError(f"{folder.metadata_dir}: cannot read the photo records ({exc})") from None
    missing = [c for c in schema.PHOTO_FILTER_FIELDS if c not in dataset.schema.names]
    if missing:
        raise FilterError(
            f"{folder.metadata_dir}: photo records lack the columns {', '.join(missing)}"
        )
    return dataset


def _batches(dataset: ds.Dataset) -> Iterator[pa.RecordBatch]:
    """The dataset's rows in batches, one file at a time: a part of the filter is one photo
    record file (``fetch.part_size`` records) or ``_BATCH_ROWS`` of a larger one.

    Arrow's dataset scanner reads files ahead of the consumer, so its memory grows with the
    input; reading each file's row groups in turn keeps it flat.
    """
    for path in dataset.files:
        yield from pq.ParquetFile(path).iter_batches(
            batch_size=_BATCH_ROWS, columns=list(schema.PHOTO_FILTER_FIELDS)
        )


def _manifest_scores(recipe: Recipe, dataset: ds.Dataset) -> dict[str, float]:
    """ANP scores from the recipe's manifest; required only when there are crawled photos."""
    if recipe.anps.manifest:
        return anp_scores(read_manifest(recipe.anps.manifest))
    crawled = dataset.count_rows(filter=ds.field("source") == schema.SOURCE_FLICKR)
    if crawled:
        raise FilterError(
            f"{crawled:,} photos were found by ANP search, and labelling them needs the ANP"
            " manifest: a recipe whose anps.manifest names one"
        )
    return {}


@dataclass(frozen=True)
class _Rules:
    """What rules 1-3 need, shipped once to every worker that labels parts."""

    text_fields: tuple[str, ...]
    min_words: int
    max_words: int
    pos_threshold: float
    neg_threshold: float
    scores: dict[str, float]

    @classmethod
    def of(cls, recipe: Recipe, scores: dict[str, float]) -> _Rules:
        cfg = recipe.filter
        return cls(
            tuple(cfg.text_fields),
            cfg.min_words,
            cfg.max_words,
            recipe.anps.pos_threshold,
            recipe.anps.neg_threshold,
            scores,
        )


@dataclass
class LabelledPart:
    """What ``label_part`` returns for the driver: the survivors of rules 1-3 in input order,
    their duplicate keys, and what each rule dropped."""

    input: int
    kept: pa.Table
    """Filtered records without the split (``_LABELLED_SCHEMA``)."""
    image_keys: np.ndarray
    owner_text_keys: np.ndarray
    dropped: dict[str, int]
    words_histogram: dict[str, int]
    unknown_anps: set[str]

    def add_to(self, report: FilterReport, unknown: set[str]) -> None:
        report.input += self.input
        for reason, n in self.dropped.items():
            report.dropped[reason] += n
        for words, n in self.words_histogram.items():
            report.words_histogram[words] = report.words_histogram.get(words, 0) + n
        unknown.update(self.unknown_anps)


def label_part(rules: _Rules, batch: pa.RecordBatch, report: object = None) -> LabelledPart:
    """Rules 1-3 on one part of the photo records (cleaning, word counting, labels): a pure
    function of the part, run by the engine in any worker (``core.engine``)."""
    rows = batch.to_pylist()
    dropped: Counter[str] = Counter()
    histogram: Counter[str] = Counter()
    unknown: set[str] = set()
    fetched = [r for r in rows if r["status"] == schema.STATUS_OK]
    dropped[NOT_FETCHED] += len(rows) - len(fetched)

    texts = [photo_text(r, rules.text_fields) for r in fetched]
    counts = _count_words(texts)
    histogram.update(str(n) for n in counts)
    kept = []
    for record, text, words in zip(fetched, texts, counts, strict=True):
        if words < rules.min_words:
            dropped[TOO_FEW_WORDS] += 1
            continue
        if words > rules.max_words:
            dropped[TOO_MANY_WORDS] += 1
            continue
        anps = list(record["anps"] or [])
        if record["source"] == schema.SOURCE_PAIRS:
            label, reason = given_label(record["label"])
        else:
            label, reason = anp_label(anps, rules.scores, rules.pos_threshold, rules.neg_threshold)
            unknown.update(a for a in anps if a not in rules.scores)
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(
            {
                "photo_id": record["photo_id"],
                "text": text,
                "words": words,
                "label": label,
                "label_name": schema.LABEL_NAMES[label],
                "anps": anps,
                "anp_scores": [rules.scores.get(a) for a in anps],
                "owner": record["owner"],
                "license": record["license"],
                "image_url": record["image_url"],
                "image_path": record["image_path"],
                "sha256": record["sha256"],
            }
        )
    return LabelledPart(
        input=len(rows),
        kept=pa.Table.from_pylist(kept, schema=_LABELLED_SCHEMA),
        image_keys=_duplicate_keys(kept, _image_key),
        owner_text_keys=_duplicate_keys(kept, _owner_text_key),
        dropped=dict(dropped),
        words_histogram=dict(histogram),
        unknown_anps=unknown,
    )


def _image_key(record: dict[str, Any]) -> int | None:
    return _key64(record["sha256"]) if record["sha256"] else None


def _owner_text_key(record: dict[str, Any]) -> int | None:
    if not record["owner"]:
        return None
    return _key64(f"{record['owner']}\x00{record['text']}")


def _duplicate_keys(records: list[dict[str, Any]], key) -> np.ndarray:
    """One int64 key per record; -1 for records a duplicate rule does not apply to."""
    return np.array([-1 if (k := key(r)) is None else k for r in records], dtype=np.int64)


def _drop_repeats(keys: np.ndarray, keep: np.ndarray) -> int:
    """Clear ``keep`` for every still-kept record whose key a kept earlier record has."""
    candidates = np.flatnonzero(keep & (keys >= 0))
    _, first = np.unique(keys[candidates], return_index=True)
    repeats = np.ones(len(candidates), dtype=bool)
    repeats[first] = False
    keep[candidates[repeats]] = False
    return int(repeats.sum())


def _write_split(
    survivors: Path,
    keep: np.ndarray,
    out: Path,
    cfg: Any,
    report: FilterReport,
    work: Path,
) -> None:
    partial = work / out.name
    offset = 0
    with naming_errors(partial), pq.ParquetWriter(partial, schema.FILTERED_SCHEMA) as writer:
        for batch in pq.ParquetFile(survivors).iter_batches(batch_size=_BATCH_ROWS):
            mask = keep[offset : offset + batch.num_rows]
            offset += batch.num_rows
            table = pa.Table.from_batches([batch]).filter(pa.array(mask))
            if not table.num_rows:
                continue
            ids = table.column("photo_id").to_pylist()
            if cfg.group_by == "owner":
                owners = table.column("owner").to_pylist()
                groups = [o or f"photo:{p}" for o, p in zip(owners, ids, strict=True)]
            else:
                groups = ids
            splits = [split_of(g, cfg.seed, cfg.test_fraction) for g in groups]
            for split, label in zip(splits, table.column("label_name").to_pylist(), strict=True):
                report.splits[split][label] += 1
            table = table.append_column(schema.FILTERED_SCHEMA.field("split"), pa.array(splits))
            writer.write_table(table.select(schema.FILTERED_SCHEMA.names))
        if offset == 0:
            writer.write_table(schema.FILTERED_SCHEMA.empty_table())
    os.replace(partial, out)


def _test_fractions(report: FilterReport, asked: float) -> dict[str, float | None]:
    fractions: dict[str, float | None] = {"asked": asked}
    for label in schema.LABEL_NAMES:
        total = sum(report.splits[s][label] for s in schema.SPLITS)
        fractions[label] = round(report.splits[schema.TEST][label] / total, 4) if total else None
    return fractions


# --- word counting ------------------------------------------------------------------------


def _count_words(texts: list[str]) -> list[int]:
    """Words of each text; identical texts (bulk uploads) are counted once per part."""
    unique = dict.fromkeys(t for t in texts if t)
    known = {text: count_words(text) for text in unique}
    return [known.get(t, 0) for t in texts]


def _workers(workers: int, rows: int) -> int:
    """Local processes for ``rows`` records: ``workers`` (0: one per core), or this process
    alone when there are too few records to pay for starting others."""
    if rows < _PARALLEL_MIN_TEXTS:
        return 1
    return workers or os.cpu_count() or 1
