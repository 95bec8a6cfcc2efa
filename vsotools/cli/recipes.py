"""Recipe options of a command: ``--recipe``, ``--set`` and flags made from the recipe's settings.

A setting is declared once, as a field of a recipe section (``vsotools.core.config``) with its
type, default and help. A command names the settings it offers as flags (``Flag("filter.min_words")``
becomes ``--min-words``); each flag takes its type, choices and help from the field, shows the
built-in default, and is parsed by the setting's declared type. ``resolve_recipe`` applies the
recipe file (or a default one), then every ``--set``, then the flags given, and validates once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vsotools.core.config import Recipe, describe, load_recipe

log = logging.getLogger("vsotools")

_DEST = "setting:"
"""Prefix of the argparse destinations of setting flags (their dotted key follows)."""


@dataclass(frozen=True)
class Flag:
    """A recipe setting offered as a flag; ``name`` defaults to the key, dashed."""

    dotted: str
    name: str | None = None

    @property
    def option(self) -> str:
        return self.name or "--" + self.dotted.rpartition(".")[2].replace("_", "-")


def add_recipe_options(
    parser: argparse.ArgumentParser, flags: Sequence[Flag] = (), *, recipe_file: bool = True
) -> None:
    """``--recipe`` (unless ``recipe_file`` is false), ``--set``, and one flag per setting."""
    if recipe_file:
        parser.add_argument(
            "--recipe",
            type=Path,
            help="dataset recipe (pipelines/*.toml); default: the one the input was made with,"
            " else the paper's VSO settings",
        )
    add_set_option(parser)
    for flag in flags:
        _add_flag(parser, flag)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any recipe setting, e.g. --set filter.seed=7 (repeatable; flags win)",
    )


def _add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    info = describe(flag.dotted)
    shown = ",".join(map(str, info.default)) if info.is_list else info.default
    help_text = f"{info.help} [{flag.dotted}; built-in default: {shown!s}]".replace("%", "%%")
    dest = _DEST + flag.dotted
    if info.type is bool:
        parser.add_argument(
            flag.option, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
        )
        return
    metavar = flag.option.lstrip("-").replace("-", "_").upper()
    choices = info.choices if info.choices and not info.is_list else None
    parser.add_argument(flag.option, dest=dest, choices=choices, metavar=metavar, help=help_text)


def setting_assignments(args: argparse.Namespace) -> list[str]:
    """The setting flags given on the command line, as ``section.key=value`` strings."""
    given = []
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST) or value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        given.append(f"{dest.removeprefix(_DEST)}={text}")
    return given


def resolve_recipe(args: argparse.Namespace, default: Path | Recipe | None = None) -> Recipe:
    """The recipe a command runs with: ``--recipe`` (or ``default``, the recipe its input was
    made with: a file when it exists, or a recipe read from the input; else the built-in
    defaults), then every ``--set`` in order, then the setting flags; validated once."""
    path = getattr(args, "recipe", None)
    if path is None and isinstance(default, Recipe):
        # Not INFO: a refusal that follows (a missing package) must stay the one line on stderr.
        log.debug("recipe: the one its input was made with")
        return default.override_strings([*args.assignments, *setting_assignments(args)])
    if path is None and isinstance(default, Path) and default.is_file():
        log.info("recipe: %s (the one its input was made with)", default)
        path = default
    return load_recipe(path, [*args.assignments, *setting_assignments(args)])
