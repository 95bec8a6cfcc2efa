"""``vsotools run``: a recipe end to end, fetch -> filter -> shard -> train -> evaluate -> report.

The stages talk only through the files they leave in the work folder::

    WORK/data/            the dataset folder (vsotools.dataset.folder)
    WORK/shards/          the shard set (vsotools.shards.manifest)
    WORK/train-MODEL/     one training folder per model (vsotools.training.folder)
    WORK/features/        features of frozen pretrained encoders, shared by the models
    WORK/report.html      the results table, training curves and dataset plots
    WORK/run.json         written last: the results, what each output was made from (their
                          fingerprints) and the report files with their sizes

``run`` brings every output up to date, as ``make`` does: before it starts, it asks each
output's contract for its status (``core.status``: missing, unfinished, stale and why, or
current) and prints which stages it will run and why (``plan``); then it runs them. A stage
runs again exactly when something it reads changed (a pairs file edited in place, images that
``fetch --retry-failed`` brought, another setting) or a file its output lists is gone; a rerun
after a crash continues where it stopped; a run whose outputs are all current does nothing.
The shard set in the work folder is the pipeline's own and is rewritten when its input
changed. A training whose inputs changed is trained again beside the old one
(``WORK/train-MODEL.next``), which it replaces only once finished, so a killed rerun loses
nothing. ``[run]`` in the recipe names the models to train on the same shards, their own
training overrides, and whether the fusion model starts from the trained branches.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import Recipe, parse_assignments
from vsotools.core.errors import ConfigError, VsoError
from vsotools.core.files import atomic_write_json
from vsotools.core.metrics import Metrics
from vsotools.core.status import (
    CURRENT,
    FILES,
    MISSING,
    STALE,
    UNFINISHED,
    Status,
    damaged_files,
    listed_files,
)
from vsotools.training.folder import TrainingFolder, TrainingFolderError

log = logging.getLogger(__name__)

FUSION, TEXT, IMAGE = "fusion", "text", "image"
TABLE_ORDER = (TEXT, IMAGE, FUSION)
"""Rows of the results table, in the order of the paper's Table 1."""
RECORD_FILE = "run.json"
REPORT_FILE = "report.html"


class PipelineError(VsoError):
    """The work folder holds output that does not belong to this recipe."""


@dataclass
class StageOutcome:
    stage: str
    ran: bool
    detail: str


@dataclass(frozen=True)
class PlannedStage:
    """A stage of the run and the status of its output before the run starts; ``status`` is
    None where it can only be known once the stages before it have run."""

    stage: str
    status: Status | None

    @property
    def runs(self) -> bool:
        return self.status is None or not self.status.current

    def describe(self) -> str:
        if self.status is None:
            return "after the stages before it: runs if what it reads changes"
        if self.status.current:
            return "skip: complete and current"
        how = {
            MISSING: "run: not made yet",
            UNFINISHED: f"run: unfinished ({self.status.why})",
            STALE: f"run again: stale, {self.status.why}",
        }
        return how.get(self.status.state, f"run: {self.status}")

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "state": None if self.status is None else self.status.state,
            "why": None if self.status is None else self.status.why,
            "runs": self.runs,
        }


@dataclass
class PipelineReport:
    workdir: Path
    plan: list[PlannedStage] = field(default_factory=list)
    """Each stage's status before the run started, and whether it was to run."""
    stages: list[StageOutcome] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    """Model name -> its test metrics (``vsotools.core.metrics.Metrics``), from ``evaluate``."""
    report: Path | None = None
    seconds: float = 0.0
    already_complete: bool = False
    """Every output was current: nothing was run (the results are those of the last run)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "plan": [step.to_json() for step in self.plan],
            "stages": [vars(s) for s in self.stages],
            "results": {model: m.to_json() for model, m in self.results.items()},
            "report": str(self.report) if self.report else None,
            "seconds": self.seconds,
            "already_complete": self.already_complete,
        }


def default_workdir(recipe: Recipe) -> Path:
    """``runs/NAME``: where ``vsotools run`` works unless told otherwise."""
    return Path("runs") / recipe.name


class WorkFolder:
    """The files of one run's work folder, and whether the run's own record is current."""

    def __init__(self, root: str | Path, recipe: Recipe) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.shards = self.root / "shards"
        self.record = self.root / RECORD_FILE
        self.report = self.root / REPORT_FILE
        self.trainings = {model: self.root / f"train-{model}" for model in _training_order(recipe)}

    def report_files(self) -> list[str]:
        """The report pages a finished run leaves and their plots (``report-files/``),
        relative to the work folder."""
        pages = [self.report, *(run / REPORT_FILE for run in self.trainings.values())]
        names = []
        for page in pages:
            names.append(page.relative_to(self.root).as_posix())
            plots = page.with_name(f"{page.stem}-files")
            if plots.is_dir():
                names += sorted(p.relative_to(self.root).as_posix() for p in plots.iterdir())
        return names

    def made_from(self) -> dict[str, str | None]:
        """What each output was made from, as its last record holds it (read, not recomputed:
        the stages that just wrote them have checked their inputs)."""
        from vsotools.dataset.folder import DatasetFolder
        from vsotools.shards.manifest import read_manifest

        data = DatasetFolder(self.data)
        made = {
            stage: (data.read_report(stage) or {}).get("fingerprint")
            for stage in ("fetch", "filter")
        }
        made["shard"] = read_manifest(str(self.shards)).fingerprint
        for model, run in self.trainings.items():
            made[f"train {model}"] = (TrainingFolder(run).read_final() or {}).get("fingerprint")
        return made

    def read_record(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def status(self, plan: list[PlannedStage]) -> Status:
        """Current when every output is current, made from what ``run.json`` says the last run
        made them from, and the report pages it lists are there as recorded."""
        record = self.read_record()
        if record is None:
            return Status(MISSING, f"no finished run in {self.root}")
        pending = [step.stage for step in plan if step.runs]
        if pending:
            return Status(STALE, f"{', '.join(pending)} to run", record)
        if record.get("made_from") != _made_from(plan):
            return Status(STALE, "its outputs changed since the last run", record)
        problems = damaged_files(self.root, record.get(FILES))
        if problems:
            return Status(UNFINISHED, "; ".join(problems), record)
        return Status(CURRENT, "every output is complete and current", record)

    def finish(self, results: dict[str, Metrics]) -> None:
        """Record the finished run, last: its results, what its outputs were made from, and
        the report pages with their plots."""
        atomic_write_json(
            self.record,
            {
                "results": {model: m.to_json() for model, m in results.items()},
                "made_from": self.made_from(),
                FILES: listed_files(self.root, self.report_files()),
            },
        )


def _made_from(plan: list[PlannedStage]) -> dict[str, str | None]:
    """Each stage's output by the fingerprint its last record holds."""
    return {
        step.stage: _fingerprint(step.status)
        for step in plan
        if step.stage.split()[0] in OUTPUT_STAGES
    }


OUTPUT_STAGES = ("fetch", "filter", "shard", "train")


def _fingerprint(status: Status | None) -> str | None:
    """The fingerprint an output's last record holds (a report, a final record, a shard set's
    manifest or its job)."""
    if status is None or status.record is None:
        return None
    record = status.record
    return record.get("fingerprint") if isinstance(record, dict) else record.fingerprint


def plan(recipe: Recipe, work: WorkFolder) -> list[PlannedStage]:
    """Each stage of ``recipe``'s run in ``work`` with the status of its output now: a stage
    whose input comes from a stage that is to run is known only once that one has run. A
    dataset folder that fetch would refuse to continue (a pinned setting or the pairs file
    changed) is refused here, with fetch's own error, before anything is planned."""
    from vsotools.core.storage import Location
    from vsotools.dataset.folder import DatasetFolder
    from vsotools.fetch.stage import fetch_inputs, refusal
    from vsotools.shards.manifest import status as set_status
    from vsotools.shards.stage import set_build
    from vsotools.training.folder import training_inputs

    data = DatasetFolder(work.data)
    inputs = fetch_inputs(recipe, work.data)
    fetched = data.status("fetch", inputs)
    if not fetched.current and (refused := refusal(recipe, work.data, inputs["pairs"])):
        raise refused
    steps = [PlannedStage("fetch", fetched)]

    def known() -> bool:
        return not steps[-1].runs

    steps.append(
        PlannedStage(
            "filter", data.status("filter", data.filter_inputs(recipe)) if known() else None
        )
    )
    shard_status = None
    if known():
        shard_status = set_status(Location(work.shards), set_build(recipe, work.data))
    steps.append(PlannedStage("shard", shard_status))
    shards_fingerprint = None
    if shard_status is not None and shard_status.current:
        shards_fingerprint = shard_status.record.fingerprint
    trained: dict[str, bool] = {}
    for model, run in work.trainings.items():
        status = None
        depends = [TEXT, IMAGE] if model == FUSION and recipe.run.fusion_from_branches else []
        if shards_fingerprint is not None and not any(trained.get(m, True) for m in depends):
            TrainingFolder(run).settle()
            model_recipe = _model_recipe(recipe, model, work.trainings)
            status = TrainingFolder(run).status(training_inputs(model_recipe, shards_fingerprint))
        steps.append(PlannedStage(f"train {model}", status))
        trained[model] = steps[-1].runs
    return steps


def run_recipe(
    recipe: Recipe,
    workdir: str | Path,
    *,
    credentials: Any = None,
    progress: bool = False,
    on_stage: Callable[[StageOutcome], None] | None = None,
    on_plan: Callable[[list[PlannedStage]], None] | None = None,
) -> PipelineReport:
    """Bring every output of ``recipe`` in ``workdir`` up to date; see the module doc.

    ``credentials`` (``vsotools.fetch.client.Credentials``) are needed when the recipe crawls
    Flickr, not when it reads a pairs file (``fetch.pairs``). ``on_plan`` is called with the
    plan before any stage starts, ``on_stage`` as each stage ends, for a caller that shows
    progress.
    """
    from vsotools.dataset.filter import filter_dataset
    from vsotools.fetch.stage import fetch
    from vsotools.report import dataset_facts, write_report
    from vsotools.shards.manifest import read_manifest
    from vsotools.shards.stage import write_shards
    from vsotools.training.evaluate import evaluate

    started = time.monotonic()
    work = WorkFolder(workdir, recipe)
    check_requirements(recipe, work.trainings)
    outcome = PipelineReport(workdir=work.root, plan=plan(recipe, work))
    for step in outcome.plan:
        log.info("plan: %s: %s", step.stage, step.describe())
    if on_plan is not None:
        on_plan(outcome.plan)

    def done(stage: str, ran: bool, detail: str) -> None:
        outcome.stages.append(StageOutcome(stage, ran, detail))
        log.info("%s: %s", stage, detail if ran else f"skipped ({detail})")
        if on_stage is not None:
            on_stage(outcome.stages[-1])

    finished = work.status(outcome.plan)
    if finished.current:
        for step in outcome.plan:
            done(step.stage, False, "complete and current")
        outcome.results = {
            model: _metrics(saved) for model, saved in finished.record["results"].items()
        }
        outcome.report, outcome.already_complete = work.report, True
        done("report", False, f"{work.report} is current (results of the last run)")
        outcome.seconds = round(time.monotonic() - started, 1)
        return outcome

    fetched = fetch(recipe, work.data, credentials=credentials, progress=progress)
    if fetched.already_complete:
        done("fetch", False, f"{work.data} is complete and current")
    else:
        done("fetch", True, f"{fetched.downloaded:,} images, {fetched.failed:,} failed")

    filtered = filter_dataset(work.data, recipe, progress=progress)
    if filtered.already_complete:
        done("filter", False, f"{work.data / 'filtered.parquet'} is complete and current")
    else:
        done("filter", True, f"{filtered.kept:,} of {filtered.input:,} photos kept")

    # The work folder's shard set is the pipeline's own, derived from the data beside it: one
    # written from other data or settings is replaced.
    shard_report = write_shards(
        recipe, work.data, work.shards, replace_other=True, progress=progress
    )
    samples = sum(s.samples for s in shard_report.splits.values())
    if shard_report.already_complete:
        done("shard", False, f"{work.shards} is complete and current")
    else:
        done(
            "shard", True, f"{shard_report.written} shards written, {samples:,} samples in the set"
        )
    manifest = read_manifest(str(work.shards))

    for model in work.trainings:
        ran, detail = _train_model(recipe, model, work, manifest.fingerprint, progress)
        done(f"train {model}", ran, detail)

    for model, run_dir in work.trainings.items():
        checkpoint = TrainingFolder(run_dir).selected
        evaluation = evaluate(checkpoint, work.shards, split="test", progress=progress)
        outcome.results[model] = evaluation.metrics
    done("evaluate", True, f"{len(work.trainings)} model(s) on the test split")

    facts = dataset_facts(work.data, {split: manifest.labels(split) for split in manifest.splits})
    title = f"vsotools run: {recipe.name}"
    outcome.report = write_report(work.report, work.trainings, facts=facts, title=title)
    for model, run_dir in work.trainings.items():
        write_report(
            run_dir / REPORT_FILE, {model: run_dir}, facts=facts, title=f"{title}, {model}"
        )
    work.finish(outcome.results)
    done("report", True, str(outcome.report))
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _metrics(saved: dict[str, Any]) -> Metrics:
    return Metrics(**{key: saved[key] for key in Metrics.__dataclass_fields__})


def check_requirements(recipe: Recipe, runs: dict[str, Path]) -> None:
    """Refuse, before the first stage writes anything, a recipe that a later stage could not
    run: a model whose own settings (``run.MODEL_set``) are invalid, or whose pretrained encoder
    needs a package that is not installed. Found at the train stage, it would come after a
    fetch of hours and shards of gigabytes."""
    from vsotools.training import encoders

    for model in runs:
        encoders.require_packages(_model_recipe(recipe, model, runs).train)


def _train_model(
    recipe: Recipe, model: str, work: WorkFolder, shards_fingerprint: str, progress: bool
) -> tuple[bool, str]:
    """Bring ``model``'s training folder up to date: nothing when it holds this training,
    finished and current; finish or repair it when it is unfinished; train it again beside
    the old one when it is stale (or cannot be finished), replacing the old one once the new
    one has finished. Returns whether it trained, and what happened."""
    from vsotools.training.checkpoint import CheckpointError
    from vsotools.training.folder import training_inputs
    from vsotools.training.train import ResumeMismatch, train

    model_recipe = _model_recipe(recipe, model, work.trainings)
    folder = TrainingFolder(work.trainings[model])
    folder.settle()
    inputs = training_inputs(model_recipe, shards_fingerprint)
    status = folder.status(inputs)
    if status.state != STALE:  # only a stale training is replaced: a replacement left is not needed
        shutil.rmtree(folder.replacement().root, ignore_errors=True)
    if status.current:
        return False, f"{folder} is finished and current"
    if status.state in (MISSING, UNFINISHED):
        try:
            result = train(
                model_recipe, work.shards, folder.root, resume=status.state == UNFINISHED,
                progress=progress,
            )  # fmt: skip
            how = "finished" if status.state == UNFINISHED else "trained"
            return True, f"{how}: {result.epochs} epochs, selected epoch {result.selected_epoch}"
        except (ResumeMismatch, TrainingFolderError, CheckpointError) as exc:
            # An unfinished training of other settings, shards or starting checkpoints, or one
            # whose checkpoints are gone or damaged: made again, as a stale one is.
            why = str(exc)
    else:
        why = status.why
    log.warning("%s: %s; training it again beside it, replaced once finished", folder, why)
    replacement = folder.replacement()
    found = replacement.status(inputs).state
    if found != CURRENT:  # else an interrupted run finished it and stopped before the swap
        if found == STALE:
            shutil.rmtree(replacement.root, ignore_errors=True)
        try:
            train(
                model_recipe, work.shards, replacement.root, resume=found == UNFINISHED,
                progress=progress,
            )  # fmt: skip
        except (ResumeMismatch, TrainingFolderError, CheckpointError):
            # What RUN.next holds was begun from other inputs, or is damaged: start afresh.
            shutil.rmtree(replacement.root, ignore_errors=True)
            train(model_recipe, work.shards, replacement.root, progress=progress)
    folder.replace_with(replacement)
    final = folder.read_final() or {}
    return True, (
        f"trained again ({why}): {final.get('epochs')} epochs, selected epoch"
        f" {final.get('selected_epoch')}; the old training was replaced once the new one had"
        " finished"
    )


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
