"""The fetch stage: build a dataset folder from Flickr searches for ANPs, or from a pairs file.

``fetch(recipe, out)`` searches Flickr for each ANP that the recipe's labelling rule labels (all
of them with ``fetch.all_anps``), records every photo found, and downloads and validates its image
while the searches go on. With ``fetch.pairs`` set, it ingests that image+text pairs file
instead. Either way it leaves in the dataset folder (``vsotools.dataset.folder``) the photo
records, the validated images, the resolved recipe and, last, ``fetch-report.json``.

Kill it at any moment and run the same command again: it continues where it stopped (see
``store``); once finished, running it again with the same inputs does nothing.
``retry_failed`` fetches again the photos whose download failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from vsotools.core.anps import Anp, label_for_score, read_manifest
from vsotools.core.config import Recipe
from vsotools.core.engine import NOT_YET, PROBE_PREFIX, Engine, Task, open_engine
from vsotools.core.errors import ConfigError
from vsotools.core.schema import SOURCE_FLICKR, SOURCE_PAIRS
from vsotools.dataset.folder import DatasetFolder, StageReport
from vsotools.fetch.client import Credentials, FlickrClient, FoundPhoto
from vsotools.fetch.download import Downloader, DownloadSettings, Outcome
from vsotools.fetch.pairs import check_pairs, pairs_digest, read_pairs
from vsotools.fetch.parts import DownloadJob, download_part, fetch_image
from vsotools.fetch.search import PageSummary, anp_query, search_anp
from vsotools.fetch.store import PendingPhoto, StateError, Store, pin_refusal, read_meta

log = logging.getLogger(__name__)

PAIRS_SHA256 = "pairs sha256"


@dataclass(frozen=True)
class FetchReport(StageReport):
    """What a dataset folder holds once ``fetch`` has finished (counts cover every run)."""

    out: str
    source: str
    """``flickr`` (a crawl) or ``pairs``."""
    anps: int
    """ANPs to search (0 for pairs)."""
    searches: int
    """ANPs whose search is complete."""
    pages: int
    """Search result pages fetched from the API (each once, however often the fetch resumed)."""
    photos: int
    """Photos found (crawl: counted under at least one ANP) or pairs read."""
    downloaded: int
    failed: int
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    api_calls: int = 0
    """API calls made by the run that finished the folder, retries included."""
    seconds: float = 0.0
    """Wall time of the runs that worked on the folder until it was finished."""
    runs: int = 1
    """Runs that worked on the folder, killed ones included."""
    already_complete: bool = False
    """The folder already held this fetch, finished from the same inputs: nothing was done."""
    repaired: list[str] = field(default_factory=list)
    """Files of a finished fetch that were missing or damaged and were written again."""


def fetch(
    recipe: Recipe,
    out: str | Path,
    *,
    credentials: Credentials | None = None,
    retry_failed: bool = False,
    progress: bool = False,
) -> FetchReport:
    """Crawl Flickr for the recipe's ANPs (or ingest its ``fetch.pairs`` file) into ``out``; see
    the module doc.

    A folder that already holds this fetch, finished from the same inputs and settings, is left
    as it is (``already_complete``), unless ``retry_failed``. ``credentials`` are needed for a
    crawl (``fetch.client.load_credentials``).
    """
    folder = DatasetFolder(out)
    pairs = Path(recipe.fetch.pairs) if recipe.fetch.pairs else None
    if pairs is None and credentials is None:
        raise ConfigError("a crawl needs Flickr credentials (FLICKR_API_KEY)")
    if pairs is not None and not folder.state_file.exists():
        # A first run reads the pairs file whole before making anything: a file refused at
        # any row leaves no trace (no folder, lock or state), and the same folder takes it
        # once fixed.
        check_pairs(pairs)
    with folder.lock():
        pairs_sha256 = None if pairs is None else pairs_digest(pairs)
        inputs = folder.fetch_inputs(recipe, pairs_sha256)
        status = folder.status("fetch", inputs)
        if status.current and not retry_failed:
            log.debug("%s already holds this fetch; nothing to do", folder)
            return FetchReport.from_saved(status.record)
        if status.damaged:
            log.warning("%s: %s; fetching what is missing again", folder, status.why)
        report = _fetch(
            recipe, folder, pairs, pairs_sha256, credentials, retry_failed, progress, status.damaged
        )
        outputs = [p.relative_to(folder.root).as_posix() for p in folder.metadata_files()]
        folder.finish("fetch", recipe, report.to_json(), inputs, outputs)
    return report


def fetch_inputs(recipe: Recipe, out: str | Path) -> dict[str, Any]:
    """What the fetch of ``recipe`` into ``out`` is made from (``DatasetFolder.fetch_inputs``),
    for a caller that asks whether that output is current before running the stage."""
    pairs = recipe.fetch.pairs
    return DatasetFolder(out).fetch_inputs(recipe, pairs_digest(Path(pairs)) if pairs else None)


def refusal(recipe: Recipe, out: str | Path, pairs_sha256: str | None) -> StateError | None:
    """The error ``fetch`` of ``recipe`` would stop with on the dataset folder ``out`` (whose
    pairs file has ``pairs_sha256``) before fetching anything: a pinned setting changed, a
    pairs file that changed since it was read. Read without changing the folder, so that a
    caller (``vsotools run``) refuses before it plans."""
    folder = DatasetFolder(out)
    meta = read_meta(folder.state_file)
    if meta is None:
        return None
    pairs = Path(recipe.fetch.pairs) if recipe.fetch.pairs else None
    loaded = meta.get(PAIRS_SHA256)
    if pairs is not None and pairs_sha256 is not None and loaded not in (None, pairs_sha256):
        return _pairs_changed(folder.root, pairs, loaded, pairs_sha256)
    if "pinned" not in meta:
        return None
    anps = [] if pairs is not None else anps_to_search(recipe)
    return pin_refusal(folder.root, json.loads(meta["pinned"]), _pinned(recipe, pairs, anps))


def _pinned(recipe: Recipe, pairs: Path | None, anps: list[Anp]) -> dict[str, Any]:
    """The settings a dataset folder keeps from its first photo on (``Store.pin``)."""
    config = recipe.fetch
    # What decides the outcome and the stored bytes of a photo already fetched: a rerun that
    # changed them would leave those photos as they were, under settings they were not
    # fetched with.
    common = {
        "fetch.part_size": config.part_size,
        "fetch.max_side": config.max_side,
        "fetch.jpeg_quality": config.jpeg_quality,
        "fetch.min_side": config.min_side,
        "fetch.max_pixels": config.max_pixels,
        "fetch.max_bytes": config.max_bytes,
        "fetch.allowed_hosts": config.allowed_hosts,
        "fetch.image_store": config.image_store,
    }
    if pairs is not None:
        root = str(_image_root(recipe, pairs))
        return {"source": SOURCE_PAIRS, "pairs": str(pairs), "fetch.image_root": root, **common}
    return {"source": SOURCE_FLICKR, **common, **_search_settings(recipe, anps)}


def _fetch(
    recipe: Recipe,
    folder: DatasetFolder,
    pairs: Path | None,
    pairs_sha256: str | None,
    credentials: Credentials | None,
    retry_failed: bool,
    progress: bool,
    damaged: tuple[str, ...] = (),
) -> FetchReport:
    started = time.monotonic()
    config = recipe.fetch
    anps = [] if pairs is not None else anps_to_search(recipe)
    with Store(folder.root, config.part_size, config.image_store) as store:
        store.pin(_pinned(recipe, pairs, anps))
        # Counted at the start, so that a run killed midway counts too.
        runs = int(store.meta("runs") or 0) + 1
        store.set_meta("runs", str(runs))
        recovered = store.recover()
        if recovered:
            log.info("kept %d images saved by an interrupted run", recovered)
        if retry_failed:
            log.info("retrying %d failed photos", store.reset_failed())
        store.forget_damaged(damaged)
        extra_hosts = [] if pairs is not None else [_host(config.api_url)]
        settings = DownloadSettings.from_config(config, extra_hosts)
        api_calls = 0
        job = DownloadJob(
            settings,
            store.images,
            _image_root(recipe, pairs),
            config.part_size,
            config.download_concurrency,
        )
        with (
            open_engine(recipe.engine) as engine,
            _Progress(progress, len(anps), pairs is not None) as bars,
            _downloads(engine, store, job, bars) as workers,
        ):
            if pairs is not None:
                assert pairs_sha256 is not None
                _load_pairs(store, pairs, pairs_sha256)
            before = store.counts()
            bars.start(before.photos, before.downloaded + before.failed, before.anps_done)
            if engine.distributed:
                _check_visible(engine, store, job)
            for photo in store.pending():
                workers.submit(photo)
            if pairs is None:
                api_calls = _crawl(recipe, anps, store, credentials, workers, bars)
        store.write_parts()
        counts = store.counts()
        seconds = float(store.meta("seconds") or 0.0) + time.monotonic() - started
        store.set_meta("seconds", f"{seconds:.3f}")
    return FetchReport(
        out=str(folder.root),
        source=SOURCE_PAIRS if pairs is not None else SOURCE_FLICKR,
        anps=len(anps),
        searches=counts.anps_done,
        pages=counts.calls,
        photos=counts.photos,
        downloaded=counts.downloaded,
        failed=counts.failed,
        failed_by_reason=counts.failed_by_reason,
        api_calls=api_calls,
        seconds=round(seconds, 3),
        runs=runs,
        repaired=list(damaged),
    )


def anps_to_search(recipe: Recipe) -> list[Anp]:
    """The manifest's ANPs that the labelling rule labels (or all of them with ``all_anps``)."""
    if not recipe.anps.manifest:
        raise ConfigError(
            "anps.manifest: a crawl needs an ANP manifest (the recipe's anps.manifest)"
        )
    entries = read_manifest(recipe.anps.manifest)
    if recipe.fetch.all_anps:
        return entries
    pos, neg = recipe.anps.pos_threshold, recipe.anps.neg_threshold
    return [a for a in entries if label_for_score(a.sentiment, pos, neg) is not None]


def _search_settings(recipe: Recipe, anps: list[Anp]) -> dict[str, Any]:
    """Settings that decide what a crawl finds; a resumed crawl must keep them."""
    config = recipe.fetch
    names = "\n".join(a.anp for a in anps)
    return {
        "fetch.search_mode": config.search_mode,
        "fetch.per_anp": config.per_anp,
        "fetch.per_page": config.per_page,
        "fetch.extras": config.extras,
        "fetch.sizes": config.sizes,
        "fetch.licenses": config.licenses,
        "the ANPs searched (manifest, thresholds, all_anps)": hashlib.sha256(
            names.encode()
        ).hexdigest(),
    }


# --- the crawl ------------------------------------------------------------------------------


def _crawl(
    recipe: Recipe,
    anps: list[Anp],
    store: Store,
    credentials: Credentials | None,
    workers: _ImageWorkers | _PartDownloads,
    bars: _Progress,
) -> int:
    """Search every ANP not searched yet, handing new photos to the workers; returns API calls."""
    assert credentials is not None
    config = recipe.fetch
    snapshot = store.meta("snapshot")
    if snapshot is None:
        snapshot = str(int(time.time()))
        store.set_meta("snapshot", snapshot)
    client = FlickrClient(
        credentials,
        api_url=config.api_url,
        api_format=config.api_format,
        calls_per_hour=config.calls_per_hour,
        burst=config.calls_burst,
        timeout=config.api_timeout,
        retries=config.api_retries,
        backoff_base=config.backoff_base,
        backoff_max=config.backoff_max,
    )

    def call(params: dict[str, str]) -> PageSummary:
        cached = store.cached_call(params)
        if cached is not None:
            return cached
        page = client.search(params)
        photos = [(p.photo_id, _flickr_record(p, config.sizes)) for p in page.photos]
        return store.save_call(params, page.total, photos)

    for anp in anps:
        if store.anp_done(anp.anp):
            continue
        query = anp_query(
            anp.anp,
            anp.adjective,
            anp.noun,
            mode=config.search_mode,
            extras=config.extras,
            sizes=config.sizes,
            licenses=config.licenses,
        )
        found = 0
        for ids in search_anp(
            query, call, per_anp=config.per_anp, per_page=config.per_page, snapshot=int(snapshot)
        ):
            found += len(ids)
            new = store.accept(anp.anp, ids)
            bars.found(len(new), add=True)
            for photo in new:
                workers.submit(photo)
        store.finish_anp(anp.anp, found)
        bars.anp_done()
    return client.calls


def _flickr_record(photo: FoundPhoto, sizes: list[str]) -> dict[str, Any]:
    image_url = next((photo.urls[s] for s in sizes if photo.urls.get(s)), None)
    return {
        "source": SOURCE_FLICKR,
        "label": None,
        "title": photo.title,
        "description": photo.description,
        "tags": photo.tags,
        "owner": photo.owner,
        "owner_name": photo.owner_name,
        "license": photo.license,
        "date_upload": photo.date_upload,
        "date_taken": photo.date_taken,
        "image_url": image_url,
    }


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""


# --- pairs ----------------------------------------------------------------------------------


def _load_pairs(store: Store, path: Path, digest: str) -> None:
    """Read the pairs file (whose sha256 is ``digest``) into the state once (one transaction:
    all rows or none)."""
    loaded = store.meta(PAIRS_SHA256)
    if loaded is not None:
        if loaded != digest:
            raise _pairs_changed(store.root, path, loaded, digest)
        return
    base = path.parent

    def rows() -> Iterator[tuple[str, dict[str, Any], str | None]]:
        for pair in read_pairs(path):
            record = {
                "source": SOURCE_PAIRS,
                "label": pair.label,
                "description": pair.text,
                "image_url": pair.image if pair.is_url else None,
            }
            # Lexically normalised, not resolved: the image root check sees the path as written.
            local = None if pair.is_url else os.path.normpath(base / pair.image)
            yield pair.id, record, local

    # One transaction: a file refused at any row, or for holding no pairs, leaves no trace (not
    # even its sha256), so that the same folder takes it once fixed.
    added = store.add_pairs(rows(), meta={PAIRS_SHA256: digest})
    log.info("read %d pairs from %s", added, path)


def _pairs_changed(root: Path, path: Path, loaded: str, digest: str) -> StateError:
    return StateError(
        f"{root} was built from {path} when its sha256 was {loaded[:16]}..., but the file has"
        f" changed since (now {digest[:16]}...); use another dataset folder"
    )


def _image_root(recipe: Recipe, pairs: Path | None) -> Path:
    """The folder local images must lie in: ``fetch.image_root``, else the pairs file's."""
    if recipe.fetch.image_root:
        return Path(recipe.fetch.image_root)
    return pairs.parent if pairs is not None else Path.cwd()


# --- downloads and progress -----------------------------------------------------------------


class _ImageWorkers:
    """A bounded pool of threads that fetch images and save their outcomes."""

    def __init__(
        self,
        store: Store,
        settings: DownloadSettings,
        concurrency: int,
        bars: _Progress,
        image_root: Path,
    ) -> None:
        self._store = store
        self._image_root = image_root
        self._downloader = Downloader(settings)
        self._settings = settings
        self._bars = bars
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="download")
        # At most this many photos queued or in flight, so memory stays flat however many wait.
        self._slots = threading.BoundedSemaphore(concurrency * 2)
        self._error: BaseException | None = None

    def submit(self, photo: PendingPhoto) -> None:
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error
        self._executor.submit(self._run, photo)

    def _run(self, photo: PendingPhoto) -> None:
        try:
            outcome = self._fetch(photo)
            self._store.save_outcome(photo, outcome)
            self._bars.image_done(outcome)
        except BaseException as exc:  # a disk or state error: stop the fetch, keep the first
            if self._error is None:
                self._error = exc
        finally:
            self._slots.release()

    def _fetch(self, photo: PendingPhoto) -> Outcome:
        return fetch_image(photo, self._downloader, self._image_root, self._settings)

    def __enter__(self) -> _ImageWorkers:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On an error or ^C the queued photos are dropped; the ones in flight finish and are
        # saved, and the next run fetches the rest.
        self._executor.shutdown(wait=True, cancel_futures=exc is not None)
        self._downloader.close()
        if exc is None and self._error is not None:
            raise self._error


class _PartDownloads:
    """The downloads as parts on a cluster (``fetch.parts.download_part`` through the engine):
    photos are gathered into parts of one image folder each, a few parts in flight; this
    process records each part's outcomes as it comes back."""

    def __init__(self, engine: Engine, store: Store, job: DownloadJob, bars: _Progress) -> None:
        self._engine, self._store, self._job, self._bars = engine, store, job, bars
        self._part: list[PendingPhoto] = []
        self._parts: queue.Queue[list[PendingPhoto] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._record, name="parts", daemon=True)
        self._thread.start()

    def submit(self, photo: PendingPhoto) -> None:
        if (
            self._part
            and photo.seq // self._job.part_size != self._part[0].seq // self._job.part_size
        ):
            self._put(self._part)
            self._part = []
        self._part.append(photo)

    def _put(self, part: list[PendingPhoto] | None) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._parts.put(part, timeout=0.5)
                return
            except queue.Full:
                continue

    def _tasks(self) -> Iterator[Task]:
        # Parts come as fast as the search finds photos: while none is ready, the engine goes
        # on recording the parts that finish (NOT_YET), rather than waiting here for the next.
        while True:
            try:
                part = self._parts.get_nowait()
            except queue.Empty:
                yield NOT_YET
                continue
            if part is None:
                return
            yield Task(f"photos {part[0].seq}-{part[-1].seq}", (part,), size=len(part))

    def _record(self) -> None:
        try:
            for _, saved in self._engine.map(
                download_part, self._tasks(), shared=(self._job,), progress=self._bars.images
            ):
                self._store.commit_saved(saved)
                self._bars.failures(sum(image.error is not None for image in saved))
        except BaseException as exc:  # stop the fetch; what was recorded stays
            self._error = exc

    def __enter__(self) -> _PartDownloads:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On an error the parts in flight still finish and are recorded; the next run fetches
        # the rest.
        try:
            if exc is None:
                if self._part:
                    self._put(self._part)
            else:
                # Stopped (Ctrl-C, an error): the parts not yet handed out are dropped, to be
                # fetched by the next run; those in flight finish and are recorded.
                with contextlib.suppress(queue.Empty):
                    while True:
                        self._parts.get_nowait()
                log.info("waiting for the parts in flight to finish and be recorded")
            self._put(None)
        except BaseException:
            if exc is None:
                raise
        finally:
            self._part = []
            self._thread.join()
        if exc is None and self._error is not None:
            raise self._error


def _downloads(
    engine: Engine, store: Store, job: DownloadJob, bars: _Progress
) -> _ImageWorkers | _PartDownloads:
    """This process's download threads, or parts on the engine's cluster."""
    if engine.distributed:
        return _PartDownloads(engine, store, job, bars)
    return _ImageWorkers(store, job.settings, job.concurrency, bars, job.image_root)


def _check_visible(engine: Engine, store: Store, job: DownloadJob) -> None:
    """Before any download on a cluster: every node sees the image store, and the folder of a
    pairs file's local images."""
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    store.images.write(0, probe, uuid.uuid4().bytes)
    try:
        paths = [store.images.url_of(probe)]
        local = next((p.local_path for p in store.pending() if p.local_path), None)
        if local is not None:
            paths.append(str(job.image_root / local))
        engine.check_visible(paths)
    finally:
        store.images.remove(probe)


class _Progress:
    """Two progress bars: ANPs searched (with photos found) and images fetched."""

    def __init__(self, enabled: bool, anps: int, pairs: bool) -> None:
        self._lock = threading.Lock()
        self._found = 0
        self._stack = contextlib.ExitStack()
        self._anps = None
        if enabled and not pairs:
            self._anps = self._stack.enter_context(
                tqdm(total=anps, unit="ANP", desc="ANPs searched", dynamic_ncols=True)
            )
        self._images = None
        if enabled:
            self._images = self._stack.enter_context(
                tqdm(total=0, unit="img", desc="images", dynamic_ncols=True)
            )
        self._failed = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def start(self, found: int, fetched: int, anps_done: int) -> None:
        """Show the work earlier runs did."""
        with self._lock:
            if self._images is not None:
                self._images.update(fetched)
            if self._anps is not None:
                self._anps.update(anps_done)
        self.found(found)

    def found(self, n: int, add: bool = False) -> None:
        """Set (or with ``add``, raise) the count of photos found."""
        with self._lock:
            self._found = self._found + n if add else n
            if self._anps is not None:
                self._anps.set_postfix(found=self._found, refresh=False)
            if self._images is not None:
                self._images.total = self._found
                self._images.refresh()

    def anp_done(self) -> None:
        if self._anps is not None:
            with self._lock:
                self._anps.update(1)

    def images(self, n: int) -> None:
        """``n`` more images fetched (their outcomes come with ``failures``)."""
        if self._images is not None:
            with self._lock:
                self._images.update(n)

    def failures(self, n: int) -> None:
        if self._images is not None and n:
            with self._lock:
                self._failed += n
                self._images.set_postfix(failed=self._failed)

    def image_done(self, outcome: Outcome) -> None:
        if self._images is not None:
            with self._lock:
                self._failed += not outcome.ok
                self._images.set_postfix(failed=self._failed, refresh=False)
                self._images.update(1)
