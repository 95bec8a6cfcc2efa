"""Recipes: loading, refusing bad keys and types, overrides, and the resolved copy written back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vsotools.core.config import Recipe, load_recipe, recipe_to_toml, write_recipe
from vsotools.core.errors import ConfigError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_paper_recipes_hold_the_paper_settings():
    vso = load_recipe(PIPELINES / "vso.toml")
    mvso = load_recipe(PIPELINES / "mvso-en.toml")
    for recipe in (vso, mvso):
        assert (recipe.filter.min_words, recipe.filter.max_words) == (5, 150)
        assert recipe.filter.test_fraction == 0.2
        assert recipe.filter.text_fields == ["description"]
        assert recipe.shard.image_size == 256
        t = recipe.train
        assert (t.batch_size, t.lr, t.lr_decay, t.lr_decay_steps) == (100, 1e-4, 0.96, 3000)
        assert (t.word_dim, t.max_words, t.filter_widths, t.crop_size) == (200, 150, [3, 4, 5], 224)
    assert (vso.anps.pos_threshold, vso.anps.neg_threshold) == (0.0, 0.0)
    assert (mvso.anps.pos_threshold, mvso.anps.neg_threshold) == (0.16, -0.1)


def test_every_recipe_in_pipelines_loads():
    recipes = sorted(PIPELINES.glob("*.toml"))
    assert recipes
    for path in recipes:
        assert load_recipe(path).name == path.stem


def test_defaults_equal_the_vso_recipe_except_paths():
    vso = load_recipe(PIPELINES / "vso.toml")
    assert vso.override({"anps.manifest": ""}) == Recipe()


def test_paths_are_relative_to_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.toml"
    path.write_text('[anps]\nmanifest = "../m.csv"\n')
    assert load_recipe(path).anps.manifest == str(tmp_path / "m.csv")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[filter]\nmin_word = 5\n", "filter.min_word: unknown key"),
        ("[filtr]\nmin_words = 5\n", "filtr: unknown key"),
        ("colour = 1\n", "colour: unknown key"),
        ('[filter]\nmin_words = "5"\n', "filter.min_words: expected an integer, got a string"),
        ("[filter]\nmin_words = 5.5\n", "filter.min_words: expected an integer, got a number"),
        ("[filter]\ndedup_images = 1\n", "filter.dedup_images: expected true or false"),
        ("[train]\nlr = true\n", "train.lr: expected a number"),
        ('[train]\nfilter_widths = [3, "4"]\n', "train.filter_widths[1]: expected an integer"),
        ("[train]\nfilter_widths = 3\n", "train.filter_widths: expected an array"),
        ('[filter]\ngroup_by = "user"\n', "filter.group_by: expected one of ['photo', 'owner']"),
        ("filter = 3\n", "filter: expected a table"),
        ("[filter]\nmin_words = 10\nmax_words = 5\n", "filter.max_words: must be at least"),
        ("[filter]\ntest_fraction = 1.5\n", "filter.test_fraction: must be in (0, 1]"),
        ("[filter\n", "not valid TOML"),
    ],
)
def test_bad_recipes_are_refused_with_the_key_name(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_integers_are_accepted_for_numbers(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nlr = 1\n")
    lr = load_recipe(path).train.lr
    assert lr == 1.0 and isinstance(lr, float)


def test_overrides_are_typed_and_validated():
    recipe = Recipe().override_strings(
        ["filter.min_words=3", "filter.text_fields=title,description", "fetch.licenses=1,2,4"]
    )
    assert recipe.filter.min_words == 3
    assert recipe.filter.text_fields == ["title", "description"]
    assert recipe.fetch.licenses == [1, 2, 4]
    assert Recipe().filter.min_words == 5, "overrides return a copy"
    with pytest.raises(ConfigError, match=r"filter\.min_words: cannot read 'five' as an integer"):
        Recipe().override_strings(["filter.min_words=five"])
    with pytest.raises(ConfigError, match=r"filter\.dedup_images: cannot read 'yes'"):
        Recipe().override_strings(["filter.dedup_images=yes"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        Recipe().override_strings(["filter.min_words"])
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        Recipe().override({"train.nope": 1})


def test_override_paths_are_relative_to_the_given_folder(tmp_path):
    recipe = Recipe().override({"anps.manifest": "m.csv"}, base_dir=tmp_path)
    assert recipe.anps.manifest == str(tmp_path / "m.csv")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(PIPELINES / "mvso-en.toml").override_strings(
        ['fetch.api_url=http://127.0.0.1:1/"quoted"\\path', "train.lr=3e-5"]
    )
    write_recipe(recipe, tmp_path / "resolved.toml")
    assert load_recipe(tmp_path / "resolved.toml") == recipe
    assert recipe_to_toml(recipe).startswith('name = "mvso-en"\n')


def test_cli_flags_override_set_which_overrides_the_file(cli, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("anp,adjective,noun,sentiment\na_b,a,b,0.5\nc_d,c,d,-0.5\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text("[anps]\npos_threshold = 1.0\nneg_threshold = -1.0\n")
    args = ["anps", "stats", manifest, "--recipe", recipe, "--json"]
    assert '"dropped": 2' in cli(*args).out
    assert '"positive": 1' in cli(*args, "--set", "anps.pos_threshold=0.1").out
    result = cli(*args, "--set", "anps.pos_threshold=0.1", "--pos-threshold", "0.9")
    assert '"positive": 0' in result.out


def test_cli_reports_recipe_errors_in_one_line(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[anps]\npos_treshold = 1.0\n")
    result = cli("anps", "stats", tmp_path / "m.csv", "--recipe", recipe)
    assert result.code == 1
    assert result.err == f"vsotools: error: {recipe}: anps.pos_treshold: unknown key" + (
        " (known here: manifest, pos_threshold, neg_threshold)\n"
    )


def test_settings_lists_each_setting_with_its_default_or_a_recipes_value(cli):
    result = cli("settings", "filter", "--json")
    assert result.code == 0, result.err
    rows = {row["key"]: row for row in json.loads(result.out)["filter"]}
    assert rows["min_words"]["value"] == "5" and "inclusive" in rows["min_words"]["help"]
    result = cli("settings", "train", "--recipe", PIPELINES / "mvsa.toml", "--json")
    values = {row["key"]: row["value"] for row in json.loads(result.out)["train"]}
    assert values["text_encoder"] == '"minilm"' and values["frozen_branches"] == '["text", "image"]'
    text = cli("settings", "shard").out
    assert text.startswith("[shard]\n  image_size = 256\n")


def test_settings_markdown_names_each_section_and_a_recipes_values(cli):
    text = cli("settings", "--markdown").out
    assert text.startswith("### [anps]\n\n| setting | default | meaning |\n")
    assert "|\n\n### [fetch]\n\n| setting |" in text
    text = cli("settings", "train", "--recipe", PIPELINES / "mvsa.toml", "--markdown").out
    assert text.startswith("| setting | value | meaning |\n")
    assert '| `text_encoder` | `"minilm"` |' in text


def _bounded_settings() -> list[tuple[str, object]]:
    """Every setting declared with bounds, and its bounds."""
    import dataclasses

    from vsotools.core.config import section_names

    found = []
    for section in section_names():
        for spec in dataclasses.fields(getattr(Recipe(), section)):
            bounds = spec.metadata.get("bounds")
            if bounds:
                found.append((f"{section}.{spec.name}", bounds))
    return found


@pytest.mark.parametrize(("dotted", "bounds"), _bounded_settings(), ids=lambda x: str(x)[:30])
def test_each_bound_declared_with_its_setting_holds_exactly_at_its_edge(dotted, bounds):
    """Every bound refuses the first value past it, with the setting's name and the rule, and
    lets the value at its edge through (a comparison flipped or loosened fails here)."""
    import typing

    from vsotools.core.config import describe

    info = describe(dotted)
    item_type = typing.get_args(info.type)[0] if info.is_list else info.type
    number = int if item_type is int else float
    name = f"{dotted}[0]" if info.is_list else dotted

    def error_for(value) -> str | None:
        if info.is_list:
            value = [value, *list(info.default)[1:]]
        try:
            Recipe().override({dotted: value})
        except ConfigError as exc:
            return str(exc)
        return None

    step = 1 if number is int else 1e-6
    for edge, inclusive, outward in (
        (bounds.gt, False, -1), (bounds.ge, True, -1), (bounds.lt, False, 1), (bounds.le, True, 1),
    ):  # fmt: skip
        if edge is None:
            continue
        past = number(edge + outward * step) if inclusive else number(edge)
        refused = error_for(past)
        assert refused is not None and refused.startswith(f"{name}: must "), (past, refused)
        if inclusive:
            at_edge = error_for(number(edge))  # refused only for a rule between settings
            rule = f"{name}: {bounds.rule(number is int)}, got"
            assert at_edge is None or not at_edge.startswith(rule), at_edge
    if bounds.min_items is not None:
        short = list(info.default)[: bounds.min_items - 1]
        with pytest.raises(ConfigError, match=rf"^{dotted}: must "):
            Recipe().override({dotted: short})
    if bounds.max_items is not None:
        longer = [*info.default, info.default[-1]]
        with pytest.raises(ConfigError, match=rf"^{dotted}: must "):
            Recipe().override({dotted: longer})
