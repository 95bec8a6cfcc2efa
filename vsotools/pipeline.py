"""``vsotools run``: a recipe end to end, fetch -> filter -> shard -> train -> evaluate -> report.

The stages talk only through the files they leave in the work folder::

    WORK/data/            the dataset folder (vsotools.dataset.folder)
    WORK/shards/          the shard set (vsotools.shards.format)
    WORK/train-MODEL/     one training folder per model (vsotools.training.folder)
    WORK/features/        features of frozen pretrained encoders, shared by the models
    WORK/report.html      the results table, training curves and dataset plots

Whether a stage's output is complete and current is decided one way, by the contract of that
output: a fingerprint of the inputs and settings it was made from, kept beside it. So a stage
runs again exactly when something it reads changed (a pairs file edited in place, images that
``fetch --retry-failed`` brought, another filter setting), and a rerun after a crash continues
where it stopped. The shard set in the work folder is the pipeline's own and is rewritten when
its input changed; a finished training whose inputs changed is refused, not deleted.
``[run]`` in the recipe names the models to train on the same shards, their own training
overrides, and whether the fusion model starts from the trained branches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import Recipe, parse_assignments
from vsotools.core.errors import ConfigError, VsoError
from vsotools.training.folder import TrainingFolder

log = logging.getLogger(__name__)

FUSION, TEXT, IMAGE = "fusion", "text", "image"
TABLE_ORDER = (TEXT, IMAGE, FUSION)
"""Rows of the results table, in the order of the paper's Table 1."""


class PipelineError(VsoError):
    """The work folder holds output that does not belong to this recipe."""


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    detail: str


@dataclass
class PipelineReport:
    workdir: Path
    stages: list[StageOutcome] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    """Model name -> its test metrics (``vsotools.core.metrics.Metrics``), from ``evaluate``."""
    report: Path | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "stages": [vars(s) for s in self.stages],
            "results": {model: m.to_json() for model, m in self.results.items()},
            "report": str(self.report) if self.report else None,
            "seconds": self.seconds,
        }


def default_workdir(recipe: Recipe) -> Path:
    """``runs/NAME``: where ``vsotools run`` works unless told otherwise."""
    return Path("runs") / recipe.name


def run_recipe(
    recipe: Recipe,
    workdir: str | Path,
    *,
    credentials: Any = None,
    progress: bool = False,
    on_stage: Callable[[StageOutcome], None] | None = None,
) -> PipelineReport:
    """Run every stage of ``recipe`` in ``workdir``; see the module doc.

    ``credentials`` (``vsotools.fetch.client.Credentials``) are needed when the recipe crawls
    Flickr, not when it reads a pairs file (``fetch.pairs``). ``on_stage`` is called as each
    stage ends, for a caller that shows progress.
    """
    from vsotools.dataset.filter import filter_dataset
    from vsotools.dataset.folder import DatasetFolder
    from vsotools.fetch.stage import fetch
    from vsotools.report import dataset_facts, write_report
    from vsotools.shards.format import read_manifest
    from vsotools.shards.stage import write_shards
    from vsotools.training.evaluate import evaluate

    started = time.monotonic()
    workdir = Path(workdir)
    data, shards = workdir / "data", workdir / "shards"
    outcome = PipelineReport(workdir=workdir)

    def done(stage: str, ran: bool, detail: str) -> None:
        outcome.stages.append(StageOutcome(stage, ran, detail))
        log.info("%s: %s", stage, detail if ran else f"skipped ({detail})")
        if on_stage is not None:
            on_stage(outcome.stages[-1])

    runs = {model: workdir / f"train-{model}" for model in _training_order(recipe)}
    check_requirements(recipe, runs)

    fetched = fetch(recipe, data, credentials=credentials, progress=progress)
    if fetched.already_complete:
        done("fetch", False, f"{data} is complete and current")
    else:
        done("fetch", True, f"{fetched.downloaded:,} images, {fetched.failed:,} failed")

    filtered = filter_dataset(data, recipe, progress=progress)
    if filtered.already_complete:
        done("filter", False, f"{DatasetFolder(data).filtered} is up to date")
    else:
        done("filter", True, f"{filtered.kept:,} of {filtered.input:,} photos kept")

    # The work folder's shard set is the pipeline's own, derived from the data beside it: one
    # written from other data or settings is replaced.
    shard_report = write_shards(recipe, data, shards, replace_other=True, progress=progress)
    samples = sum(s.samples for s in shard_report.splits.values())
    if shard_report.already_complete:
        done("shard", False, f"{shards} is complete and current")
    else:
        done("shard", True, f"{shard_report.written} shards, {samples:,} samples")
    manifest = read_manifest(str(shards))

    for model in runs:
        ran, detail = _train_model(recipe, model, runs, shards, manifest.fingerprint, progress)
        done(f"train {model}", ran, detail)

    for model, run_dir in runs.items():
        checkpoint = TrainingFolder(run_dir).selected
        evaluation = evaluate(checkpoint, shards, split="test", progress=progress)
        outcome.results[model] = evaluation.metrics
    done("evaluate", True, f"{len(runs)} model(s) on the test split")

    facts = dataset_facts(data, {split: manifest.labels(split) for split in manifest.splits})
    title = f"vsotools run: {recipe.name}"
    outcome.report = write_report(workdir / "report.html", runs, facts=facts, title=title)
    for model, run_dir in runs.items():
        write_report(
            run_dir / "report.html", {model: run_dir}, facts=facts, title=f"{title}, {model}"
        )
    done("report", True, str(outcome.report))
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def check_requirements(recipe: Recipe, runs: dict[str, Path]) -> None:
    """Refuse, before the first stage writes anything, a recipe that a later stage could not
    run: a model whose own settings (``run.MODEL_set``) are invalid, or whose pretrained encoder
    needs a package that is not installed. Found at the train stage, it would come after a
    fetch of hours and shards of gigabytes."""
    from vsotools.training import encoders

    for model in runs:
        encoders.require_packages(_model_recipe(recipe, model, runs).train)


def _train_model(
    recipe: Recipe,
    model: str,
    runs: dict[str, Path],
    shards: Path,
    shards_fingerprint: str,
    progress: bool,
) -> tuple[bool, str]:
    """Train ``model`` unless its training folder already holds it, finished and current;
    returns whether it trained, and what happened."""
    from vsotools.training.folder import training_fingerprint
    from vsotools.training.train import train

    model_recipe = _model_recipe(recipe, model, runs)
    folder = TrainingFolder(runs[model])
    fingerprint = training_fingerprint(model_recipe, shards_fingerprint)
    status = folder.status(model_recipe, fingerprint)
    if status == "finished":
        return False, f"{folder} is finished and current"
    if status == "stale":
        raise PipelineError(
            f"{folder} holds a finished {model} training made from other settings, shards or"
            " branches than this run's; remove that folder to train it again, or choose another"
            " work folder"
        )
    result = train(
        model_recipe, shards, folder.root, resume=status == "unfinished", progress=progress
    )
    return True, f"{result.epochs} epochs, selected epoch {result.selected_epoch}"


def results_table(results: dict[str, Any]) -> str:
    """The results as the paper's Table 1: one row per method, Prec. Rec. F1 Acc.

    Two more columns keep small or imbalanced test sets honest: macro-F1 and the accuracy of
    always answering the majority class.
    """
    names = {TEXT: "Text CNN (ST)", IMAGE: "Image CNN (SV)", FUSION: "Deep fusion CNN"}
    lines = [
        f"{'Method':<18}{'Prec.':>7}{'Rec.':>7}{'F1':>7}{'Acc.':>7}{'macroF1':>9}{'major.':>8}"
    ]
    for model in [m for m in TABLE_ORDER if m in results]:
        m = results[model]
        lines.append(
            f"{names[model]:<18}{m.precision:>7.3f}{m.recall:>7.3f}{m.f1:>7.3f}{m.accuracy:>7.3f}"
            f"{m.macro_f1:>9.3f}{m.majority_rate:>8.3f}"
        )
    n = next(iter(results.values())).n if results else 0
    lines.append(f"({n:,} test samples; major. = accuracy of always answering the majority class)")
    return "\n".join(lines)


def _training_order(recipe: Recipe) -> list[str]:
    """Models in the order they must be trained: branches before a fusion that starts from them."""
    models = list(recipe.run.models)
    if recipe.run.fusion_from_branches:
        models = [m for m in models if m != FUSION] + [FUSION]
    return models


def _model_recipe(recipe: Recipe, model: str, runs: dict[str, Path]) -> Recipe:
    """The recipe one model trains with: [train], then the model's own ``run.MODEL_set``; the
    models share one folder of frozen encoders' features (WORK/features) unless it names one.

    Everything is applied as one layer and checked once, so a model's own settings can undo what
    [train] gives every model (an ``init_text`` the image model has no branch for)."""
    try:
        values = {"train.model": model, **parse_assignments(getattr(recipe.run, f"{model}_set"))}
        if not values.get("train.features_dir", recipe.train.features_dir):
            values["train.features_dir"] = str(next(iter(runs.values())).parent / "features")
        if model == FUSION and recipe.run.fusion_from_branches:
            values["train.init_text"] = str(TrainingFolder(runs[TEXT]).selected)
            values["train.init_image"] = str(TrainingFolder(runs[IMAGE]).selected)
        return recipe.override(values)
    except ConfigError as exc:
        raise ConfigError(f"run.{model}_set: {exc}") from None
