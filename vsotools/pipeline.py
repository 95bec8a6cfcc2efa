"""vsotools run: a recipe end to end, fetch -> filter -> shard -> train -> evaluate -> report.

The stages talk only through the files they leave in the work folder::

    WORK/data/            fetch's photo records and images, then filter's filtered.parquet
    WORK/shards/          the WebDataset shard set
    WORK/train-MODEL/     one training run per model (fusion, text, image)
    WORK/report.html      the results table, training curves and dataset plots

Each stage is skipped when its complete output for the same settings is already there, and
resumes when an interrupted output is, so rerunning the same command after a crash continues
where it stopped. ``[run]`` in the recipe names the models to train on the same shards, their
own training overrides, and whether the fusion model starts from the trained branches.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import Recipe, load_recipe
from vsotools.core.errors import ConfigError, VsoError

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
    """Model name -> its test metrics (``vsotools.metrics.Metrics``), from ``evaluate``."""
    report: Path | None = None
    seconds: float = 0.0


def run_recipe(
    recipe: Recipe,
    workdir: str | Path,
    *,
    credentials: Any = None,
    progress: bool = False,
    on_stage: Callable[[StageOutcome], None] | None = None,
) -> PipelineReport:
    """Run every stage of ``recipe`` in ``workdir``; see the module doc.

    ``credentials`` (``vsotools.flickr.client.Credentials``) are needed when the recipe crawls
    Flickr, not when it reads a pairs file (``fetch.pairs``). ``on_stage`` is called as each
    stage ends, for a caller that shows progress.
    """
    from vsotools.dataset.filter import filter_dataset
    from vsotools.fetch.stage import fetch
    from vsotools.report import dataset_facts, write_report
    from vsotools.shards.format import read_manifest
    from vsotools.shards.stage import write_shards
    from vsotools.training.evaluate import evaluate
    from vsotools.training.train import train

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
    model_recipes = {model: _model_recipe(recipe, model, runs) for model in runs}

    # The API's address may change between runs (a local server's port) without changing
    # what the crawl finds.
    if (data / "fetch-report.json").is_file() and _same_sections(
        data / "fetch-recipe.toml", recipe, ("anps", "fetch"), ignore=("api_url",)
    ):
        done("fetch", False, f"{data} is complete")
    else:
        report = fetch(recipe, data, credentials=credentials, progress=progress)
        done("fetch", True, f"{report.downloaded:,} images, {report.failed:,} failed")

    if (data / "filter-report.json").is_file() and _same_sections(
        data / "filter-recipe.toml", recipe, ("anps", "filter")
    ):
        done("filter", False, f"{data / 'filtered.parquet'} is up to date")
    else:
        report = filter_dataset(data, recipe, progress=progress)
        done("filter", True, f"{report.kept:,} of {report.input:,} photos kept")

    shard_report = write_shards(recipe, data, shards, progress=progress)
    samples = sum(s.samples for s in shard_report.splits.values())
    if shard_report.already_complete:
        done("shard", False, f"{shards} is complete")
    else:
        done("shard", True, f"{shard_report.written} shards, {samples:,} samples")

    for model, run_dir in runs.items():
        model_recipe = model_recipes[model]
        if (run_dir / "metrics.json").is_file():
            if not _same_sections(run_dir / "recipe.toml", model_recipe, ("train",)):
                raise PipelineError(
                    f"{run_dir} holds a finished {model} run with other training settings;"
                    " remove it or choose another work folder"
                )
            done(f"train {model}", False, f"{run_dir} is finished")
            continue
        resume = (run_dir / "last.pt").is_file()
        result = train(model_recipe, shards, run_dir, resume=resume, progress=progress)
        done(
            f"train {model}",
            True,
            f"{result.epochs} epochs, selected epoch {result.selected_epoch}",
        )

    for model, run_dir in runs.items():
        evaluation = evaluate(run_dir / "checkpoint.pt", shards, split="test", progress=progress)
        outcome.results[model] = evaluation.metrics
    done("evaluate", True, f"{len(runs)} model(s) on the test split")

    labels = read_manifest(str(shards))
    facts = dataset_facts(data, {split: labels.labels(split) for split in labels.splits})
    title = f"vsotools run: {recipe.name}"
    outcome.report = write_report(workdir / "report.html", runs, facts=facts, title=title)
    for model, run_dir in runs.items():
        write_report(
            run_dir / "report.html", {model: run_dir}, facts=facts, title=f"{title}, {model}"
        )
    done("report", True, str(outcome.report))
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


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
    """The recipe one model trains with: [train], then the model's own ``run.MODEL_set``."""
    assignments = getattr(recipe.run, f"{model}_set")
    try:
        model_recipe = recipe.override({"train.model": model}).override_strings(assignments)
    except ConfigError as exc:
        raise ConfigError(f"run.{model}_set: {exc}") from None
    if model == FUSION and recipe.run.fusion_from_branches:
        model_recipe = model_recipe.override(
            {
                "train.init_text": str(runs[TEXT] / "checkpoint.pt"),
                "train.init_image": str(runs[IMAGE] / "checkpoint.pt"),
            }
        )
    return model_recipe


def _same_sections(
    saved: Path, recipe: Recipe, sections: Sequence[str], ignore: Sequence[str] = ()
) -> bool:
    """Whether the recipe a stage saved beside its output has these sections equal to ours."""
    if not saved.is_file():
        return False
    try:
        previous = load_recipe(saved)
    except ConfigError:
        return False

    def settings(r: Recipe, section: str) -> dict[str, Any]:
        values = dataclasses.asdict(getattr(r, section))
        return {k: v for k, v in values.items() if k not in ignore}

    return all(settings(previous, s) == settings(recipe, s) for s in sections)
