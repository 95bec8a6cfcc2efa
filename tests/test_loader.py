"""The streaming shard loader on real tar shards: the split by rank and worker, fixed-length
epochs, decoding, and the device step."""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from shardkit import write_shard_set
from webdataset.tariterators import group_by_keys, tar_file_expander

from vsotools.core.errors import VsoError
from vsotools.shards.errors import ShardError
from vsotools.shards.manifest import read_manifest, shard_urls
from vsotools.training.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMover,
    KeepValidation,
    LoaderError,
    SampleDecoder,
    Shard,
    ShardStream,
    check_shard_count,
    crop_boxes,
    is_validation,
    make_loader,
    raise_errors,
    read_samples,
    share,
    split_shards,
    steps_per_epoch,
)
from vsotools.training.vocab import Vocabulary


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    # 7 train shards of uneven size (the last has 20), 2 test shards.
    return write_shard_set(tmp_path_factory.mktemp("shards"), train=200, test=50, per_shard=30)


def shards_of(root: Path, split: str) -> list[Shard]:
    manifest = read_manifest(str(root))
    urls = shard_urls(str(root), manifest, split)
    return [Shard(u, s.samples) for u, s in zip(urls, manifest.shards(split), strict=True)]


def keys_of(root: Path, split: str) -> list[str]:
    return [s["__key__"] for s in read_samples(shards_of(root, split), skip_images=True)]


def text_decoder(train: bool = False) -> SampleDecoder:
    return SampleDecoder(text=Vocabulary(["the"], True), max_tokens=8, crop_size=None, train=train)


def test_split_by_rank_and_worker_is_a_partition_every_epoch():
    shards = [Shard(f"s{i}", 10) for i in range(13)]
    for epoch in range(3):
        seen = Counter()
        for rank in range(2):
            for worker in range(3):
                part = split_shards(
                    shards, rank=rank, world_size=2, worker=worker, num_workers=3,
                    epoch=epoch, seed=1, shuffle=True,
                )  # fmt: skip
                assert part  # 13 shards >= 6 slots: nobody idles
                seen.update(s.url for s in part)
        assert seen == Counter(s.url for s in shards)


def test_shard_shuffle_changes_with_the_epoch_but_not_between_calls():
    shards = [Shard(f"s{i}", 10) for i in range(20)]
    args = {"rank": 0, "world_size": 1, "worker": 0, "num_workers": 1, "seed": 5, "shuffle": True}
    assert split_shards(shards, epoch=0, **args) == split_shards(shards, epoch=0, **args)
    assert split_shards(shards, epoch=0, **args) != split_shards(shards, epoch=1, **args)


def test_too_few_shards_for_ranks_times_workers_is_refused_with_the_numbers():
    check_shard_count(4, 2, 2, "train")
    with pytest.raises(LoaderError, match=r"3 shard\(s\) but .* 2 process\(es\) x 2 loader"):
        check_shard_count(3, 2, 2, "train")


def test_share_and_steps_per_epoch():
    assert share(10, [30, 30, 20]) == [4, 4, 2]
    assert sum(share(7, [5, 1, 1, 9])) == 7
    assert steps_per_epoch(1000, 100, 2) == 5
    assert steps_per_epoch(50, 100, 1) == 1


def test_an_evaluation_stream_over_ranks_and_workers_reads_every_sample_once(shard_set):
    seen: Counter[str] = Counter()
    for rank in range(2):
        stream = ShardStream(
            shards_of(shard_set, "train"), text_decoder(), batch_size=16, rank=rank, world_size=2
        )
        for batch in make_loader(stream, num_workers=2, pin_memory=False):
            seen.update(batch["keys"])
    assert seen == Counter(keys_of(shard_set, "train"))


def test_training_epochs_have_the_same_steps_on_every_rank_and_cover_the_split(tmp_path):
    # Even shards: 8 x 25 samples, 2 ranks x 2 workers, batches of 25: each sample once per epoch.
    root = write_shard_set(tmp_path / "even", train=200, test=25, per_shard=25)
    steps = steps_per_epoch(200, 25, 2)
    for epoch in range(2):
        seen: Counter[str] = Counter()
        for rank in range(2):
            stream = ShardStream(
                shards_of(root, "train"), text_decoder(train=True), batch_size=25, rank=rank,
                world_size=2, steps=steps, seed=3, shuffle_buffer=10,
            )  # fmt: skip
            stream.set_epoch(epoch)
            batches = list(make_loader(stream, num_workers=2, pin_memory=False))
            assert len(batches) == steps == 4
            assert all(len(b["keys"]) == 25 for b in batches)
            seen.update(k for b in batches for k in b["keys"])
        assert seen == Counter(keys_of(root, "train"))


@pytest.mark.parametrize("loader_workers", [0, 1, 3])
def test_a_plain_dataloader_reads_every_shard_whatever_its_worker_count(tmp_path, loader_workers):
    """Bug: the stream kept its own worker count (set from train.workers), corrected only by a
    side effect of make_loader; a plain DataLoader with another count silently read a quarter
    of a 4-shard split (20 of 80 samples), even with the manifest check on."""
    root = write_shard_set(tmp_path / "four", train=80, test=20, per_shard=20)
    shards = shards_of(root, "train")
    assert len(shards) == 4
    evaluation = ShardStream(shards, text_decoder(), batch_size=8)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=None, num_workers=loader_workers)
    keys = [k for batch in loader for k in batch["keys"]]
    assert Counter(keys) == Counter(keys_of(root, "train"))
    training = ShardStream(shards, text_decoder(train=True), batch_size=8, steps=10, seed=2)
    loader = torch.utils.data.DataLoader(training, batch_size=None, num_workers=loader_workers)
    assert sum(1 for _ in loader) == 10

    # The stream of a split as training builds it, from a recipe that asks for 4 workers.
    from vsotools.core.config import Recipe
    from vsotools.training.data import ModelInput, ShardSet, split_stream
    from vsotools.training.distributed import Context

    config = Recipe().override({"train.workers": 4, "train.model": "text"}).train
    vocab = Vocabulary(["happy", "sad"], lowercase=True)
    context = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    stream = split_stream(
        ShardSet.open(str(root)), "train", ModelInput.of(config, vocab), config, context
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=loader_workers)
    assert sorted(k for batch in loader for k in batch["keys"]) == sorted(keys_of(root, "train"))


def test_a_rank_with_less_data_still_runs_every_step(shard_set):
    # 200 samples, the last shard short: each rank runs 200 // (16 x 2) = 6 full batches.
    steps = steps_per_epoch(200, 16, 2)
    counts = []
    for rank in range(2):
        stream = ShardStream(
            shards_of(shard_set, "train"), text_decoder(train=True), batch_size=16, rank=rank,
            world_size=2, steps=steps, seed=0, shuffle_buffer=20,
        )  # fmt: skip
        counts.append(sum(1 for _ in make_loader(stream, num_workers=2, pin_memory=False)))
    assert counts == [steps, steps]


def test_validation_carve_is_deterministic_and_disjoint(shard_set):
    keys = keys_of(shard_set, "train")
    val = [k for k in keys if is_validation(k, 7, 0.25)]
    assert val == [k for k in keys if is_validation(k, 7, 0.25)]
    assert 0.1 < len(val) / len(keys) < 0.4
    keep_val, keep_fit = KeepValidation(7, 0.25, True), KeepValidation(7, 0.25, False)
    assert all(keep_val(k) != keep_fit(k) for k in keys)


def test_decoded_training_images_are_uint8_crops_and_texts_are_padded_ids(shard_set):
    vocab = Vocabulary(["happy", "sad", "the"], lowercase=True)
    decoder = SampleDecoder(text=vocab, max_tokens=6, crop_size=64, train=True, scale_jitter=0.2)
    stream = ShardStream(shards_of(shard_set, "test"), decoder, batch_size=10, steps=2, seed=1)
    batch = next(iter(make_loader(stream, num_workers=1, pin_memory=False)))
    assert batch["images"].shape == (10, 64, 64, 3) and batch["images"].dtype == torch.uint8
    assert batch["tokens"].dtype == torch.int32
    assert batch["tokens"].shape == (10, max(batch["lengths"])) and max(batch["lengths"]) <= 6
    for row, length in zip(batch["tokens"], batch["lengths"], strict=True):
        assert (row[length:] == 0).all() and (row[:length] > 0).all()
    assert batch["labels"].dtype == torch.int64


def test_evaluation_crop_is_the_centre_and_does_not_flip():
    pixels = np.arange(80 * 72 * 3, dtype=np.uint32).reshape(72, 80, 3) % 251
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    sample = {"__key__": "k", "cls": b"1", "jpg": buffer.getvalue()}
    decoder = SampleDecoder(text=None, max_tokens=4, crop_size=64, train=False)
    crop = decoder(sample, random.Random(0))["image"]
    np.testing.assert_array_equal(crop, pixels[4:68, 8:72].astype(np.uint8))


def test_larger_images_give_the_crop_of_the_decode_side():
    """Shards of a larger image_size than the model's decode side (128 for 112-pixel crops)
    give the same evaluation crop, resized: the model sees what it was trained on."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8))
    decoder = SampleDecoder(text=None, max_tokens=4, crop_size=112, train=False)
    crops = []
    for side in (128, 150):  # 150: no DCT scale brings it to 128
        image = small.resize((side * 20 // 16, side), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        sample = {"__key__": "k", "cls": b"0", "jpg": buffer.getvalue()}
        crops.append(decoder(sample, random.Random(0))["image"].astype(np.float32))
    assert crops[0].shape == crops[1].shape == (112, 112, 3)
    assert np.abs(crops[0] - crops[1]).mean() < 6


def test_the_text_model_never_decodes_an_image(tmp_path):
    path = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "1", "jpg": b"not a jpeg at all", "txt": b"the cat", "cls": b"0"})
    samples = list(read_samples([Shard(str(path), 1)], skip_images=True))
    assert "jpg" not in samples[0]
    decoded = text_decoder()(samples[0], random.Random(0))
    assert decoded["tokens"] == [2, 1] and "image" not in decoded


def test_a_bad_image_names_its_shard_and_key(tmp_path):
    path = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "77", "jpg": b"not a jpeg", "txt": b"x", "cls": b"0"})
    decoder = SampleDecoder(text=None, max_tokens=4, crop_size=64, train=False)
    stream = ShardStream([Shard(str(path), 1)], decoder, batch_size=1)
    # Decoded in a loader worker process, the error still arrives as one line.
    with pytest.raises(LoaderError) as raised:
        list(raise_errors(make_loader(stream, 1, pin_memory=False)))
    assert str(raised.value).startswith(f"{path}: sample 77: not_an_image")
    assert "\n" not in str(raised.value)


def test_a_missing_shard_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match="shard not found"):
        list(read_samples([Shard(str(tmp_path / "train-000009.tar"), 1)]))


def test_shards_are_read_through_fsspec_urls(shard_set):
    urls = [Shard("file://" + s.url, s.samples) for s in shards_of(shard_set, "test")]
    assert [s["__key__"] for s in read_samples(urls, skip_images=True)] == keys_of(
        shard_set, "test"
    )


def test_the_device_step_normalises_and_keeps_channels_last():
    images = torch.full((2, 8, 8, 3), 128, dtype=torch.uint8)
    mover = BatchMover(torch.device("cpu"), crop_size=8, channels_last=True)
    inputs = mover.inputs({"images": images, "labels": torch.tensor([0, 1])}, train=False)
    x = inputs["images"]
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(expected))


def test_colour_jitter_changes_training_images_only():
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    mover = BatchMover(torch.device("cpu"), crop_size=8, color_jitter=0.4, seed=1)
    batch = {"images": images, "labels": torch.zeros(4, dtype=torch.int64)}
    plain = BatchMover(torch.device("cpu"), crop_size=8).inputs(batch, train=False)["images"]
    torch.testing.assert_close(mover.inputs(batch, train=False)["images"], plain)
    assert not torch.allclose(mover.inputs(batch, train=True)["images"], plain)


def test_gpu_decoding_without_torchvision_says_how_to_install_it():
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed here")
    mover = BatchMover(torch.device("cpu"), crop_size=8)
    batch = {
        "jpegs": [torch.zeros(4, dtype=torch.uint8)],
        "boxes": torch.zeros(1, 4, dtype=torch.int64),
    }
    with pytest.raises(VsoError, match=r"needs torchvision.io: pip install .vsotools\[gpu\]."):
        mover.inputs(batch, train=False)


@pytest.mark.parametrize(("side", "crop"), [(256, 224), (256, 112)])
def test_gpu_decode_boxes_crop_what_the_cpu_path_crops(side, crop):
    """The worker's box plus ``crop_boxes`` (what runs after torchvision's GPU decode) give the
    CPU path's evaluation crop; here the full-size decode is Pillow's."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(side, side + 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    sample = {"__key__": "k", "cls": b"0", "jpg": buffer.getvalue()}
    cpu = SampleDecoder(text=None, max_tokens=4, crop_size=crop, train=False)
    gpu = SampleDecoder(text=None, max_tokens=4, crop_size=crop, train=False, gpu_decode=True)
    expected = torch.from_numpy(np.array(cpu(sample, random.Random(0))["image"]))
    expected = expected.permute(2, 0, 1).float()
    box = gpu(sample, random.Random(0))["box"]
    full = torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)
    got = crop_boxes([full], [list(box)], crop)[0]
    assert got.shape == expected.shape == (3, crop, crop)
    # Equal at full scale; at half scale, JPEG's DCT downscale and a bilinear resize agree
    # only roughly.
    tolerance = 0.5 if side == crop * 8 // 7 else 20
    assert (got - expected).abs().mean() <= tolerance


def test_gpu_decode_refuses_what_the_cpu_path_refuses():
    """The GPU path reads the header only, through the CPU path's check: bytes that are not an
    image used to escape as Pillow's own error instead of the sample's LoaderError."""
    sample = {"__key__": "k", "cls": b"0", "jpg": b"not an image", "__url__": "s.tar"}
    for gpu_decode in (False, True):
        decoder = SampleDecoder(
            text=None, max_tokens=4, crop_size=8, train=False, gpu_decode=gpu_decode
        )
        with pytest.raises(LoaderError, match=r"s\.tar: sample k: not_an_image"):
            decoder(sample, random.Random(0))


@pytest.mark.parametrize(
    "tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]
)
def test_the_tar_reader_agrees_with_webdataset(tmp_path, tar_format):
    path = tmp_path / "train-000000.tar"
    members = []
    for i in range(3):
        key = f"sub/{'x' * 120 if tar_format != tarfile.USTAR_FORMAT else 'k'}{i}"
        members += [
            (f"{key}.jpg", os.urandom(700 + i)),
            (f"{key}.txt", b"caf\xc3\xa9"),
            (f"{key}.cls", b"1"),
        ]
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = list(read_samples([Shard(str(path), 3)]))
    with open(path, "rb") as stream:
        theirs = list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert {k: a[k] for k in ("jpg", "txt", "cls")} == {k: b[k] for k in ("jpg", "txt", "cls")}
    without_images = list(read_samples([Shard(str(path), 3)], skip_images=True))
    assert [sorted(s) for s in without_images] == [["__key__", "__url__", "cls", "txt"]] * 3


def test_a_corrupt_shard_is_a_shard_error(tmp_path):
    path = tmp_path / "train-000000.tar"
    path.write_bytes(b"x" * 2048)
    with pytest.raises(ShardError, match=r"train-000000.tar: cannot read the shard \(not a tar"):
        list(read_samples([Shard(str(path), 1)]))
