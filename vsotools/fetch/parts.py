"""Fetch's work unit: the images of one part of pending photos, as the engine runs it.

``download_part(job, photos)`` fetches and checks each photo's image (a URL, or a local file of
a pairs file) with its own pool of ``job.concurrency`` threads, writes each kept image into the
image store under its final name (complete or not at all), and returns the outcomes
(``store.SavedImage``) for the driver to record. It touches no state: the driver stays the one
writer of ``fetch-state.sqlite`` and the photo records, so a part run twice (a retried task, or
a rerun after the driver was killed before recording it) writes the same names again and is
recorded once. ``fetch_image`` is the one way a photo's image is fetched, here and in the
fetch stage's own download threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vsotools.dataset.folder import ImageStore
from vsotools.fetch.download import Downloader, DownloadSettings, Outcome, read_local_image
from vsotools.fetch.store import PendingPhoto, SavedImage, save_image

NO_IMAGE_URL = "no_image_url"
"""Failure reason of a photo that has none of the sizes asked for."""


@dataclass(frozen=True)
class DownloadJob:
    """What every part of one fetch shares; pickled to the engine's workers."""

    settings: DownloadSettings
    images: ImageStore
    image_root: Path
    """The folder local images (of a pairs file) must lie in."""
    part_size: int
    concurrency: int


def fetch_image(
    photo: PendingPhoto, downloader: Downloader, image_root: Path, settings: DownloadSettings
) -> Outcome:
    """The outcome of fetching ``photo``'s image: downloaded, or read from a local file."""
    if photo.local_path is not None:
        return read_local_image(image_root, photo.local_path, settings)
    if photo.image_url is None:
        return Outcome.failed(NO_IMAGE_URL)
    return downloader.get(photo.image_url)


def download_part(
    job: DownloadJob, photos: Sequence[PendingPhoto], report: Callable[[int], object]
) -> list[SavedImage]:
    """Fetch and store the images of ``photos``; their outcomes, in the same order."""
    with Downloader(job.settings) as downloader:

        def one(photo: PendingPhoto) -> SavedImage:
            outcome = fetch_image(photo, downloader, job.image_root, job.settings)
            return save_image(job.images, photo, outcome, job.part_size)

        saved = []
        with ThreadPoolExecutor(job.concurrency, thread_name_prefix="download") as pool:
            for image in pool.map(one, photos):
                saved.append(image)
                report(1)
    return saved
