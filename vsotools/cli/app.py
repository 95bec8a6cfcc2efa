"""The ``vsotools`` commands: each parses its arguments, calls one library function, prints.

A command resolves its recipe (``cli.recipes``: file, then ``--set``, then its flags), calls the
library, and prints the report it returns (``cli.output``: one JSON object with ``--json``).
Errors the library raises as ``VsoError`` become one line on stderr and exit status 1; a usage
error exits with 2. Stage modules with heavy imports (nltk, torch, gensim) are imported by the
commands that use them: the shard writer's worker processes start by importing this module
again (spawn), and every command would otherwise pay for all of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsotools import __version__
from vsotools.cli.output import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    add_json_option,
    count,
    emit,
    optional,
    remedy_text,
)
from vsotools.cli.recipes import Flag, add_recipe_options, add_set_option, resolve_recipe
from vsotools.core import anps, schema
from vsotools.core.errors import ConfigError, ExistingOutput, VsoError

log = logging.getLogger("vsotools")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose - args.quiet)
    try:
        return args.handler(args) or 0
    except ExistingOutput as exc:
        print(f"vsotools: error: {exc}{remedy_text(args.command, exc.remedies)}", file=sys.stderr)
        return EXIT_ERROR
    except VsoError as exc:
        print(f"vsotools: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader of our output went away (`vsotools evaluate ... | head`): nothing to say.
        # Point stdout at /dev/null so that Python's flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
    _add_settings_command(commands)
    _add_anps_commands(commands)
    _add_fetch_commands(commands)
    _add_filter_command(commands)
    _add_shard_commands(commands)
    _add_train_commands(commands)
    _add_run_commands(commands)
    return parser


def _progress(args: argparse.Namespace) -> bool:
    return args.quiet == 0 and sys.stderr.isatty()


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vsotools: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if level > 0 else logging.INFO if level == 0 else logging.WARNING)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


ENGINE_FLAGS = (Flag("engine.kind", "--engine"), Flag("engine.ray_address"))
"""Where fetch, filter, shard and run run their parts: this machine or a Ray cluster."""


# --- vsotools settings ------------------------------------------------------------------------


def _add_settings_command(commands: argparse._SubParsersAction) -> None:
    from vsotools.core.config import section_names

    settings = commands.add_parser(
        "settings",
        help="list the recipe settings: key, built-in default (or a recipe's value), meaning",
        description="List every setting of a recipe section (or of all of them) with its"
        " built-in default, or with the value a recipe gives it (--recipe). --markdown prints"
        " the tables the documentation holds.",
    )
    settings.add_argument("section", nargs="?", choices=section_names(), help="default: all")
    settings.add_argument("--recipe", type=Path, help="show this recipe's values")
    settings.add_argument("--markdown", action="store_true", help="print Markdown tables")
    add_json_option(settings)
    settings.set_defaults(handler=_settings)


def _settings(args: argparse.Namespace) -> int:
    from vsotools.core.config import load_recipe, section_names

    recipe = load_recipe(args.recipe) if args.recipe else None
    sections = [args.section] if args.section else section_names()
    tables = {section: settings_rows(section, recipe) for section in sections}

    def text() -> None:
        for section, rows in tables.items():
            if args.markdown:
                if len(tables) > 1:  # one table per section, each under its name
                    print(f"### [{section}]\n")
                print(settings_markdown(rows, "value" if recipe else "default"))
                if len(tables) > 1:
                    print()
                continue
            print(f"[{section}]")
            for row in rows:
                print(f"  {row['key']} = {row['value']}")
                print(f"      {row['help']}")

    emit(args, tables, text)
    return 0


def settings_rows(section: str, recipe: Any = None) -> list[dict[str, str]]:
    """A section's settings as rows of key, value (``recipe``'s, else the default) and help."""
    from vsotools.core.config import describe_section, format_value

    rows = []
    for info in describe_section(section):
        key = info.dotted.partition(".")[2]
        value = getattr(getattr(recipe, section), key) if recipe else info.default
        rows.append({"key": key, "value": format_value(value), "help": info.help})
    return rows


def settings_markdown(rows: list[dict[str, str]], column: str = "default") -> str:
    """A section's settings as the Markdown table the docs pages hold (``column`` names the
    values: ``default``, or ``value`` for a recipe's)."""
    lines = [f"| setting | {column} | meaning |", "| --- | --- | --- |"]
    for row in rows:
        value, meaning = row["value"].replace("|", r"\|"), row["help"].replace("|", r"\|")
        lines.append(f"| `{row['key']}` | `{value}` | {meaning} |")
    return "\n".join(lines)


# --- vsotools anps ----------------------------------------------------------------------------

THRESHOLD_FLAGS = (Flag("anps.pos_threshold"), Flag("anps.neg_threshold"))


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
    imp.set_defaults(handler=_anps_import)

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
    add_json_option(stats)
    add_recipe_options(stats, THRESHOLD_FLAGS)
    stats.set_defaults(handler=_anps_stats)


def _anps_import(args: argparse.Namespace) -> int:
    imported = anps.import_release(args.src, args.format, args.out)
    print(f"imported {count(len(imported))} ANPs from {args.src} into {args.out}")
    return 0


def _anps_stats(args: argparse.Namespace) -> int:
    recipe = resolve_recipe(args)
    pos, neg = recipe.anps.pos_threshold, recipe.anps.neg_threshold
    if args.format == "csv":
        entries = anps.read_manifest(args.manifest)
    else:
        entries = anps.read_release(args.manifest, args.format)
    counts = anps.anp_stats(entries, pos, neg)

    def text() -> None:
        width = len(count(counts.total))
        print(f"{args.manifest}: {count(counts.total)} ANPs")
        print(f"rule: positive if score > {pos:g}, negative if score < {neg:g}, else dropped")
        for name in ("positive", "negative", "dropped"):
            print(f"  {name:<10}{count(getattr(counts, name)):>{width}}")

    data = {"manifest": args.manifest, "pos_threshold": pos, "neg_threshold": neg}
    data |= {name: getattr(counts, name) for name in ("total", "positive", "negative", "dropped")}
    emit(args, data, text)
    return 0


# --- vsotools fetch, vsotools flickr-server -----------------------------------------------------

FETCH_FLAGS = (
    Flag("fetch.pairs"),
    Flag("anps.manifest", "--manifest"),
    Flag("fetch.api_url"),
    Flag("fetch.search_mode"),
    Flag("fetch.all_anps"),
    Flag("fetch.per_anp"),
    Flag("fetch.licenses"),
    Flag("fetch.calls_per_hour"),
    Flag("fetch.download_concurrency", "--concurrency"),
    Flag("fetch.max_side"),
    Flag("fetch.image_store"),
    *ENGINE_FLAGS,
)


def _add_fetch_commands(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="crawl Flickr for the recipe's ANPs (or ingest a pairs file) and download the images",
        description="Search Flickr for each ANP of the manifest that the labelling rule labels,"
        " record every photo found and download its image; or, with --pairs, ingest an"
        " image+text pairs file. Writes DATA/metadata/*.parquet, DATA/images/, the resolved"
        " recipe and DATA/fetch-report.json. Kill it at any moment and rerun the same command"
        " to continue; once finished, a rerun with the same inputs does nothing. The API key"
        " comes from FLICKR_API_KEY and FLICKR_API_SECRET, or --credentials.",
    )
    fetch.add_argument("--out", required=True, type=Path, metavar="DATA", help="dataset folder")
    fetch.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="file of FLICKR_API_KEY=... and FLICKR_API_SECRET=... lines (default: the environment)",
    )
    fetch.add_argument(
        "--retry-failed", action="store_true", help="fetch again the photos whose image failed"
    )
    add_json_option(fetch)
    add_recipe_options(fetch, FETCH_FLAGS)
    fetch.set_defaults(handler=_fetch)

    server = commands.add_parser(
        "flickr-server",
        help="serve a local Flickr-compatible API and image host over a corpus folder",
        description="Serve DIR/photos.jsonl like Flickr: /services/rest/ (flickr.photos.search,"
        " flickr.photos.getInfo; JSON and XML) and the images at the url_* addresses it hands"
        " out. Prints its base URL on the first line, then serves until interrupted. Fault flags"
        " make it fail a fraction of requests.",
    )
    server.add_argument("--corpus", required=True, type=Path, metavar="DIR")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=0, help="0: any free port (default)")
    server.add_argument(
        "--invalid-key",
        metavar="KEY",
        help="the one API key refused with error 100 (default: invalid-key); any other"
        " non-empty key is accepted",
    )
    server.add_argument("--fail-500", type=_fraction, default=0.0, metavar="F")
    server.add_argument("--fail-429", type=_fraction, default=0.0, metavar="F")
    server.add_argument(
        "--drop", type=_fraction, default=0.0, metavar="F", help="close without answering"
    )
    server.add_argument(
        "--unavailable",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="API calls answered with the transient codes 201/105/10",
    )
    server.add_argument(
        "--truncated", type=_fraction, default=0.0, metavar="F", help="photos served cut short"
    )
    server.add_argument(
        "--not-image", type=_fraction, default=0.0, metavar="F", help="photos served as HTML"
    )
    server.add_argument("--latency", type=float, default=0.0, metavar="SECONDS")
    server.add_argument("--seed", type=int, default=0, help="seeds the choice of faults")
    server.add_argument(
        "--request-log", type=Path, metavar="FILE", help="append each request as a JSON line"
    )
    server.set_defaults(handler=_flickr_server)


def _fetch(args: argparse.Namespace) -> int:
    from vsotools.dataset.folder import DatasetFolder
    from vsotools.fetch.client import load_credentials
    from vsotools.fetch.stage import fetch

    folder = DatasetFolder(args.out)
    recipe = resolve_recipe(args, default=folder.recipe_file("fetch"))
    credentials = None if recipe.fetch.pairs else load_credentials(args.credentials)
    report = fetch(
        recipe,
        args.out,
        credentials=credentials,
        retry_failed=args.retry_failed,
        progress=_progress(args),
    )

    def text() -> None:
        if report.already_complete:
            print(f"{args.out} already holds this fetch, finished and complete; nothing to do")
        _print_repaired(report.repaired, "fetched again")
        if report.source == schema.SOURCE_PAIRS:
            print(f"{args.out}: {count(report.photos)} pairs read")
        else:
            print(
                f"{args.out}: {count(report.searches)} of {count(report.anps)} ANPs searched"
                f" ({count(report.pages)} result pages), {count(report.photos)} photos found"
            )
        print(f"  downloaded {count(report.downloaded)}")
        print(f"  failed     {count(report.failed)}")
        for reason, n in report.failed_by_reason.items():
            print(f"    {reason:<20}{count(n)}")
        print(f"report: {folder.report_file('fetch')}")

    emit(args, report.to_output(), text)
    return 0


def _flickr_server(args: argparse.Namespace) -> int:
    from vsotools.demo import server

    try:
        faults = server.Faults(
            error_500=args.fail_500,
            error_429=args.fail_429,
            drop=args.drop,
            unavailable=args.unavailable,
            truncated=args.truncated,
            not_image=args.not_image,
            latency=args.latency,
            seed=args.seed,
        )
    except ValueError as exc:
        raise VsoError(f"flickr-server: {exc}") from None
    httpd = server.make_server(
        args.corpus,
        args.host,
        args.port,
        faults=faults,
        invalid_key=args.invalid_key or server.DEFAULT_INVALID_KEY,
        request_log=args.request_log,
    )
    print(httpd.base_url, flush=True)
    print(f"REST endpoint: {httpd.api_url}", flush=True)
    print(f"serving {count(len(httpd.corpus.by_id))} photos from {args.corpus}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


# --- vsotools filter --------------------------------------------------------------------------

FILTER_FLAGS = (
    Flag("filter.min_words"),
    Flag("filter.max_words"),
    Flag("filter.text_fields"),
    Flag("anps.manifest", "--manifest"),
    *THRESHOLD_FLAGS,
    Flag("filter.test_fraction"),
    Flag("filter.seed"),
    Flag("filter.group_by"),
    Flag("filter.dedup_images"),
    Flag("filter.dedup_owner_text"),
    Flag("filter.workers"),
    *ENGINE_FLAGS,
)


def _add_filter_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "filter",
        help="label, filter and split fetched photos by the paper's rules",
        description="Keep fetched photos whose text has min..max words (bounds inclusive),"
        " label them by their ANPs' sentiment (or the given label), drop duplicates, and split"
        " them into train and test. Writes DATA/filtered.parquet and DATA/filter-report.json;"
        " a rerun with the same photo records and settings does nothing.",
    )
    p.add_argument("data", type=Path, help="dataset folder written by `vsotools fetch`")
    add_json_option(p)
    add_recipe_options(p, FILTER_FLAGS)
    p.set_defaults(handler=_filter)


def _filter(args: argparse.Namespace) -> int:
    from vsotools.dataset import filter as filtering
    from vsotools.dataset.folder import DatasetFolder

    folder = DatasetFolder(args.data)
    recipe = resolve_recipe(args, default=folder.recipe_file("fetch"))
    report = filtering.filter_dataset(args.data, recipe, progress=_progress(args))

    def text() -> None:
        _print_repaired(report.repaired, "filtered again")
        _print_filter_report(report, recipe)
        if report.already_complete:
            print(
                f"{folder.filtered} is up to date with these photo records and settings, and"
                " complete; nothing written"
            )
        else:
            print(f"wrote {folder.filtered} and {folder.report_file('filter')}")

    emit(args, report.to_output(), text)
    return 0


def _print_repaired(names: Sequence[str], how: str) -> None:
    """What a stage found missing or damaged in its finished output, and wrote again."""
    if names:
        more = f" and {count(len(names) - 5)} more" if len(names) > 5 else ""
        print(f"missing or damaged: {', '.join(names[:5])}{more}; {how}")


def _print_filter_report(report: Any, recipe: Any) -> None:
    from vsotools.dataset import filter as filtering

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
    print(f"{'photos fetched and recorded':<34}{'':>10}{count(left):>10}")
    for key, name in rules:
        left -= report.dropped[key]
        print(f"{name:<34}{count(report.dropped[key]):>10}{count(left):>10}")
    print()
    labels = schema.LABEL_NAMES
    print(f"{'split':<10}" + "".join(f"{name:>10}" for name in labels) + f"{'total':>10}")
    for split in schema.SPLITS:
        counts = report.splits[split]
        row = "".join(f"{count(counts[name]):>10}" for name in labels)
        print(f"{split:<10}{row}{count(sum(counts.values())):>10}")
    fractions = ", ".join(
        f"{name} {report.test_fraction[name]:.3f}"
        for name in labels
        if report.test_fraction.get(name) is not None
    )
    print(f"test fraction asked {cfg.test_fraction:g}; reached: {fractions or 'n/a'}")
    print(f"group by {cfg.group_by}, seed {cfg.seed}, {report.seconds:.1f} s")


# --- vsotools shard, vsotools verify ----------------------------------------------------------

SHARD_FLAGS = (
    Flag("shard.image_size"),
    Flag("shard.quality"),
    Flag("shard.maxcount"),
    Flag("shard.maxsize"),
    Flag("shard.seed"),
    Flag("shard.readers"),
    Flag("shard.max_skipped"),
    Flag("shard.workers"),
    *ENGINE_FLAGS,
)


def _add_shard_commands(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard",
        help="write the filtered dataset as WebDataset tar shards",
        description="Write DATA/filtered.parquet and its images as WebDataset tar shards,"
        " SHARDS/{train,test}-NNNNNN.tar, with SHARDS/manifest.json written last. Rerun the"
        " same command to finish an interrupted run. Without --recipe it follows the recipe"
        " DATA was filtered with.",
    )
    shard.add_argument("data", type=Path, help="dataset folder with filtered.parquet and images")
    shard.add_argument(
        "--out",
        required=True,
        metavar="SHARDS",
        help="output folder, or an fsspec URL such as s3://bucket/prefix",
    )
    shard.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a shard set already at SHARDS (otherwise a complete set of the same input"
        " and settings is kept, an unfinished one is finished, another one is refused)",
    )
    add_json_option(shard)
    add_recipe_options(shard, SHARD_FLAGS)
    shard.set_defaults(handler=_shard)

    check = commands.add_parser(
        "verify",
        help="re-read a shard set and check it against its manifest",
        description="Read every shard of a set back: checksums, sample and label counts, every"
        " image decoded, keys unique and train/test disjoint. Exits 1 on any problem.",
    )
    check.add_argument("shards", metavar="SHARDS", help="shard set folder or fsspec URL")
    check.add_argument(
        "--workers",
        type=_positive,
        default=2,
        metavar="N",
        help="processes reading shards (default 2)",
    )
    add_json_option(check)
    check.set_defaults(handler=_verify)


def _shard(args: argparse.Namespace) -> int:
    from vsotools.dataset.folder import DatasetFolder
    from vsotools.shards.stage import write_shards

    recipe = resolve_recipe(args, default=DatasetFolder(args.data).recipe_file("filter"))
    report = write_shards(
        recipe, args.data, args.out, overwrite=args.overwrite, progress=_progress(args)
    )

    def text() -> None:
        total = sum(s.shards for s in report.splits.values())
        _print_repaired(report.repaired, "written again")
        if report.already_complete:
            print(
                f"{report.location} already holds this shard set, complete; nothing written"
                " (--overwrite writes it again)"
            )
        elif report.reused:
            print(
                f"wrote {_shards(report.written)} to {report.location}, kept"
                f" {count(report.reused)} from an earlier run ({count(total)} in the set)"
            )
        else:
            print(f"wrote {_shards(report.written)} to {report.location}")
        for split, summary in report.splits.items():
            labels = ", ".join(f"{count(n)} {name}" for name, n in sorted(summary.labels.items()))
            print(
                f"  {split:<6}{summary.shards:>6} shards {count(summary.samples):>10} samples"
                f" ({labels})"
            )
        if report.skipped:
            print(
                f"left out {count(len(report.skipped))} photos (listed under"
                ' "skipped" in the manifest):'
            )
            for entry in report.skipped[:10]:
                print(f"  {entry['photo_id']}: {entry['reason']}: {entry['detail']}")
            if len(report.skipped) > 10:
                print(f"  ... and {count(len(report.skipped) - 10)} more")

    emit(args, report.to_json(), text)
    return 0


def _shards(n: int) -> str:
    return f"{count(n)} shard{'' if n == 1 else 's'}"


def _verify(args: argparse.Namespace) -> int:
    from vsotools.shards.verify import verify_shards

    report = verify_shards(args.shards, workers=args.workers, progress=_progress(args))

    def text() -> None:
        for problem in report.problems:
            print(problem)
        if report.ok:
            print(
                f"OK: {report.shards} shards, {count(report.samples)} samples at {report.location}"
            )
        else:
            print(
                f"{count(len(report.problems))} problems in {report.location}"
                f" ({report.shards} shards, {count(report.samples)} samples)",
            )

    emit(args, report.to_json(), text)
    return 0 if report.ok else EXIT_ERROR


# --- vsotools train / evaluate / predict ----------------------------------------------------

TRAIN_FLAGS = (
    Flag("train.model"),
    Flag("train.epochs"),
    Flag("train.batch_size"),
    Flag("train.workers"),
    Flag("train.device"),
)


def _add_train_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train the fusion model or a baseline on a shard set",
        description="Train the deep fusion CNN (or the text-only / image-only baseline) on the"
        " shards written by `vsotools shard`, streaming them. Writes RUN/checkpoint.pt,"
        " RUN/metrics.jsonl (one line per epoch: training and validation) and RUN/metrics.json"
        " (the selected model, scored once on the test split). Under `torchrun"
        " --nproc_per_node N` it trains with DistributedDataParallel. Without --recipe it"
        " follows the recipe SHARDS was written with (its manifest holds it).",
    )
    train.add_argument("--shards", required=True, help="shard set folder or URL (s3://...)")
    train.add_argument("--out", required=True, type=Path, metavar="RUN", help="training folder")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the training in --out from its last checkpoint (with RUN/recipe.toml"
        " unless --recipe is given)",
    )
    _add_no_check_option(train)
    add_json_option(train)
    add_recipe_options(train, TRAIN_FLAGS)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a split of a shard set",
        description="Print accuracy, precision, recall and F1 (positive class), macro-F1, the"
        " majority-class rate, ROC AUC and the confusion matrix of a checkpoint on one split.",
    )
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="RUN/checkpoint.pt")
    evaluate.add_argument("--shards", required=True, help="shard set folder or URL")
    evaluate.add_argument("--split", default="test", help="default: test")
    evaluate.add_argument("--batch-size", type=_positive, help="default: the run's batch size")
    evaluate.add_argument("--workers", type=int, help="default: the run's loader workers")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_no_check_option(evaluate)
    add_json_option(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser(
        "predict",
        help="classify one post, or every pair of a pairs file, with a checkpoint",
        description="With --image and/or --text: print the predicted label and its probability"
        " (a text-only model needs only --text, an image-only model only --image, the fusion"
        " model both). With --pairs FILE --out PRED: label every pair of a pairs file (JSONL,"
        " CSV or Parquet with id, text, image; a label column is not needed) in batches and"
        " write PRED, a Parquet file with one row per pair: id, label, positive_probability,"
        " and error for a pair that could not be read.",
    )
    predict.add_argument("--checkpoint", required=True, type=Path, help="RUN/checkpoint.pt")
    predict.add_argument("--image", type=Path, help="an image file")
    predict.add_argument("--text", help="the text (cleaned as `vsotools filter` cleans it)")
    predict.add_argument("--pairs", type=Path, metavar="FILE", help="a pairs file to label")
    predict.add_argument(
        "--out", type=Path, metavar="PRED", help="the Parquet file to write (with --pairs)"
    )
    predict.add_argument(
        "--batch-size", type=_positive, help="with --pairs; default: the run's batch size"
    )
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_json_option(predict)
    predict.set_defaults(handler=_predict)


def _add_no_check_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="do not compare what each shard gives with its manifest entry (sample and label"
        " counts); for a shard set you changed on purpose",
    )


def _train(args: argparse.Namespace) -> int:
    from vsotools.core.metrics import TABLE_HEADER, table_row
    from vsotools.training.folder import TrainingFolder
    from vsotools.training.train import train

    folder = TrainingFolder(args.out)
    recipe = resolve_recipe(
        args, default=folder.recipe if args.resume else _shard_set_recipe(args.shards)
    )
    report = train(
        recipe,
        args.shards,
        args.out,
        resume=args.resume,
        progress=_progress(args),
        check=args.check,
    )
    if report.rank != 0:
        return 0  # under torchrun, rank 0 alone prints the report

    def text() -> None:
        m = report.test
        selected = f"selected epoch {report.selected_epoch} of {report.epochs}"
        print(f"{report.model}: {selected}, {count(report.steps)} steps, {report.seconds:.1f} s")
        print(
            f"test: n={count(m.n)} accuracy {m.accuracy:.4f} macro-F1 {m.macro_f1:.4f}"
            f" majority {m.majority_rate:.4f} AUC {optional(m.roc_auc)}"
        )
        print(TABLE_HEADER)
        print(table_row(report.model, m))
        print(f"checkpoint: {report.checkpoint}")

    emit(args, report.to_json(), text)
    return 0


def _shard_set_recipe(shards: str) -> Any:
    """The recipe a shard set was written with; None when it has no manifest (which ``train``
    then reports) or its manifest holds no recipe."""
    from vsotools.shards.manifest import written_with

    return written_with(shards)


def _evaluate(args: argparse.Namespace) -> int:
    from vsotools.core.metrics import TABLE_HEADER, format_confusion, table_row
    from vsotools.training.evaluate import evaluate

    report = evaluate(
        args.checkpoint,
        args.shards,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=_progress(args),
        check=args.check,
    )
    m = report.metrics

    def text() -> None:
        print(f"{report.checkpoint} ({report.model}) on {report.split} of {report.shards}")
        print(f"{'n':<15}{count(m.n)}")
        for name in ("accuracy", "precision", "recall", "f1", "macro_f1", "majority_rate"):
            print(f"{name:<15}{getattr(m, name):.4f}")
        print(f"{'roc_auc':<15}{optional(m.roc_auc)}")
        print(f"{'loss':<15}{optional(m.loss)}")
        print(format_confusion(m.confusion))
        print(TABLE_HEADER)
        print(table_row(report.model, m))

    emit(args, report.to_json(), text)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vsotools.training.predict import predict, predict_pairs

    if args.pairs is not None:
        if args.out is None or args.image is not None or args.text is not None:
            raise ConfigError("predict: --pairs needs --out, and no --image or --text")
        report = predict_pairs(
            args.checkpoint,
            args.pairs,
            args.out,
            batch_size=args.batch_size,
            device=args.device,
            progress=_progress(args),
        )

        def text() -> None:
            labels = ", ".join(f"{count(n)} {name}" for name, n in sorted(report.labels.items()))
            print(f"{args.out}: {count(report.predicted)} pairs labelled ({labels or 'none'})")
            if report.failed:
                print(f"{count(report.failed)} pairs could not be read (reason in column error):")
                for failure in report.failures[:10]:
                    print(f"  line {failure['line']} ({failure['id']}): {failure['reason']}")

        emit(args, report.to_json(), text)
        return 0
    if args.image is None and args.text is None:
        raise ConfigError("predict: give --image, --text or both, or --pairs and --out")
    if args.out is not None or args.batch_size is not None:
        raise ConfigError("predict: --out and --batch-size go with --pairs")
    prediction = predict(args.checkpoint, image=args.image, text=args.text, device=args.device)
    emit(
        args,
        prediction.to_json(),
        lambda: print(f"{prediction.label} {prediction.probability:.4f}"),
    )
    return 0


# --- vsotools run / demo ----------------------------------------------------------------------


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run a recipe end to end: fetch, filter, shard, train, evaluate, report",
        description="Run every stage of a recipe in one work folder, skipping each stage whose"
        " output is complete and current for its inputs (rerun the same command after a crash"
        " to continue), and print the results as the paper's Table 1.",
    )
    run.add_argument("recipe", type=Path, help="recipe file (pipelines/*.toml)")
    run.add_argument("--workdir", type=Path, help="work folder (default: runs/NAME of the recipe)")
    run.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="Flickr key file (KEY=value lines); default: FLICKR_API_KEY / FLICKR_API_SECRET",
    )
    add_json_option(run)
    add_recipe_options(run, (Flag("run.models"), *ENGINE_FLAGS), recipe_file=False)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="the whole pipeline offline on a synthetic corpus, in a few minutes",
        description="Generate a small Flickr-like corpus (sentiment in the text, the image or"
        " both), serve it with the local Flickr-compatible server on 127.0.0.1, and run the"
        " demo recipe (pipelines/demo.toml) through the real crawler, downloader, filter,"
        " sharder and trainer; ends with the fusion model and both baselines compared.",
    )
    demo.add_argument(
        "--workdir", type=Path, default=Path("runs/demo"), help="work folder (default: runs/demo)"
    )
    demo.add_argument("--photos", type=int, default=800, help="photos in the corpus (default 800)")
    add_json_option(demo)
    add_set_option(demo)
    demo.set_defaults(handler=_demo)


def _run(args: argparse.Namespace) -> int:
    from vsotools.fetch.client import load_credentials
    from vsotools.pipeline import default_workdir, run_recipe

    recipe = resolve_recipe(args)
    credentials = None if recipe.fetch.pairs else load_credentials(args.credentials)
    workdir = args.workdir or default_workdir(recipe)
    report = run_recipe(
        recipe,
        workdir,
        credentials=credentials,
        progress=_progress(args),
        on_stage=_on_stage(args),
        on_plan=_on_plan(args),
    )
    emit(args, report.to_json(), lambda: _print_results(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vsotools.demo.demo import demo_recipe, run_demo

    if args.photos < 60:
        raise ConfigError("demo: the corpus needs at least 60 photos (--photos)")
    recipe = demo_recipe(args.assignments)
    report = run_demo(
        args.workdir,
        recipe,
        photos=args.photos,
        progress=_progress(args),
        on_stage=_on_stage(args),
        on_plan=_on_plan(args),
    )
    emit(args, report.to_json(), lambda: _print_results(report))
    return 0


def _on_plan(args: argparse.Namespace):
    if args.json:
        return None

    def show(steps) -> None:
        width = max(len(step.stage) for step in steps)
        print("plan:", flush=True)
        for step in steps:
            print(f"  {step.stage:<{width}}  {step.describe()}", flush=True)

    return show


def _on_stage(args: argparse.Namespace):
    if args.json:
        return None

    def show(outcome) -> None:
        state = "done" if outcome.ran else "skipped"
        print(f"[{outcome.stage}] {state}: {outcome.detail}", flush=True)

    return show


def _print_results(report) -> None:
    from vsotools.pipeline import results_table

    if getattr(report, "already_complete", False):
        print(f"nothing to do: every output is complete and current in {report.workdir}")
    print()
    print(results_table(report.results))
    print()
    print(f"report: {report.report}  ({report.seconds:.0f} s)")
