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

from vsotools import __version__, anps, shards, verify
from vsotools.config import Recipe, load_recipe
from vsotools.errors import ConfigError, VsoError

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
    _add_shard_commands(commands)
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
