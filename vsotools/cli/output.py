"""What the commands print: one JSON object with ``--json``, or lines for people; exit codes."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

REMEDIES: dict[str, dict[str, str]] = {
    "shard": {
        "replace": "pass --overwrite to replace it",
        "elsewhere": "write to another --out",
    },
    "train": {
        "resume": "pass --resume to continue it",
        "elsewhere": "choose another --out",
    },
    "run": {"elsewhere": "choose another --workdir"},
    "predict": {"elsewhere": "write to another --out"},
    "anps": {"elsewhere": "write to another --out"},
    "demo": {"elsewhere": "choose another --workdir"},
}
"""What each command offers for the remedies of ``errors.ExistingOutput``, as its own flags."""


def remedy_text(command: str, remedies: tuple[str, ...]) -> str:
    """``"; pass --overwrite to replace it, or write to another --out"`` for a command."""
    offered = REMEDIES.get(command, {})
    texts = [offered[r] for r in remedies if r in offered]
    return f"; {', or '.join(texts)}" if texts else ""


def emit(args: argparse.Namespace, data: Mapping[str, Any], text: Callable[[], None]) -> None:
    """``data`` as one JSON object when the command has ``--json``, else ``text()`` for people."""
    if getattr(args, "json", False):
        print(json.dumps(_plain(data), ensure_ascii=False))
    else:
        text()


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def count(n: int) -> str:
    return f"{n:,}"


def optional(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plain(value: Any) -> Any:
    """JSON-safe: paths as strings, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
