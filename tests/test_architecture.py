"""The floors of docs/architecture.md, enforced: every module imports only from the floors below
it (or its own package's modules on its floor), and a stage never imports another stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vsotools"

GROUND, CONTRACTS, BLOCKS, STAGES, TOP = range(5)
FLOORS = {
    GROUND: ["vsotools", "vsotools.core.*"],
    CONTRACTS: [
        "vsotools.dataset.folder",
        "vsotools.shards.errors",
        "vsotools.shards.manifest",
        "vsotools.shards.tar_reader",
        "vsotools.training.folder",
    ],
    BLOCKS: [
        "vsotools.fetch.client",
        "vsotools.fetch.search",
        "vsotools.fetch.download",
        "vsotools.fetch.store",
        "vsotools.fetch.pairs",
        "vsotools.fetch.parts",
        "vsotools.shards.plan",
        "vsotools.shards.write",
        "vsotools.shards.pool",
        "vsotools.training.distributed",
        "vsotools.training.vocab",
        "vsotools.training.models",
        "vsotools.training.efficientnet",
        "vsotools.training.minilm",
        "vsotools.training.encoders",
        "vsotools.training.branches",
        "vsotools.training.state",
        "vsotools.training.features",
        "vsotools.training.loader",
        "vsotools.training.data",
        "vsotools.training.checkpoint",
        "vsotools.training.inference",
        "vsotools.demo.corpus",
        "vsotools.demo.server",
    ],
    STAGES: [
        "vsotools.fetch.stage",
        "vsotools.dataset.filter",
        "vsotools.shards.stage",
        "vsotools.shards.verify",
        "vsotools.training.train",
        "vsotools.training.evaluate",
        "vsotools.training.predict",
    ],
    TOP: ["vsotools.pipeline", "vsotools.report", "vsotools.demo.demo", "vsotools.cli.*"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    for floor, patterns in FLOORS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return floor
            if pattern.endswith(".*") and module == pattern[:-2]:
                return floor
    raise AssertionError(f"{module} is on no floor: add it to docs/architecture.md and FLOORS")


def package_of(module: str) -> str:
    return module.rsplit(".", 1)[0]


def imported(path: Path) -> set[str]:
    """Every vsotools module a file imports, at module level or inside a function.

    A relative import (``from .x import y``) fails: the floors are checked on absolute names.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            written = "." * node.level + (node.module or "")
            raise AssertionError(
                f"{path}:{node.lineno}: relative import 'from {written} import ...': "
                "write it as an absolute import (from vsotools.... import ...) so that the "
                "floor check sees it"
            )
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vsotools")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vsotools"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py")
                found.add(candidate if is_module.exists() else node.module)
    return found


MODULES = sorted(
    module_name(p)
    for p in PACKAGE.rglob("*.py")
    # A package's __init__ holds its docstring only (the command line's re-exports main).
    if p.name != "__main__.py" and (p.name != "__init__.py" or p.parent.name in ("vsotools", "cli"))
)


def test_a_relative_import_fails_the_floor_check(tmp_path):
    for line in ("from .store import write_part", "from .. import core", "from . import pool"):
        module = tmp_path / "module.py"
        module.write_text(f"import os\n{line}\n", encoding="utf-8")
        with pytest.raises(AssertionError, match=r"module\.py:2: relative import"):
            imported(module)


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_floors(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    floor = floor_of(module)
    for target in sorted(imported(path)):
        if target == "vsotools" or target.endswith("__init__"):
            continue
        theirs = floor_of(target)
        same_package = package_of(target) == package_of(module)
        assert theirs < floor or (theirs == floor and (same_package or floor in (GROUND, TOP))), (
            f"{module} (floor {floor}) imports {target} (floor {theirs})"
        )
        if floor == STAGES:
            assert theirs != STAGES, f"the stage {module} imports the stage {target}"
        assert not target.startswith("vsotools.cli") or module.startswith("vsotools.cli"), (
            f"{module} imports the command line"
        )


def test_module_paths_named_in_docstrings_and_docs_exist():
    """A module moved or renamed leaves no docstring or page naming its old path."""
    import re

    root = PACKAGE.parent
    modules = set(MODULES) | {m.rsplit(".", 1)[0] for m in MODULES}
    named = re.compile(
        r"``(vsotools(?:\.[a-z_]+)+)|`((?:core|fetch|dataset|shards|training|demo|cli)/[a-z_]+\.py)`"
    )
    files = [*PACKAGE.rglob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    missing = []
    for path in files:
        for match in named.finditer(path.read_text(encoding="utf-8")):
            dotted, relative = match.groups()
            if relative is not None:
                if not (PACKAGE / relative).exists():
                    missing.append(f"{path.name}: {relative}")
                continue
            parts = dotted.split(".")
            # vsotools.pkg.module, or vsotools.pkg.module.attribute
            if not any(
                ".".join(parts[:k]) in modules for k in {len(parts), max(2, len(parts) - 1)}
            ):
                missing.append(f"{path.name}: {dotted}")
    assert not missing
