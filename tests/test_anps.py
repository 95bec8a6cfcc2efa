"""ANP manifests: the real release formats, the project's CSV, the labelling rule, and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_vsotools

from vsotools.core import anps
from vsotools.core.schema import NEGATIVE, POSITIVE
from vsotools.demo.corpus import DEMO_MANIFEST


@pytest.fixture(scope="module")
def vso_release(shared_data: Path) -> Path:
    return shared_data / "anps" / "vso-3244ANPs.txt"


@pytest.fixture(scope="module")
def mvso_release(shared_data: Path) -> Path:
    return shared_data / "anps" / "mvso-english.csv"


def test_vso_release_imports_every_anp_with_its_score(cli, vso_release, tmp_path):
    out = tmp_path / "vso.csv"
    result = cli("anps", "import", vso_release, "--format", "vso", "--out", out)
    assert result.code == 0, result.err
    assert "3,244 ANPs" in result.out
    manifest = anps.read_manifest(out)
    assert len(manifest) == 3244
    scores = anps.anp_scores(manifest)
    assert scores["beautiful_flower"] == 1.77
    assert scores["dark_night"] == -1.41
    # Every ANP of the release comes through, in file order, with adjective and noun split.
    release_names = [
        line.split()[0] for line in vso_release.read_text().splitlines() if line.startswith("\t")
    ]
    assert [a.anp for a in manifest] == release_names
    flower = next(a for a in manifest if a.anp == "beautiful_flower")
    assert (flower.adjective, flower.noun) == ("beautiful", "flower")
    assert out.read_text().splitlines()[0] == "anp,adjective,noun,sentiment"


def test_mvso_release_imports_every_anp_with_its_score(cli, mvso_release, tmp_path):
    out = tmp_path / "mvso.csv"
    result = cli("anps", "import", mvso_release, "--format", "mvso", "--out", out)
    assert result.code == 0, result.err
    manifest = anps.read_manifest(out)
    assert len(manifest) == 4421
    expected = {
        name: float(score)
        for name, score in (line.split(",") for line in mvso_release.read_text().splitlines())
    }
    assert anps.anp_scores(manifest) == expected
    assert anps.anp_scores(manifest)["dark_night"] == -0.142


@pytest.mark.parametrize(
    ("release", "fmt", "thresholds", "expected"),
    [
        ("vso-3244ANPs.txt", "vso", ("0", "0"), (1789, 1455, 0)),
        ("mvso-english.csv", "mvso", ("0.16", "-0.1"), (857, 826, 2738)),
    ],
)
def test_stats_count_the_paper_rule(cli, shared_data, tmp_path, release, fmt, thresholds, expected):
    out = tmp_path / "m.csv"
    assert (
        cli("anps", "import", shared_data / "anps" / release, "--format", fmt, "--out", out).code
        == 0
    )
    pos, neg = thresholds
    result = cli("anps", "stats", out, "--pos-threshold", pos, "--neg-threshold", neg, "--json")
    assert result.code == 0, result.err
    counts = json.loads(result.out)
    assert (counts["positive"], counts["negative"], counts["dropped"]) == expected

    table = cli("anps", "stats", out, "--pos-threshold", pos, "--neg-threshold", neg)
    for n in expected:
        assert f"{n:,}" in table.out


def test_stats_takes_thresholds_from_the_recipe(cli, shared_data, tmp_path):
    out = tmp_path / "mvso.csv"
    cli(
        "anps",
        "import",
        shared_data / "anps" / "mvso-english.csv",
        "--format",
        "mvso",
        "--out",
        out,
    )
    recipe = Path(__file__).resolve().parents[1] / "pipelines" / "mvso-en.toml"
    counts = json.loads(cli("anps", "stats", out, "--recipe", recipe, "--json").out)
    assert (counts["positive"], counts["negative"]) == (857, 826)
    # A flag overrides the recipe.
    counts = json.loads(
        cli("anps", "stats", out, "--recipe", recipe, "--pos-threshold", "0", "--json").out
    )
    assert counts["pos_threshold"] == 0.0


def test_stats_reads_a_release_file_directly(cli, vso_release):
    result = cli("anps", "stats", vso_release, "--format", "vso", "--json")
    assert json.loads(result.out)["positive"] == 1789


def test_label_rule_is_strict_at_both_thresholds():
    assert anps.label_for_score(0.17, 0.16, -0.1) == POSITIVE
    assert anps.label_for_score(0.16, 0.16, -0.1) is None
    assert anps.label_for_score(0.0, 0.16, -0.1) is None
    assert anps.label_for_score(-0.1, 0.16, -0.1) is None
    assert anps.label_for_score(-0.11, 0.16, -0.1) == NEGATIVE
    assert anps.label_for_score(0.0, 0.0, 0.0) is None
    assert anps.label_for_score(1e-9, 0.0, 0.0) == POSITIVE


VSO_SNIPPET = (
    "1. happy [sentiment: 1.00] [#images: 10]\n"
    "\thappy_dog [sentiment: 1.50] [#imgs: 5]\n"
    "\thappy_cat [sentiment: 1.20] [#imgs: 5]\n"
    "2. sad [sentiment: -1.00] [#images: 3]\n"
    "\tsad_rain [sentiment: -1.30] [#imgs: 3]"
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_small_vso_file_parses(tmp_path):
    parsed = anps.read_release(_write(tmp_path, "v.txt", VSO_SNIPPET), "vso")
    assert [(a.anp, a.sentiment) for a in parsed] == [
        ("happy_dog", 1.5),
        ("happy_cat", 1.2),
        ("sad_rain", -1.3),
    ]


@pytest.mark.parametrize(
    ("fmt", "text", "message"),
    [
        ("vso", VSO_SNIPPET.replace("[sentiment: 1.20]", "[sentiment: high]"), "v.txt:3:"),
        ("vso", "\thappy_dog [sentiment: 1.50] [#imgs: 5]\n", "before any adjective header"),
        ("vso", "happy_dog,1.5\n", "its format is mvso"),
        ("mvso", "happy_dog,1.5\nsad_rain\n", "v.txt:2: expected 'anp,score'"),
        ("mvso", "happy_dog,1.5\nsad_rain,-x\n", "v.txt:2: sentiment score '-x'"),
        ("mvso", "happy_dog,1.5\nsadrain,-1\n", "v.txt:2: 'sadrain' is not an adjective_noun"),
        ("mvso", "happy_dog,1.5\nsad_rain,-1\nhappy_dog,0.5\n", "v.txt:3: ANP 'happy_dog'"),
        ("mvso", "happy_dog,1.5\nsad_rain,nan\n", "not finite"),
        ("mvso", VSO_SNIPPET, "its format is vso"),
        ("mvso", "\n\n", "no ANPs found"),
    ],
)
def test_bad_release_files_fail_with_file_and_line(cli, tmp_path, fmt, text, message):
    src = _write(tmp_path, "v.txt", text)
    out = tmp_path / "out.csv"
    result = cli("anps", "import", src, "--format", fmt, "--out", out)
    assert result.code != 0
    assert message in result.err
    assert result.err.count("\n") == 1, "one line, no traceback"
    assert "Traceback" not in result.err
    assert not out.exists(), "nothing is written on error"


def test_duplicate_with_the_same_score_is_kept_once(tmp_path):
    parsed = anps.read_release(_write(tmp_path, "v.txt", "a_b,1\nc_d,-1\na_b,1.0\n"), "mvso")
    assert [a.anp for a in parsed] == ["a_b", "c_d"]


def test_missing_file_and_folder_are_clear_errors(cli, tmp_path):
    result = cli(
        "anps", "import", tmp_path / "nope.txt", "--format", "vso", "--out", tmp_path / "o"
    )
    assert result.code == 1
    assert "nope.txt: no such file" in result.err
    result = cli("anps", "stats", tmp_path)
    assert result.code == 1
    assert "is a folder" in result.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("anp,score\na_b,1\n", ":1: expected the header anp,adjective,noun,sentiment"),
        ("anp,adjective,noun,sentiment\na_b,a,b\n", ":2: expected 4 fields"),
        ("anp,adjective,noun,sentiment\na_b,a,c,1\n", ":2: ANP 'a_b' does not match"),
        ("", "empty manifest"),
    ],
)
def test_bad_manifests_fail_with_file_and_line(cli, tmp_path, text, message):
    result = cli("anps", "stats", _write(tmp_path, "m.csv", text))
    assert result.code == 1
    assert message in result.err
    assert "Traceback" not in result.err


def test_import_does_not_clobber_an_existing_manifest_on_error(cli, tmp_path):
    out = _write(tmp_path, "keep.csv", "anp,adjective,noun,sentiment\na_b,a,b,1.0\n")
    bad = _write(tmp_path, "bad.csv", "a_b,1\nbroken\n")
    assert cli("anps", "import", bad, "--format", "mvso", "--out", out).code == 1
    assert out.read_text() == "anp,adjective,noun,sentiment\na_b,a,b,1.0\n"


def test_wrong_format_flag_is_a_usage_error(cli, tmp_path):
    result = cli("anps", "import", tmp_path / "x", "--format", "sentibank", "--out", tmp_path / "o")
    assert result.code == 2
    assert "invalid choice" in result.err


def test_console_script_runs_as_a_subprocess(vso_release, tmp_path):
    out = tmp_path / "vso.csv"
    done = run_vsotools("anps", "import", vso_release, "--format", "vso", "--out", out)
    assert done.returncode == 0, done.stderr
    done = run_vsotools("anps", "stats", out)
    assert done.returncode == 0
    assert "1,789" in done.stdout and "1,455" in done.stdout
    done = run_vsotools("anps", "stats", tmp_path / "missing.csv")
    assert done.returncode == 1
    assert done.stderr.strip() == f"vsotools: error: {tmp_path / 'missing.csv'}: no such file"


def test_a_closed_output_pipe_ends_quietly():
    """`vsotools anps stats ... | head -0`: no traceback, no error line, a failure status."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vsotools", "anps", "stats", str(DEMO_MANIFEST)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == ""
