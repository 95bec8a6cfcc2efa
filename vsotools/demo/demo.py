"""vsotools demo: the whole pipeline offline, on a corpus of its own, in a few minutes.

``run_demo`` writes a synthetic Flickr corpus (``vsotools.demo.corpus``: photos whose sentiment shows
in the text, the image or both, found by the ANPs of ``manifests/demo-anps.csv``), serves it with
the local Flickr-compatible server on 127.0.0.1, and runs the ``pipelines/demo.toml`` recipe
against it through the real crawler, downloader, filter, sharder and trainer: the fusion model and
both baselines. Nothing is faked: the table it ends with is what the models reached.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path

from vsotools.core.config import Recipe, load_recipe
from vsotools.core.errors import VsoError
from vsotools.pipeline import PipelineReport, StageOutcome, run_recipe

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO / "pipelines" / "demo.toml"
DEMO_PORT = 8913
"""The demo server's port when free: a rerun then finds the images where the first run did."""
DEMO_KEY = "demo-key-not-a-flickr-key"


def demo_recipe(overrides: Sequence[str] = (), path: Path = DEMO_RECIPE) -> Recipe:
    """The demo recipe with ``section.key=value`` overrides applied."""
    if not path.is_file():
        raise VsoError(
            f"{path} not found: the demo runs from a checkout of the vsotools repository"
        )
    return load_recipe(path, overrides)


def run_demo(
    workdir: str | Path,
    recipe: Recipe | None = None,
    *,
    photos: int = 800,
    port: int = DEMO_PORT,
    progress: bool = False,
    on_stage=None,
    on_plan=None,
) -> PipelineReport:
    """Make (once) and serve the demo corpus, then run the demo recipe on it in ``workdir``."""
    from vsotools.demo.corpus import make_corpus
    from vsotools.demo.server import serve
    from vsotools.fetch.client import Credentials

    workdir = Path(workdir)
    recipe = recipe or demo_recipe()
    corpus = workdir / "corpus"
    if not (corpus / "photos.jsonl").is_file():
        made = make_corpus(corpus, photos=photos, seed=recipe.filter.seed)
        log.info("corpus: %d photos in %s", made.photos, corpus)
        if on_stage is not None:
            on_stage(StageOutcome("corpus", True, f"{made.photos} photos in {corpus}"))
    with serve(corpus, "127.0.0.1", _free_port(port)) as base_url:
        log.info("flickr-server: %s", base_url)
        recipe = recipe.override({"fetch.api_url": f"{base_url}services/rest/"})
        return run_recipe(
            recipe,
            workdir,
            credentials=Credentials(key=DEMO_KEY, secret="demo"),
            progress=progress,
            on_stage=on_stage,
            on_plan=on_plan,
        )


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else 0 (any free port)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            log.info("port %d is taken; the demo server takes another", preferred)
            return 0
    return preferred
