"""report.html: a static page of a run's results, with plots where people would rather look than read.

``write_report`` gathers what the stages left behind (each training folder's epochs and final
metrics, the filter report and filtered records of the dataset folder, the shard manifest)
into one HTML page that opens offline: the results as the paper's Table 1, per model the loss and
accuracy per epoch and the confusion matrix, and for the dataset the label balance per split, the
word-count histogram with the word bounds marked, and the photos per ANP.

Plots are PNG files drawn with matplotlib, an optional extra (``pip install 'vsotools[plots]'``),
written to a folder beside the page; without matplotlib the page has the same content as tables.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsotools.core.config import load_recipe
from vsotools.core.files import atomic_write_text
from vsotools.core.schema import LABEL_NAMES, SPLITS
from vsotools.dataset.folder import DatasetFolder
from vsotools.training.folder import TrainingFolder

log = logging.getLogger(__name__)

MODEL_TITLES = {"fusion": "Deep fusion CNN", "text": "Text CNN (ST)", "image": "Image CNN (SV)"}


@dataclass
class DatasetFacts:
    """What the report shows of the dataset; every part optional."""

    labels_per_split: dict[str, dict[str, int]] = field(default_factory=dict)
    words_histogram: dict[int, int] = field(default_factory=dict)
    word_bounds: tuple[int, int] | None = None
    photos_per_anp: dict[str, dict[str, int]] = field(default_factory=dict)
    """ANP -> label name -> kept photos."""


def dataset_facts(
    data_dir: Path | None = None, shards_labels: Mapping | None = None
) -> DatasetFacts:
    """Collect the dataset's facts from a filtered dataset folder and/or shard label counts."""
    facts = DatasetFacts()
    if shards_labels:
        facts.labels_per_split = {s: dict(c) for s, c in shards_labels.items()}
    if data_dir is None:
        return facts
    folder = DatasetFolder(data_dir)
    report = folder.read_report("filter")
    if report is not None:
        facts.labels_per_split = facts.labels_per_split or report.get("splits", {})
        facts.words_histogram = {int(k): v for k, v in report.get("words_histogram", {}).items()}
    if folder.recipe_file("filter").is_file():
        cfg = load_recipe(folder.recipe_file("filter")).filter
        facts.word_bounds = (cfg.min_words, cfg.max_words)
    filtered = folder.filtered
    if filtered.is_file():
        import pyarrow.parquet as pq

        per_anp: dict[str, Counter[str]] = {}
        parquet = pq.ParquetFile(filtered)
        for batch in parquet.iter_batches(columns=["anps", "label_name"], batch_size=50_000):
            for anps, label in zip(
                batch.column("anps").to_pylist(),
                batch.column("label_name").to_pylist(),
                strict=True,
            ):
                for anp in anps or ():  # pairs datasets have no ANPs: no such plot
                    per_anp.setdefault(anp, Counter())[label] += 1
        facts.photos_per_anp = {a: dict(c) for a, c in per_anp.items()}
    return facts


def write_report(
    out: str | Path,
    runs: Mapping[str, str | Path],
    *,
    facts: DatasetFacts | None = None,
    title: str = "vsotools run",
) -> Path:
    """Write ``out`` (an HTML file) and its plots (in ``<out stem>-files/``); returns ``out``.

    ``runs`` maps a model name (fusion, text, image) to its training run folder.
    """
    out = Path(out)
    assets = out.with_name(f"{out.stem}-files")
    assets.mkdir(parents=True, exist_ok=True)
    plot = _plotter(assets)
    order = [m for m in ("text", "image", "fusion") if m in runs] + [
        m for m in runs if m not in MODEL_TITLES
    ]
    results = {name: _read_run(Path(runs[name])) for name in order}
    facts = facts or DatasetFacts()

    body = [f"<h1>{html.escape(title)}</h1>"]
    if plot is None:
        body.append(
            "<p class=note>Plots need matplotlib: <code>pip install 'vsotools[plots]'</code>."
            " The figures are shown as tables.</p>"
        )
    body += _results_section(results)
    for name, run in results.items():
        body += _run_section(name, run, plot, out.parent)
    body += _dataset_section(facts, plot, out.parent)
    atomic_write_text(out, _page(title, "\n".join(body)))
    return out


# --- reading --------------------------------------------------------------------------------


def _read_run(path: Path) -> dict[str, Any]:
    folder = TrainingFolder(path)
    return {"path": path, "final": folder.read_final(), "epochs": folder.read_epochs()}


# --- sections -------------------------------------------------------------------------------


def _results_section(results: Mapping[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, run in results.items():
        m = run["final"]
        if m is None:
            rows.append(
                f"<tr><td>{html.escape(MODEL_TITLES.get(name, name))}</td>"
                "<td colspan=8>not finished</td></tr>"
            )
            continue
        auc = "n/a" if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}"
        rows.append(
            f"<tr><td>{html.escape(MODEL_TITLES.get(name, name))}</td>"
            + "".join(f"<td>{m[k]:.3f}</td>" for k in ("precision", "recall", "f1", "accuracy"))
            + f"<td>{m['macro_f1']:.3f}</td><td>{auc}</td><td>{m['majority_rate']:.3f}</td>"
            f"<td>{m['n']:,}</td></tr>"
        )
    return [
        "<h2>Results on the test split</h2>",
        "<p>Precision, recall and F1 of the positive class, and accuracy, as in Table 1 of Chen,"
        " Wang and Liu (2017); macro-F1, ROC AUC and the majority-class rate show whether a"
        " model does better than always answering the most frequent label.</p>",
        "<table><tr><th>Method</th><th>Prec.</th><th>Rec.</th><th>F1</th><th>Acc.</th>"
        "<th>macro-F1</th><th>AUC</th><th>majority</th><th>n</th></tr>",
        *rows,
        "</table>",
    ]


def _run_section(name: str, run: dict[str, Any], plot, root: Path) -> list[str]:
    title = MODEL_TITLES.get(name, name)
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p class=path>{html.escape(str(run['path']))}</p>"]
    # Each epoch's figures by their names in metrics.jsonl (train_loss, val_accuracy, ...).
    epochs = [record.to_json() for record in run["epochs"]]
    if epochs:
        keys = [
            f"{split}_{what}" for what in ("loss", "accuracy") for split in ("train", "val", "test")
        ]
        series = {
            key: [e.get(key) for e in epochs]
            for key in keys
            if any(e.get(key) is not None for e in epochs)
        }
        x = [e["epoch"] for e in epochs]
        image = plot and plot.curves(f"{name}-curves.png", title, x, series)
        if image:
            parts.append(_img(image, root, f"{title}: loss and accuracy per epoch"))
        else:
            header = "".join(f"<th>{html.escape(k)}</th>" for k in series)
            rows = "".join(
                f"<tr><td>{epoch}</td>"
                + "".join(f"<td>{_fmt(values[i])}</td>" for values in series.values())
                + "</tr>"
                for i, epoch in enumerate(x)
            )
            parts.append(f"<table><tr><th>epoch</th>{header}</tr>{rows}</table>")
    final = run["final"]
    if final:
        matrix = final["confusion"]
        image = plot and plot.confusion(f"{name}-confusion.png", title, matrix)
        if image:
            parts.append(_img(image, root, f"{title}: confusion matrix on the test split"))
        else:
            parts.append(_confusion_table(matrix))
        parts.append(
            f"<p>Selected epoch {final.get('selected_epoch')} (by {final.get('selected_by')}),"
            f" {final['n']:,} test samples.</p>"
        )
    return parts


def _dataset_section(facts: DatasetFacts, plot, root: Path) -> list[str]:
    parts = ["<h2>Dataset</h2>"]
    if facts.labels_per_split:
        image = plot and plot.label_balance("labels-per-split.png", facts.labels_per_split)
        if image:
            parts.append(_img(image, root, "Photos per label in each split"))
        else:
            rows = "".join(
                f"<tr><td>{s}</td>"
                + "".join(f"<td>{c.get(label, 0):,}</td>" for label in LABEL_NAMES)
                + "</tr>"
                for s, c in facts.labels_per_split.items()
            )
            head = "".join(f"<th>{label}</th>" for label in LABEL_NAMES)
            parts.append(f"<table><tr><th>split</th>{head}</tr>{rows}</table>")
    if facts.words_histogram:
        image = plot and plot.words("words-histogram.png", facts.words_histogram, facts.word_bounds)
        if image:
            parts.append(_img(image, root, "Words per description, with the kept range marked"))
        else:
            bounds = facts.word_bounds
            kept = sum(
                n
                for w, n in facts.words_histogram.items()
                if bounds and bounds[0] <= w <= bounds[1]
            )
            parts.append(
                f"<p>{sum(facts.words_histogram.values()):,} fetched photos; {kept:,} with"
                f" {bounds[0]} to {bounds[1]} words.</p>"
                if bounds
                else ""
            )
    if facts.photos_per_anp:
        image = plot and plot.per_anp("photos-per-anp.png", facts.photos_per_anp)
        if image:
            parts.append(_img(image, root, "Kept photos per ANP"))
        else:
            rows = "".join(
                f"<tr><td>{html.escape(anp)}</td>"
                + "".join(f"<td>{c.get(label, 0):,}</td>" for label in LABEL_NAMES)
                + "</tr>"
                for anp, c in sorted(
                    facts.photos_per_anp.items(), key=lambda kv: -sum(kv[1].values())
                )
            )
            head = "".join(f"<th>{label}</th>" for label in LABEL_NAMES)
            parts.append(f"<table><tr><th>ANP</th>{head}</tr>{rows}</table>")
    return parts if len(parts) > 1 else []


def _confusion_table(matrix: list[list[int]]) -> str:
    head = "".join(f"<th>predicted {label}</th>" for label in LABEL_NAMES)
    rows = "".join(
        f"<tr><th>true {label}</th>" + "".join(f"<td>{n:,}</td>" for n in row) + "</tr>"
        for label, row in zip(LABEL_NAMES, matrix, strict=True)
    )
    return f"<table class=confusion><tr><th></th>{head}</tr>{rows}</table>"


def _img(path: Path, root: Path, alt: str) -> str:
    src = path.relative_to(root).as_posix()
    return f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1rem 0; }} img {{ max-width: 100%; }}
figcaption, .path, .note {{ color: #666; font-size: .9rem; }}
</style></head>
<body>
{body}
</body></html>
"""


# --- plots ----------------------------------------------------------------------------------


def _plotter(assets: Path) -> _Plots | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: the report has tables instead of plots")
        return None
    return _Plots(assets, plt)


class _Plots:
    def __init__(self, assets: Path, plt: Any) -> None:
        self.assets = assets
        self.plt = plt

    def _save(self, fig: Any, name: str) -> Path:
        path = self.assets / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        self.plt.close(fig)
        return path

    def curves(self, name: str, title: str, x: list[int], series: dict[str, list]) -> Path:
        fig, (loss_ax, acc_ax) = self.plt.subplots(1, 2, figsize=(10, 3.6))
        for key, values in series.items():
            ax = loss_ax if key.endswith("loss") else acc_ax
            style = {"train": "-o", "val": "--s", "test": ":^"}[key.split("_")[0]]
            points = [(e, v) for e, v in zip(x, values, strict=True) if v is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=key.split("_")[0])
        for ax, what in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        return self._save(fig, name)

    def confusion(self, name: str, title: str, matrix: list[list[int]]) -> Path:
        fig, ax = self.plt.subplots(figsize=(3.8, 3.4))
        ax.imshow(matrix, cmap="Blues")
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{n:,}",
                    ha="center",
                    va="center",
                    color="white" if n > peak / 2 else "black",
                )
        ax.set_xticks(range(len(LABEL_NAMES)), LABEL_NAMES)
        ax.set_yticks(range(len(LABEL_NAMES)), LABEL_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=10)
        return self._save(fig, name)

    def label_balance(self, name: str, per_split: dict[str, dict[str, int]]) -> Path:
        fig, ax = self.plt.subplots(figsize=(5, 3.2))
        splits = [s for s in SPLITS if s in per_split] + [s for s in per_split if s not in SPLITS]
        width = 0.38
        for k, label in enumerate(LABEL_NAMES):
            values = [per_split[s].get(label, 0) for s in splits]
            bars = ax.bar(
                [i + (k - 0.5) * width for i in range(len(splits))],
                values,
                width,
                label=label,
                color=("#4a6fa5", "#e8a33d")[k],
            )
            ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        ax.set_xticks(range(len(splits)), splits)
        ax.set_ylabel("photos")
        ax.legend()
        ax.set_title("Label balance per split", fontsize=10)
        return self._save(fig, name)

    def words(self, name: str, histogram: dict[int, int], bounds: tuple[int, int] | None) -> Path:
        fig, ax = self.plt.subplots(figsize=(8, 3.2))
        words = sorted(histogram)
        ax.bar(words, [histogram[w] for w in words], width=1.0, color="#7a8fa6")
        if bounds:
            for b in bounds:
                ax.axvline(b, color="#c0392b", linestyle="--", linewidth=1)
            ax.axvspan(
                bounds[0],
                bounds[1],
                color="#c0392b",
                alpha=0.06,
                label=f"kept: {bounds[0]} to {bounds[1]} words",
            )
            ax.legend()
        ax.set_xlabel("words in the text")
        ax.set_ylabel("fetched photos")
        ax.set_xlim(-1, min(max(words) + 2, 300) if words else 10)
        ax.set_title("Word counts before the word rule", fontsize=10)
        return self._save(fig, name)

    def per_anp(self, name: str, per_anp: dict[str, dict[str, int]], top: int = 40) -> Path:
        items = sorted(per_anp.items(), key=lambda kv: -sum(kv[1].values()))[:top]
        fig, ax = self.plt.subplots(figsize=(8, max(2.5, 0.8 + 0.24 * len(items))))
        names = [a for a, _ in items][::-1]
        left = [0] * len(names)
        for k, label in enumerate(LABEL_NAMES):
            values = [per_anp[a].get(label, 0) for a in names]
            ax.barh(names, values, left=left, label=label, color=("#4a6fa5", "#e8a33d")[k])
            left = [x + v for x, v in zip(left, values, strict=True)]
        ax.set_xlabel("kept photos")
        ax.legend()
        shown = f" (top {top} of {len(per_anp)})" if len(per_anp) > top else ""
        ax.set_title(f"Photos per ANP{shown}", fontsize=10)
        return self._save(fig, name)
