"""Shared fixtures: the read-only reference data beside the project, and the CLI entry point."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsotools.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VSOTOOLS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real ANP lists, Flickr recordings, MVSA pairs); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set VSOTOOLS_SHARED_DATA)")
    return SHARED_DATA


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``vsotools ARGS...`` in-process through its real entry point, ``vsotools.cli.main``."""

    def run(*args: str | os.PathLike[str]) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors, --help, --version
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            # main() binds the "vsotools" logger to this test's captured stderr; unbind it so
            # that later tests neither log to a closed stream nor miss records in caplog.
            logger = logging.getLogger("vsotools")
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def vsotools_command() -> list[str]:
    """The command line that starts ``vsotools``: the installed console script beside this
    interpreter, or ``python -m vsotools`` with this interpreter where there is none."""
    exe = Path(sys.executable).with_name("vsotools")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vsotools"]


def run_vsotools(*args: str | os.PathLike[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the installed ``vsotools`` console script (the same interpreter's) as a subprocess."""
    return subprocess.run(
        [*vsotools_command(), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )
