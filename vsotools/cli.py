"""The ``vsotools`` command line: argument parsing, output and exit codes over the library.

Each command parses its arguments, resolves the recipe (file, then ``--set``, then the command's
own flags), calls one library function and prints its report. Errors the library raises as
``VsoError`` become one line on stderr and exit status 1; a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsotools import __version__, anps
from vsotools.config import Recipe, load_recipe
from vsotools.errors import VsoError

log = logging.getLogger("vsotools")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    try:
        return args.run(args) or 0
    except VsoError as exc:
        print(f"vsotools: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        # Disk full, permission denied, a folder where a file should be: the environment's
        # fault, reported as one line like the input errors above.
        print(f"vsotools: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vsotools: interrupted; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsotools",
        description="Build visual-textual sentiment datasets from Flickr and train the deep"
        " fusion CNN on them.",
    )
    parser.add_argument("--version", action="version", version=f"vsotools {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="less output (no progress bars)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_anps_commands(commands)
    _add_train_commands(commands)
    return parser


# --- shared argument helpers ------------------------------------------------------------------


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        type=Path,
        help="dataset recipe (pipelines/*.toml); default: the paper's VSO settings",
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any recipe key, e.g. --set filter.seed=7 (repeatable)",
    )


def _resolve_recipe(args: argparse.Namespace, **flags: Any) -> Recipe:
    """The recipe file (or the defaults), then --set, then the command's flags that were given.

    ``flags`` maps dotted recipe keys written with ``__`` (``filter__min_words``) to flag values;
    flags left at None are not applied.
    """
    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    recipe = recipe.override_strings(args.assignments)
    given = {key.replace("__", "."): value for key, value in flags.items() if value is not None}
    return recipe.override(given)


def _progress(args: argparse.Namespace) -> bool:
    return args.quiet == 0 and sys.stderr.isatty()


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vsotools: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)


def _count(n: int) -> str:
    return f"{n:,}"


# --- vsotools anps ----------------------------------------------------------------------------


def _add_anps_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser(
        "anps", help="import and inspect ANP manifests", description="ANP manifests."
    )
    sub = group.add_subparsers(dest="anps_command", required=True, metavar="ACTION")

    imp = sub.add_parser(
        "import",
        help="convert a VSO or MVSO release file into a manifest CSV",
        description="Convert a VSO or MVSO ANP release file into the project's manifest"
        " format (CSV with header anp,adjective,noun,sentiment).",
    )
    imp.add_argument("src", type=Path, help="the release file")
    imp.add_argument(
        "--format",
        required=True,
        choices=anps.RELEASE_FORMATS,
        help="vso: the VSO ontology text file; mvso: the headerless MVSO anp,score CSV",
    )
    imp.add_argument("--out", required=True, type=Path, help="manifest CSV to write")
    imp.set_defaults(run=_anps_import)

    stats = sub.add_parser(
        "stats",
        help="count positive, negative and dropped ANPs under the labelling rule",
        description="Count the ANPs of a manifest that the rule labels positive (score > P),"
        " negative (score < N), or drops.",
    )
    stats.add_argument("manifest", type=Path, help="manifest CSV (or a release file, see --format)")
    stats.add_argument(
        "--format",
        choices=("csv", *anps.RELEASE_FORMATS),
        default="csv",
        help="format of the file (default: csv, the project's manifest)",
    )
    stats.add_argument("--pos-threshold", type=float, metavar="P", help="default: the recipe's")
    stats.add_argument("--neg-threshold", type=float, metavar="N", help="default: the recipe's")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    _add_recipe_arguments(stats)
    stats.set_defaults(run=_anps_stats)


def _anps_import(args: argparse.Namespace) -> int:
    imported = anps.import_release(args.src, args.format, args.out)
    print(f"imported {_count(len(imported))} ANPs from {args.src} into {args.out}")
    return 0


def _anps_stats(args: argparse.Namespace) -> int:
    recipe = _resolve_recipe(
        args,
        anps__pos_threshold=args.pos_threshold,
        anps__neg_threshold=args.neg_threshold,
    )
    pos, neg = recipe.anps.pos_threshold, recipe.anps.neg_threshold
    if args.format == "csv":
        entries = anps.read_manifest(args.manifest)
    else:
        entries = anps.read_release(args.manifest, args.format)
    counts = anps.anp_stats(entries, pos, neg)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": str(args.manifest),
                    "pos_threshold": pos,
                    "neg_threshold": neg,
                    "total": counts.total,
                    "positive": counts.positive,
                    "negative": counts.negative,
                    "dropped": counts.dropped,
                }
            )
        )
        return 0
    width = len(_count(counts.total))
    print(f"{args.manifest}: {_count(counts.total)} ANPs")
    print(f"rule: positive if score > {pos:g}, negative if score < {neg:g}, else dropped")
    for name, n in (
        ("positive", counts.positive),
        ("negative", counts.negative),
        ("dropped", counts.dropped),
    ):
        print(f"  {name:<10}{_count(n):>{width}}")
    return 0


# --- vsotools train / evaluate / predict ----------------------------------------------------


def _add_train_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train the fusion model or a baseline on a shard set",
        description="Train the deep fusion CNN (or the text-only / image-only baseline) on the"
        " shards written by `vsotools shard`, streaming them. Writes RUN/checkpoint.pt,"
        " RUN/metrics.jsonl (one line per epoch) and RUN/metrics.json (the test split)."
        " Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.",
    )
    train.add_argument("--shards", required=True, help="shard set folder or URL (s3://...)")
    train.add_argument("--out", required=True, type=Path, help="run folder")
    train.add_argument("--model", choices=("fusion", "text", "image"), help="default: recipe's")
    train.add_argument("--epochs", type=int, help="default: the recipe's train.epochs")
    train.add_argument("--batch-size", type=int, help="default: the recipe's train.batch_size")
    train.add_argument("--workers", type=int, help="loader workers per process")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (with RUN/recipe.toml unless"
        " --recipe is given)",
    )
    _add_recipe_arguments(train)
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a split of a shard set",
        description="Print accuracy, precision, recall and F1 (positive class), macro-F1, the"
        " majority-class rate, ROC AUC and the confusion matrix of a checkpoint on one split.",
    )
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="RUN/checkpoint.pt")
    evaluate.add_argument("--shards", required=True, help="shard set folder or URL")
    evaluate.add_argument("--split", default="test", help="default: test")
    evaluate.add_argument("--batch-size", type=int, help="default: the run's batch size")
    evaluate.add_argument("--workers", type=int, help="default: the run's loader workers")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser(
        "predict",
        help="classify one image and/or text with a checkpoint",
        description="Print the predicted label and its probability. A text-only model needs"
        " only --text, an image-only model only --image, the fusion model both.",
    )
    predict.add_argument("--checkpoint", required=True, type=Path, help="RUN/checkpoint.pt")
    predict.add_argument("--image", type=Path, help="an image file")
    predict.add_argument("--text", help="the text (cleaned as `vsotools filter` cleans it)")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(run=_predict)


def _train(args: argparse.Namespace) -> int:
    from vsotools.metrics import TABLE_HEADER, table_row
    from vsotools.train import RECIPE_NAME, train

    saved = args.out / RECIPE_NAME
    if args.resume and args.recipe is None and saved.is_file():
        args.recipe = saved
    recipe = _resolve_recipe(
        args,
        train__model=args.model,
        train__epochs=args.epochs,
        train__batch_size=args.batch_size,
        train__workers=args.workers,
        train__device=args.device,
    )
    report = train(recipe, args.shards, args.out, resume=args.resume, progress=_progress(args))
    if report.rank != 0:
        return 0  # under torchrun, rank 0 alone prints the report
    m = report.test
    selected = f"selected epoch {report.selected_epoch} of {report.epochs}"
    print(f"{report.model}: {selected}, {_count(report.steps)} steps, {report.seconds:.1f} s")
    print(
        f"test: n={_count(m.n)} accuracy {m.accuracy:.4f} macro-F1 {m.macro_f1:.4f}"
        f" majority {m.majority_rate:.4f} AUC {_optional(m.roc_auc)}"
    )
    print(TABLE_HEADER)
    print(table_row(report.model, m))
    print(f"checkpoint: {report.checkpoint}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vsotools.evaluate import evaluate
    from vsotools.metrics import TABLE_HEADER, format_confusion, table_row

    report = evaluate(
        args.checkpoint,
        args.shards,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=_progress(args),
    )
    m = report.metrics
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": str(report.checkpoint),
                    "model": report.model,
                    "shards": report.shards,
                    "split": report.split,
                    **m.to_json(),
                }
            )
        )
        return 0
    print(f"{report.checkpoint} ({report.model}) on {report.split} of {report.shards}")
    print(f"{'n':<15}{_count(m.n)}")
    for name in ("accuracy", "precision", "recall", "f1", "macro_f1", "majority_rate"):
        print(f"{name:<15}{getattr(m, name):.4f}")
    print(f"{'roc_auc':<15}{_optional(m.roc_auc)}")
    print(f"{'loss':<15}{_optional(m.loss)}")
    print(format_confusion(m.confusion))
    print(TABLE_HEADER)
    print(table_row(report.model, m))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vsotools.evaluate import predict

    if args.image is None and args.text is None:
        raise VsoError("give --image, --text or both")
    prediction = predict(args.checkpoint, image=args.image, text=args.text, device=args.device)
    if args.json:
        print(
            json.dumps(
                {
                    "label": prediction.label,
                    "probability": prediction.probability,
                    "positive_probability": prediction.positive_probability,
                }
            )
        )
        return 0
    print(f"{prediction.label} {prediction.probability:.4f}")
    return 0


def _optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
