"""The ``vsotools`` command line: argument parsing, output and exit codes over the library.

Each command parses its arguments, resolves the recipe (file, then ``--set``, then the command's
own flags), calls one library function and prints its report. Errors the library raises as
``VsoError`` become one line on stderr and exit status 1; a usage error exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsotools import __version__
from vsotools.core import anps, schema
from vsotools.core.config import Recipe, load_recipe
from vsotools.core.errors import ConfigError, VsoError
from vsotools.shards import stage as shards
from vsotools.shards import verify

if TYPE_CHECKING:
    from vsotools.dataset.filter import FilterReport

# Stage modules with heavy imports (nltk, torch, gensim) are imported by the commands that use
# them: the shard writer's worker processes start by importing this module again (spawn), and
# every command would otherwise pay for all of them.

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
    _add_anps_commands(commands)
    _add_fetch_commands(commands)
    _add_filter_command(commands)
    _add_shard_commands(commands)
    _add_train_commands(commands)
    _add_run_commands(commands)
    return parser


# --- shared argument helpers ------------------------------------------------------------------


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        type=Path,
        help="dataset recipe (pipelines/*.toml); default: the paper's VSO settings",
    )
    _add_set_argument(parser)


def _add_set_argument(parser: argparse.ArgumentParser) -> None:
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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _byte_size(text: str) -> int:
    """A size in bytes, with an optional decimal suffix: 500000000, 500MB, 1.5G, 64k."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number = text.strip().upper().removesuffix("B")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number.removesuffix(unit)) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(value)


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


# --- vsotools fetch, vsotools flickr-server -----------------------------------------------------


def _add_fetch_commands(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch",
        help="crawl Flickr for the recipe's ANPs (or ingest a pairs file) and download the images",
        description="Search Flickr for each ANP of the manifest that the labelling rule labels,"
        " record every photo found and download its image; or, with --pairs, ingest an"
        " image+text pairs file. Writes DATA/metadata/*.parquet, DATA/images/, the resolved"
        " recipe and DATA/fetch-report.json. Kill it at any moment and rerun the same command"
        " to continue. The API key comes from FLICKR_API_KEY and FLICKR_API_SECRET, or"
        " --credentials.",
    )
    fetch.add_argument("--out", required=True, type=Path, metavar="DATA", help="dataset folder")
    fetch.add_argument(
        "--pairs",
        type=Path,
        metavar="FILE",
        help="ingest this JSONL/CSV/Parquet file of id,text,label,image instead of crawling",
    )
    fetch.add_argument("--manifest", type=Path, help="ANP manifest CSV (default: the recipe's)")
    fetch.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="file of FLICKR_API_KEY=... and FLICKR_API_SECRET=... lines (default: the environment)",
    )
    fetch.add_argument("--api-url", metavar="URL", help="Flickr REST endpoint")
    fetch.add_argument("--search-mode", choices=("text", "tags"), help="text or tag search")
    fetch.add_argument(
        "--all-anps",
        action="store_const",
        const=True,
        help="search every ANP, not only those the labelling rule labels",
    )
    fetch.add_argument("--per-anp", type=int, metavar="N", help="most photos per ANP")
    fetch.add_argument(
        "--licenses",
        type=_int_list,
        metavar="IDS",
        help="only these licence ids, e.g. 1,2,4,5,9,10",
    )
    fetch.add_argument("--calls-per-hour", type=int, metavar="N", help="API call budget")
    fetch.add_argument(
        "--concurrency", type=int, metavar="N", help="image downloads in flight at once"
    )
    fetch.add_argument(
        "--max-side",
        type=int,
        metavar="PX",
        help="downscale stored images to this longer side (0: keep the served file)",
    )
    fetch.add_argument(
        "--retry-failed", action="store_true", help="fetch again the photos whose image failed"
    )
    _add_recipe_arguments(fetch)
    fetch.set_defaults(run=_fetch)

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
    server.set_defaults(run=_flickr_server)


def _fetch(args: argparse.Namespace) -> int:
    from vsotools.fetch.client import load_credentials
    from vsotools.fetch.stage import fetch

    recipe = _resolve_recipe(
        args,
        anps__manifest=str(args.manifest) if args.manifest else None,
        fetch__api_url=args.api_url,
        fetch__search_mode=args.search_mode,
        fetch__all_anps=args.all_anps,
        fetch__per_anp=args.per_anp,
        fetch__licenses=args.licenses,
        fetch__calls_per_hour=args.calls_per_hour,
        fetch__download_concurrency=args.concurrency,
        fetch__max_side=args.max_side,
        fetch__pairs=args.pairs,
    )
    credentials = None if recipe.fetch.pairs else load_credentials(args.credentials)
    report = fetch(
        recipe,
        args.out,
        credentials=credentials,
        retry_failed=args.retry_failed,
        progress=_progress(args),
    )
    if report.source == "pairs":
        print(f"{args.out}: {_count(report.photos)} pairs read")
    else:
        print(
            f"{args.out}: {_count(report.searches)} of {_count(report.anps)} ANPs searched"
            f" ({_count(report.pages)} result pages), {_count(report.photos)} photos found"
        )
    print(f"  downloaded {_count(report.downloaded)}")
    print(f"  failed     {_count(report.failed)}")
    for reason, n in report.failed_by_reason.items():
        print(f"    {reason:<20}{_count(n)}")
    print(f"report: {args.out / 'fetch-report.json'}")
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
    print(f"serving {_count(len(httpd.corpus.by_id))} photos from {args.corpus}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
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
    from vsotools.dataset import filter as filtering

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


def _print_filter_report(report: FilterReport, recipe: Recipe) -> None:
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


# --- vsotools shard, vsotools verify ----------------------------------------------------------


def _add_shard_commands(commands: argparse._SubParsersAction) -> None:
    shard = commands.add_parser(
        "shard",
        help="write the filtered dataset as WebDataset tar shards",
        description="Write DATA/filtered.parquet and its images as WebDataset tar shards,"
        " SHARDS/{train,test}-NNNNNN.tar, with SHARDS/manifest.json written last. Rerun the"
        " same command to finish an interrupted run.",
    )
    shard.add_argument("data", type=Path, help="dataset folder with filtered.parquet and images")
    shard.add_argument(
        "--out",
        required=True,
        metavar="SHARDS",
        help="output folder, or an fsspec URL such as s3://bucket/prefix",
    )
    shard.add_argument("--image-size", type=int, metavar="PX", help="shorter side of the images")
    shard.add_argument("--quality", type=int, help="JPEG quality of the re-encoded images")
    shard.add_argument("--maxcount", type=int, metavar="N", help="most samples per shard")
    shard.add_argument(
        "--maxsize", type=_byte_size, metavar="BYTES", help="most bytes per shard (e.g. 500MB)"
    )
    shard.add_argument("--seed", type=int, help="seed of the shuffle before cutting shards")
    shard.add_argument(
        "--readers",
        type=int,
        metavar="N",
        help="loader processes reading the train split (nodes x GPUs x workers):"
        " at least this many train shards",
    )
    shard.add_argument(
        "--max-skipped",
        type=float,
        metavar="FRACTION",
        help="largest fraction of missing or undecodable images to leave out before failing",
    )
    shard.add_argument("--workers", type=int, metavar="N", help="processes writing shards")
    shard.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a shard set already at SHARDS (otherwise a complete set of the same input"
        " and settings is kept, an unfinished one is finished, another one is refused)",
    )
    _add_recipe_arguments(shard)
    shard.set_defaults(run=_shard)

    check = commands.add_parser(
        "verify",
        help="re-read a shard set and check it against its manifest",
        description="Read every shard of a set back: checksums, sample and label counts, every"
        " image decoded, keys unique and train/test disjoint. Exits 1 on any problem.",
    )
    check.add_argument("shards", metavar="SHARDS", help="shard set folder or fsspec URL")
    check.add_argument(
        "--workers", type=int, default=2, metavar="N", help="processes reading shards (default 2)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=_verify)


def _shard(args: argparse.Namespace) -> int:
    recipe = _resolve_recipe(
        args,
        shard__image_size=args.image_size,
        shard__quality=args.quality,
        shard__maxcount=args.maxcount,
        shard__maxsize=args.maxsize,
        shard__seed=args.seed,
        shard__readers=args.readers,
        shard__max_skipped=args.max_skipped,
        shard__workers=args.workers,
    )
    report = shards.write_shards(
        recipe, args.data, args.out, overwrite=args.overwrite, progress=_progress(args)
    )
    total = sum(s.shards for s in report.splits.values())
    if report.already_complete:
        print(
            f"{report.location} already holds this shard set; nothing written (--overwrite"
            " writes it again)"
        )
    else:
        reused = f", {report.reused} from an earlier run" if report.reused else ""
        print(f"wrote {total} shards to {report.location}{reused}")
    for split, summary in report.splits.items():
        labels = ", ".join(f"{_count(n)} {name}" for name, n in sorted(summary.labels.items()))
        print(
            f"  {split:<6}{summary.shards:>6} shards {_count(summary.samples):>10} samples ({labels})"
        )
    if report.skipped:
        print(
            f'left out {_count(len(report.skipped))} photos (listed under "skipped" in the manifest):'
        )
        for entry in report.skipped[:10]:
            print(f"  {entry['photo_id']}: {entry['reason']}: {entry['detail']}")
        if len(report.skipped) > 10:
            print(f"  ... and {_count(len(report.skipped) - 10)} more")
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers: must be positive, got {args.workers}")
    report = verify.verify_shards(args.shards, workers=args.workers, progress=_progress(args))
    if args.json:
        print(
            json.dumps(
                {
                    "location": report.location,
                    "ok": report.ok,
                    "shards": report.shards,
                    "samples": report.samples,
                    "problems": [
                        {"shard": p.shard, "key": p.key, "message": p.message}
                        for p in report.problems
                    ],
                }
            )
        )
    else:
        for problem in report.problems:
            print(problem)
        if report.ok:
            print(
                f"OK: {report.shards} shards, {_count(report.samples)} samples at {report.location}"
            )
        else:
            print(
                f"{_count(len(report.problems))} problems in {report.location}"
                f" ({report.shards} shards, {_count(report.samples)} samples)",
            )
    return 0 if report.ok else EXIT_ERROR


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
    from vsotools.core.metrics import TABLE_HEADER, table_row
    from vsotools.training.train import RECIPE_NAME, train

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
    from vsotools.training.evaluate import predict

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


# --- vsotools run / demo ----------------------------------------------------------------------


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run a recipe end to end: fetch, filter, shard, train, evaluate, report",
        description="Run every stage of a recipe in one work folder, skipping each stage whose"
        " complete output is already there (rerun the same command after a crash to continue),"
        " and print the results as the paper's Table 1.",
    )
    run.add_argument("recipe", type=Path, help="recipe file (pipelines/*.toml)")
    run.add_argument("--workdir", type=Path, help="work folder (default: runs/RECIPE_NAME)")
    run.add_argument(
        "--models",
        help="comma-separated models to train on the same shards: fusion,text,image"
        " (default: the recipe's run.models)",
    )
    run.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="Flickr key file (KEY=value lines); default: FLICKR_API_KEY / FLICKR_API_SECRET",
    )
    _add_set_argument(run)
    run.set_defaults(run=_run)

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
    _add_set_argument(demo)
    demo.set_defaults(run=_demo)


def _run(args: argparse.Namespace) -> int:
    from vsotools.fetch.client import load_credentials
    from vsotools.pipeline import results_table, run_recipe

    recipe = load_recipe(args.recipe).override_strings(args.assignments)
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        recipe = recipe.override({"run.models": models})
    credentials = None if recipe.fetch.pairs else load_credentials(args.credentials)
    workdir = args.workdir or Path("runs") / recipe.name
    report = run_recipe(
        recipe, workdir, credentials=credentials, progress=_progress(args), on_stage=_print_stage
    )
    _print_results(report, results_table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vsotools.demo.demo import demo_recipe, run_demo
    from vsotools.pipeline import results_table

    if args.photos < 60:
        raise VsoError("--photos: the demo needs at least 60 photos")
    recipe = demo_recipe().override_strings(args.assignments)
    report = run_demo(
        args.workdir,
        recipe,
        photos=args.photos,
        progress=_progress(args),
        on_stage=_print_stage,
    )
    _print_results(report, results_table)
    return 0


def _print_stage(outcome) -> None:
    state = "done" if outcome.ran else "skipped"
    print(f"[{outcome.stage}] {state}: {outcome.detail}", flush=True)


def _print_results(report, results_table) -> None:
    print()
    print(results_table(report.results))
    print()
    print(f"report: {report.report}  ({report.seconds:.0f} s)")
