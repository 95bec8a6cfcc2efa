"""Crash-safe writes."""

from __future__ import annotations

import os
import stat

import pytest

from vsotools.core.files import atomic_open, atomic_write_text


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "no temporary file left"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as fh:
        fh.write("new, half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
