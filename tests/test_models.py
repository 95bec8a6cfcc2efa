"""The fusion CNN and its branches: shapes, and pooling that ignores padding."""

from __future__ import annotations

import pytest
import torch

from vsotools.core.config import TrainConfig
from vsotools.training.models import (
    AlexNetFeatures,
    TextCNN,
    alexnet_output_side,
    build_model,
    drop_modalities,
    masked_max_avg_min,
)


def test_pooling_ignores_positions_past_the_valid_count():
    values = torch.tensor([[[1.0, -2.0, 5.0, 100.0, -100.0]], [[3.0, 3.0, 3.0, 3.0, 3.0]]])
    highest, mean, lowest = masked_max_avg_min(values, torch.tensor([3, 1]))
    assert highest.tolist() == [[5.0], [3.0]]
    torch.testing.assert_close(mean, torch.tensor([[4.0 / 3], [3.0]]))
    assert lowest.tolist() == [[-2.0], [3.0]]


def _text_cnn(widths=(2, 3)) -> TextCNN:
    torch.manual_seed(0)
    embeddings = torch.randn(10, 4)
    embeddings[0] = 0
    return TextCNN(embeddings, list(widths), num_filters=5)


def test_text_features_do_not_depend_on_padding():
    model = _text_cnn()
    sentence = [4, 7, 2, 9]
    short = torch.tensor([sentence + [0] * 2])
    long = torch.tensor([sentence + [0] * 12])
    lengths = torch.tensor([4])
    a, b = model(short, lengths), model(long, lengths)
    assert a.shape == (1, 3 * 5 * 2)
    torch.testing.assert_close(a, b)


def test_text_features_match_pooling_computed_by_hand():
    model = _text_cnn(widths=(3,))
    tokens = torch.tensor([[4, 7, 2, 9, 0, 0, 0]])
    features = model(tokens, torch.tensor([4]))
    conv = torch.relu(model.convs[0](model.embedding(tokens[:, :4]).transpose(1, 2)))[0]
    expected = torch.cat([conv.max(dim=1).values, conv.mean(dim=1), conv.min(dim=1).values])
    torch.testing.assert_close(features[0], expected)


def test_a_sentence_shorter_than_a_filter_still_has_finite_features():
    model = _text_cnn(widths=(3, 5))
    features = model(torch.tensor([[3, 0, 0, 0, 0, 0]]), torch.tensor([1]))
    assert torch.isfinite(features).all()
    # A batch padded only to its longest text (here one token) gives the same features.
    torch.testing.assert_close(model(torch.tensor([[3]]), torch.tensor([1])), features)


def test_word_vectors_are_frozen():
    model = _text_cnn()
    assert not model.embedding.weight.requires_grad
    assert all(p.requires_grad for p in model.convs.parameters())


@pytest.mark.parametrize(("crop", "side"), [(224, 6), (112, 2), (64, 1), (63, 1)])
def test_alexnet_output_side(crop, side):
    assert alexnet_output_side(crop) == side


def test_alexnet_branch_on_224_pixels_gives_alexnet_features():
    branch = AlexNetFeatures([96, 256, 384, 384, 256], 224)
    with torch.no_grad():
        features = branch(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 256 * 6 * 6) == (2, branch.feature_dim)


@pytest.mark.parametrize("kind", ["fusion", "text", "image"])
def test_each_variant_gives_two_logits(kind):
    config = TrainConfig(
        model=kind,
        crop_size=64,
        conv_channels=[4, 8, 8, 8, 8],
        fc_sizes=[16, 16],
        word_dim=6,
        num_filters=3,
        max_words=12,
    )
    model = build_model(config, torch.randn(20, 6) if kind != "image" else None)
    inputs = {
        "tokens": torch.randint(0, 20, (3, 12)),
        "lengths": torch.tensor([12, 5, 1]),
        "images": torch.randn(3, 3, 64, 64),
    }
    assert model(**inputs).shape == (3, 2)
    assert (
        set(model.branches())
        == {"fusion": {"text", "image"}, "text": {"text"}, "image": {"image"}}[kind]
    )
    linear_layers = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert len(linear_layers) == 3
    if kind != "text":
        with pytest.raises(ValueError, match="reads images"):
            model(tokens=inputs["tokens"], lengths=inputs["lengths"])


def test_word_vectors_can_be_tuned_when_asked():
    model = TextCNN(torch.randn(10, 4), [2], num_filters=3, tune_vectors=True)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([3])).sum().backward()
    assert model.embedding.weight.grad is not None
    assert model.embedding.weight.grad[0].abs().sum() == 0  # padding stays zero


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_modality_dropout_drops_one_branch_per_sample_at_most(p):
    torch.manual_seed(0)
    text, image = torch.ones(20_000, 6), torch.ones(20_000, 4)
    kept_text, kept_image = drop_modalities(text, image, p)
    text_gone = kept_text.sum(dim=1) == 0
    image_gone = kept_image.sum(dim=1) == 0
    assert not (text_gone & image_gone).any()
    assert abs(text_gone.float().mean().item() - p) < 0.02
    assert abs(image_gone.float().mean().item() - p) < 0.02
    assert ((kept_text == 0) | (kept_text == 1)).all()  # zeroed whole, never rescaled


def test_modality_dropout_acts_only_in_training():
    config = TrainConfig(
        model="fusion",
        crop_size=64,
        conv_channels=[4, 8, 8, 8, 8],
        fc_sizes=[16],
        word_dim=6,
        num_filters=3,
        dropout=0.0,
        modality_dropout=0.5,
    )
    model = build_model(config, torch.randn(20, 6))
    inputs = {
        "tokens": torch.randint(1, 20, (8, 12)),
        "lengths": torch.full((8,), 12),
        "images": torch.randn(8, 3, 64, 64),
    }
    model.eval()
    assert torch.equal(model(**inputs), model(**inputs))
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(**inputs), model.eval()(**inputs))
