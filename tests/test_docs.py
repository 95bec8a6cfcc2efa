"""The documentation matches the command line: every command is in the README and its docs page,
every flag of a command is in its docs page, and every README example parses."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vsotools.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {
    "anps": REPO / "manifests" / "README.md",
    "fetch": REPO / "docs" / "fetch.md",
    "flickr-server": REPO / "docs" / "fetch.md",
    "filter": REPO / "docs" / "filter.md",
    "shard": REPO / "docs" / "shard.md",
    "verify": REPO / "docs" / "shard.md",
    "train": REPO / "docs" / "train.md",
    "evaluate": REPO / "docs" / "train.md",
    "predict": REPO / "docs" / "train.md",
    "run": REPO / "docs" / "run.md",
    "demo": REPO / "docs" / "run.md",
    "settings": REPO / "README.md",
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_a_docs_page():
    assert set(_commands()) == set(DOCS)


@pytest.mark.parametrize("command", sorted(DOCS))
def test_every_command_is_in_the_readme_and_its_page(command):
    assert f"vsotools {command}" in README
    assert f"vsotools {command}" in DOCS[command].read_text()


def _parsers(command: str) -> list[argparse.ArgumentParser]:
    """The command's parser, or for a group (``anps``) the parsers of its actions."""
    parser = _commands()[command]
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(groups[0].choices.values()) if groups else [parser]


@pytest.mark.parametrize("command", sorted(DOCS))
def test_every_flag_is_documented(command):
    page = DOCS[command].read_text()
    flags = {
        option
        for parser in _parsers(command)
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert flags, command
    missing = sorted(f for f in flags if f not in page and f"--no-{f[2:]}" not in page)
    assert not missing, f"{DOCS[command].name} does not mention {missing}"


def test_every_settings_table_is_what_the_settings_declare():
    """The docs' settings tables are generated from the settings (`vsotools settings SECTION
    --markdown`): a setting is declared once, in vsotools/core/config.py."""
    from vsotools.cli.app import settings_markdown, settings_rows
    from vsotools.core.config import section_names

    pages = [*(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "manifests" / "README.md"]
    found = {}
    for page in pages:
        for section, table in re.findall(
            r"<!-- settings: (\w+) -->\n(.*?)\n<!-- /settings -->", page.read_text(), flags=re.S
        ):
            found[section] = table
    assert set(found) == set(section_names()), "every recipe section has its table"
    for section, table in found.items():
        assert table == settings_markdown(settings_rows(section)), (
            f"the {section} table is stale: paste `vsotools settings {section} --markdown`"
        )


def test_readme_examples_parse():
    parser = build_parser()
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines()]
    examples = [m.group(1) for line in lines if (m := re.search(r"\bvsotools (.+)$", line))]
    assert len(examples) >= 12
    for example in examples:
        args = shlex.split(example.split("  #")[0])
        parser.parse_args(args)  # raises SystemExit on an unknown command or flag
