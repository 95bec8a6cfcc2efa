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

from vsotools import __version__, anps, schema
from vsotools import filter as filtering
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
    _add_filter_command(commands)
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


def _resolve_recipe(args: argparse.Namespace, default: Path | None = None, **flags: Any) -> Recipe:
    """The recipe file (or ``default`` when it exists, or the built-in defaults), then --set,
    then the command's flags that were given.

    ``flags`` maps dotted recipe keys written with ``__`` (``filter__min_words``) to flag values;
    flags left at None are not applied.
    """
    path = args.recipe
    if path is None and default is not None and default.is_file():
        log.info("recipe: %s (the one the previous stage used)", default)
        path = default
    recipe = load_recipe(path) if path else Recipe()
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


# --- vsotools filter --------------------------------------------------------------------------


def _add_filter_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "filter",
        help="label, filter and split fetched photos by the paper's rules",
        description="Keep fetched photos whose text has min..max words (bounds inclusive),"
        " label them by their ANPs' sentiment (or the given label), drop duplicates, and split"
        " them into train and test. Writes DATA/filtered.parquet and DATA/filter-report.json.",
    )
    p.add_argument("data", type=Path, help="dataset folder written by `vsotools fetch`")
    p.add_argument("--min-words", type=int, help="fewest words kept (default 5)")
    p.add_argument("--max-words", type=int, help="most words kept (default 150)")
    p.add_argument(
        "--text-fields",
        help="comma-separated fields that make the text: title,description,tags"
        " (default: description)",
    )
    p.add_argument("--manifest", type=Path, help="ANP manifest CSV (default: the recipe's)")
    p.add_argument("--pos-threshold", type=float, metavar="P", help="ANP positive if score > P")
    p.add_argument("--neg-threshold", type=float, metavar="N", help="ANP negative if score < N")
    p.add_argument("--test-fraction", type=float, help="share of photos in test (default 0.2)")
    p.add_argument("--seed", type=int, help="seed of the split hash")
    p.add_argument(
        "--group-by",
        choices=("photo", "owner"),
        help="photo: the paper's split; owner: every photo of a user on one side",
    )
    p.add_argument(
        "--dedup-images",
        action=argparse.BooleanOptionalAction,
        help="keep one photo per identical image (default: on)",
    )
    p.add_argument(
        "--dedup-owner-text",
        action=argparse.BooleanOptionalAction,
        help="keep one photo per owner and identical text (default: on)",
    )
    p.add_argument("--workers", type=int, help="processes counting words (0: one per core)")
    _add_recipe_arguments(p)
    p.set_defaults(run=_filter)


def _filter(args: argparse.Namespace) -> int:
    text_fields = None
    if args.text_fields is not None:
        text_fields = [f.strip() for f in args.text_fields.split(",") if f.strip()]
    recipe = _resolve_recipe(
        args,
        default=args.data / "fetch-recipe.toml",
        filter__min_words=args.min_words,
        filter__max_words=args.max_words,
        filter__text_fields=text_fields,
        filter__test_fraction=args.test_fraction,
        filter__seed=args.seed,
        filter__group_by=args.group_by,
        filter__dedup_images=args.dedup_images,
        filter__dedup_owner_text=args.dedup_owner_text,
        filter__workers=args.workers,
        anps__manifest=args.manifest,
        anps__pos_threshold=args.pos_threshold,
        anps__neg_threshold=args.neg_threshold,
    )
    report = filtering.filter_dataset(args.data, recipe, progress=_progress(args))
    _print_filter_report(report, recipe)
    print(f"wrote {args.data / filtering.FILTERED_NAME} and {args.data / filtering.REPORT_NAME}")
    return 0


def _print_filter_report(report: filtering.FilterReport, recipe: Recipe) -> None:
    cfg = recipe.filter
    rules = [
        (filtering.NOT_FETCHED, "image not fetched"),
        (filtering.TOO_FEW_WORDS, f"fewer than {cfg.min_words} words"),
        (filtering.TOO_MANY_WORDS, f"more than {cfg.max_words} words"),
        (filtering.NO_LABEL, "no labelled ANP / no label"),
        (filtering.CONFLICTING, "ANPs disagree"),
        (filtering.NEUTRAL, "neutral label"),
        (filtering.DUPLICATE_IMAGE, "same image as another photo"),
        (filtering.DUPLICATE_OWNER_TEXT, "same owner and text as another"),
    ]
    left = report.input
    print(f"{'rule':<34}{'dropped':>10}{'left':>10}")
    print(f"{'photos fetched and recorded':<34}{'':>10}{_count(left):>10}")
    for key, name in rules:
        left -= report.dropped[key]
        print(f"{name:<34}{_count(report.dropped[key]):>10}{_count(left):>10}")
    print()
    labels = schema.LABEL_NAMES
    print(f"{'split':<10}" + "".join(f"{name:>10}" for name in labels) + f"{'total':>10}")
    for split in schema.SPLITS:
        counts = report.splits[split]
        row = "".join(f"{_count(counts[name]):>10}" for name in labels)
        print(f"{split:<10}{row}{_count(sum(counts.values())):>10}")
    fractions = ", ".join(
        f"{name} {report.test_fraction[name]:.3f}"
        for name in labels
        if report.test_fraction.get(name) is not None
    )
    print(f"test fraction asked {cfg.test_fraction:g}; reached: {fractions or 'n/a'}")
    print(f"group by {cfg.group_by}, seed {cfg.seed}, {report.seconds:.1f} s")
