"""docs/train.md: every command it shows parses, every setting is documented, its recipe loads."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from vsotools.cli import build_parser
from vsotools.core.config import Recipe, TrainConfig, recipe_from_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "train.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def documented_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if "vsotools" in words:
                commands.append(words[words.index("vsotools") + 1 :])
    return commands


def test_every_documented_command_parses_and_its_settings_exist():
    commands = documented_commands()
    assert {c[0] for c in commands} == {"train", "evaluate", "predict"}
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command)
        Recipe().override_strings(getattr(args, "assignments", []))


def test_every_train_setting_is_in_the_table():
    settings = DOC.read_text().split("## Settings", 1)[1]
    table = set(re.findall(r"^\| `(\w+)` \|", settings, flags=re.M))
    assert table == {f.name for f in dataclasses.fields(TrainConfig)}


def test_the_small_data_recipe_loads(tmp_path):
    import tomllib

    (block,) = code_blocks("toml")
    recipe = recipe_from_dict(tomllib.loads(block), base_dir=tmp_path)
    assert recipe.train.select == "val_macro_f1" and recipe.train.crop_size == 112
