"""ANP manifests: reading the VSO and MVSO release formats, the project's CSV, and the labelling rule.

The project's manifest is a CSV with the header ``anp,adjective,noun,sentiment`` (see
``manifests/README.md``). ``import_release`` turns a release file into one; ``read_manifest`` reads
it back; ``label_for_score`` is the single rule that turns a sentiment score into a label, used by
``vsotools anps stats`` and by ``filter``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vsotools.core.errors import ManifestError
from vsotools.core.files import UnsafeFile, atomic_open, check_output_file, read_regular_file
from vsotools.core.schema import NEGATIVE, POSITIVE

MANIFEST_HEADER = ("anp", "adjective", "noun", "sentiment")
ReleaseFormat = Literal["vso", "mvso"]
RELEASE_FORMATS: tuple[ReleaseFormat, ...] = ("vso", "mvso")


@dataclass(frozen=True)
class Anp:
    """One adjective-noun pair and its sentiment score."""

    anp: str
    adjective: str
    noun: str
    sentiment: float


def label_for_score(score: float, pos_threshold: float, neg_threshold: float) -> int | None:
    """The label of an ANP score: positive above ``pos_threshold``, negative below ``neg_threshold``.

    Both comparisons are strict; a score between the thresholds (or equal to one) has no label
    and returns ``None``. VSO uses 0 / 0, MVSO-EN 0.16 / -0.1.
    """
    if score > pos_threshold:
        return POSITIVE
    if score < neg_threshold:
        return NEGATIVE
    return None


@dataclass(frozen=True)
class AnpStats:
    """How many ANPs of a manifest the labelling rule makes positive, negative or drops."""

    positive: int
    negative: int
    dropped: int

    @property
    def total(self) -> int:
        return self.positive + self.negative + self.dropped


def anp_stats(anps: Iterable[Anp], pos_threshold: float, neg_threshold: float) -> AnpStats:
    counts = {POSITIVE: 0, NEGATIVE: 0, None: 0}
    for anp in anps:
        counts[label_for_score(anp.sentiment, pos_threshold, neg_threshold)] += 1
    return AnpStats(positive=counts[POSITIVE], negative=counts[NEGATIVE], dropped=counts[None])


# --- reading ---------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VSO_HEADER = re.compile(
    rf"^\d+\.\s+(?P<adjective>\S+)\s+\[sentiment:\s*(?P<score>{_NUMBER})\]"
    r"(?:\s+\[#images:\s*[\d,]+\])?\s*$"
)
_VSO_ANP = re.compile(
    rf"^\s+(?P<anp>\S+)\s+\[sentiment:\s*(?P<score>{_NUMBER})\](?:\s+\[#imgs:\s*[\d,]+\])?\s*$"
)


def read_release(path: str | Path, format: ReleaseFormat) -> list[Anp]:
    """Parse a VSO or MVSO release file into ANPs, in file order."""
    if format == "vso":
        parse = _parse_vso
    elif format == "mvso":
        parse = _parse_mvso
    else:
        raise ManifestError(f"unknown ANP release format {format!r} (known: vso, mvso)")
    return _unique(path, parse(path, _read_lines(path)))


def read_manifest(path: str | Path) -> list[Anp]:
    """Read a project manifest CSV (header ``anp,adjective,noun,sentiment``)."""
    try:
        return _read_manifest(path)
    except csv.Error as exc:  # a field over the csv module's limit (128 KiB), a stray NUL
        raise ManifestError(f"{path}: not a CSV manifest this reader takes ({exc})") from None


def _read_manifest(path: str | Path) -> list[Anp]:
    lines = _read_lines(path)
    rows = csv.reader(io.StringIO("\n".join(lines)))
    header = next(rows, None)
    if header is None:
        raise ManifestError(
            f"{path}: empty manifest (expected the header {','.join(MANIFEST_HEADER)})"
        )
    if tuple(h.strip() for h in header) != MANIFEST_HEADER:
        raise ManifestError(
            f"{path}:1: expected the header {','.join(MANIFEST_HEADER)}, got {','.join(header)!r}"
            " (convert a release file first: `vsotools anps import`)"
        )

    def parse() -> Iterator[tuple[int, Anp]]:
        for lineno, row in enumerate(rows, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(MANIFEST_HEADER):
                raise ManifestError(
                    f"{path}:{lineno}: expected {len(MANIFEST_HEADER)} fields, got {len(row)}"
                )
            name, adjective, noun, score = (cell.strip() for cell in row)
            anp = _make_anp(path, lineno, name, score)
            if (anp.adjective, anp.noun) != (adjective, noun):
                raise ManifestError(
                    f"{path}:{lineno}: ANP {name!r} does not match adjective {adjective!r}"
                    f" and noun {noun!r}"
                )
            yield lineno, anp

    return _unique(path, parse())


def anp_scores(anps: Iterable[Anp]) -> dict[str, float]:
    """ANP name -> sentiment score."""
    return {a.anp: a.sentiment for a in anps}


MANIFEST_MAX_BYTES = 1 << 26
"""The largest manifest or release file read (the VSO release file has 168 KB)."""


def _read_lines(path: str | Path) -> list[str]:
    try:
        text = read_regular_file(path, MANIFEST_MAX_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except UnsafeFile as exc:
        raise ManifestError(f"the ANP file {exc.detail}") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text.splitlines()


def _parse_vso(path: str | Path, lines: list[str]) -> Iterator[tuple[int, Anp]]:
    adjective = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if header := _VSO_HEADER.match(line):
            adjective = header["adjective"]
            continue
        entry = _VSO_ANP.match(line)
        if entry is None:
            hint = " (is this an MVSO release? its format is mvso)" if "," in line else ""
            raise ManifestError(
                f"{path}:{lineno}: not a VSO release line: {line.strip()[:80]!r}; expected an"
                " adjective header like '1. beautiful [sentiment: 1.00] [#images: 18,487,527]'"
                " or a tab-indented ANP like 'beautiful_flower [sentiment: 1.77] [#imgs: 2,380,000]'"
                + hint
            )
        if adjective is None:
            raise ManifestError(
                f"{path}:{lineno}: ANP {entry['anp']!r} comes before any adjective header line"
            )
        yield lineno, _make_anp(path, lineno, entry["anp"], entry["score"])


def _parse_mvso(path: str | Path, lines: list[str]) -> Iterator[tuple[int, Anp]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 2:
            hint = " (is this a VSO release? its format is vso)" if "[sentiment:" in line else ""
            raise ManifestError(
                f"{path}:{lineno}: expected 'anp,score' (2 fields), got {len(fields)} fields:"
                f" {line.strip()[:80]!r}{hint}"
            )
        yield lineno, _make_anp(path, lineno, fields[0].strip(), fields[1].strip())


def _make_anp(path: str | Path, lineno: int, name: str, score_text: str) -> Anp:
    adjective, sep, noun = name.partition("_")
    if not sep or not adjective or not noun or any(c.isspace() for c in name):
        raise ManifestError(
            f"{path}:{lineno}: {name!r} is not an adjective_noun pair (e.g. beautiful_flower)"
        )
    try:
        score = float(score_text)
    except ValueError:
        raise ManifestError(
            f"{path}:{lineno}: sentiment score {score_text!r} of {name!r} is not a number"
        ) from None
    if not math.isfinite(score):
        raise ManifestError(f"{path}:{lineno}: sentiment score of {name!r} is not finite")
    return Anp(anp=name, adjective=adjective, noun=noun, sentiment=score)


def _unique(path: str | Path, entries: Iterable[tuple[int, Anp]]) -> list[Anp]:
    """Keep the first of repeated identical ANPs; refuse an ANP listed with two scores."""
    seen: dict[str, tuple[int, Anp]] = {}
    for lineno, anp in entries:
        if anp.anp in seen:
            first_line, first = seen[anp.anp]
            if first.sentiment != anp.sentiment:
                raise ManifestError(
                    f"{path}:{lineno}: ANP {anp.anp!r} has score {anp.sentiment:g} here but"
                    f" {first.sentiment:g} at line {first_line}"
                )
            continue
        seen[anp.anp] = (lineno, anp)
    if not seen:
        raise ManifestError(f"{path}: no ANPs found")
    return [anp for _, anp in seen.values()]


# --- writing ---------------------------------------------------------------------------------


def write_manifest(anps: Iterable[Anp], path: str | Path) -> int:
    """Write ANPs as a project manifest CSV, atomically; returns how many were written."""
    count = 0
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        for anp in anps:
            writer.writerow((anp.anp, anp.adjective, anp.noun, repr(anp.sentiment)))
            count += 1
    return count


def import_release(src: str | Path, format: ReleaseFormat, out: str | Path) -> list[Anp]:
    """Parse a release file and write it as a project manifest; returns the ANPs written."""
    check_output_file(out, inputs=(src,))
    anps = read_release(src, format)
    write_manifest(anps, out)
    return anps
