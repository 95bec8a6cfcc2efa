"""docs/fetch.md: its offline walk-through runs as written, and it documents every flag."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from vsotools.cli import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "fetch.md"


@pytest.mark.slow
def test_the_offline_walk_through_runs(tmp_path):
    section = DOC.read_text().split("### Try it offline", 1)[1]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(tmp_path / "data" / "metadata")
    assert len(df) == 40 and set(df.status) <= {"ok", "failed"}
    assert set(df.error.dropna()) <= {"truncated"}


def test_every_flag_of_fetch_and_flickr_server_is_documented():
    text = DOC.read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("fetch", "flickr-server"):
        for action in commands[name]._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--recipe", "--set"):
                    assert flag in text, f"{name} {flag} is not in {DOC.name}"
