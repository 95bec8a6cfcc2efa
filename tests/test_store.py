"""The dataset folder's state: a save interrupted at any step is finished by the next run, the
layout holds ``part_size`` photos per folder, and unchanged metadata parts are not rewritten."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest
from PIL import Image

from vsotools.core.config import FetchConfig
from vsotools.fetch.download import DownloadSettings, check_image
from vsotools.fetch.store import INCOMING_DIR, Store


def outcome_of(width: int):
    buffer = io.BytesIO()
    Image.new("RGB", (width, 50), (9, 99, 199)).save(buffer, format="PNG")
    return check_image(buffer.getvalue(), DownloadSettings.from_config(FetchConfig()))


def new_store(root, n: int = 5, part_size: int = 2) -> Store:
    store = Store(root, part_size)
    rows = [
        (f"id/{i}" if i == 4 else str(i), {"source": "pairs", "label": "positive"}, None)
        for i in range(n)
    ]
    store.add_pairs(rows)
    return store


def test_an_image_save_killed_at_any_step_is_finished_without_fetching_again(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    photos = {p.photo_id: p for p in store.pending()}
    outcomes = {pid: outcome_of(60 + i) for i, pid in enumerate(photos)}
    store.save_outcome(photos["0"], outcomes["0"])  # saved whole

    # "1": killed while its bytes were being written.
    (tmp_path / INCOMING_DIR / "1.partial").write_bytes(outcomes["1"].data[:20])
    # "2": killed after the bytes were complete, before the outcome was committed.
    real_replace = os.replace

    def kill_at(step: str):
        def replace(src, dst):
            if step == "commit" and str(dst).endswith(".png") and INCOMING_DIR in str(dst):
                real_replace(src, dst)
                raise KeyboardInterrupt  # as if killed right after this rename
            if step == "move" and "images" in str(dst):
                raise KeyboardInterrupt
            return real_replace(src, dst)

        return replace

    monkeypatch.setattr("vsotools.fetch.store.os.replace", kill_at("commit"))
    with pytest.raises(KeyboardInterrupt):
        store.save_outcome(photos["2"], outcomes["2"])
    # "3": killed after the commit, before the file reached images/.
    monkeypatch.setattr("vsotools.fetch.store.os.replace", kill_at("move"))
    with pytest.raises(KeyboardInterrupt):
        store.save_outcome(photos["3"], outcomes["3"])
    monkeypatch.setattr("vsotools.fetch.store.os.replace", real_replace)
    store.close()

    store = Store(tmp_path, 2)
    assert store.recover() == 2
    assert [p.photo_id for p in store.pending(batch=1)] == ["1", "id/4"]
    assert not list((tmp_path / INCOMING_DIR).iterdir())
    for p in store.pending():
        store.save_outcome(p, outcomes[p.photo_id])
    assert store.write_parts() == 3
    df = pd.read_parquet(tmp_path / "metadata").set_index("photo_id")
    for pid, outcome in outcomes.items():
        record = df.loc[pid]
        assert (tmp_path / record.image_path).read_bytes() == outcome.data
        assert (record.sha256, record.width, record.image_bytes) == (
            outcome.sha256,
            outcome.width,
            outcome.image_bytes,
        )
    assert list(df.image_path) == [
        "images/00000/0.png",
        "images/00000/1.png",
        "images/00001/2.png",
        "images/00001/3.png",
        "images/00002/id_4-4.png",  # made safe, and made unique by its number
    ]
    store.close()


def test_only_changed_parts_are_rewritten(tmp_path):
    with new_store(tmp_path, 4) as store:
        for p in store.pending():
            store.save_outcome(p, outcome_of(70))
        assert store.write_parts() == 2
        assert store.write_parts() == 0
        assert store.reset_failed() == 0 and store.write_parts() == 0
        (tmp_path / "metadata" / "part-00001.parquet").unlink()
        assert store.write_parts() == 1


def test_a_failed_attempt_removes_a_copy_an_earlier_attempt_left_unrecorded(tmp_path):
    """On a cluster a part stores its images before the driver records them: a driver killed in
    between leaves images no record names. When the photo's next attempt fails, the copy goes."""
    from vsotools.dataset.folder import DatasetFolder, image_name
    from vsotools.fetch.download import Outcome
    from vsotools.fetch.store import PendingPhoto, save_image

    images = DatasetFolder(tmp_path).image_store()
    photo = PendingPhoto(7, "p7", None, "p7.jpg")
    left = tmp_path / image_name(7, "p7", "jpg", 5)
    left.parent.mkdir(parents=True)
    left.write_bytes(b"an image a killed run stored")
    saved = save_image(images, photo, Outcome.failed("missing_file"), part_size=5)
    assert saved.error == "missing_file" and saved.image_path is None
    assert not left.exists()


def test_the_locations_sent_to_workers_are_absolute(tmp_path, monkeypatch):
    from vsotools.core.storage import Location
    from vsotools.dataset.folder import DatasetFolder

    monkeypatch.chdir(tmp_path)
    assert Location("shards").absolute().local == tmp_path / "shards"
    assert Location("s3://bucket/x").absolute().url == "s3://bucket/x"
    assert DatasetFolder("data").image_store().data_dir == tmp_path / "data"
