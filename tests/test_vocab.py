"""The vocabulary and the static word vectors: building, training, files in and out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsotools.core.config import TrainConfig
from vsotools.core.errors import ConfigError
from vsotools.training.vocab import (
    PAD,
    UNK,
    Vocabulary,
    all_but_the_top,
    embedding_matrix,
    load_word_vectors,
    model_tokens,
    save_word_vectors,
    train_word2vec,
)

SENTENCES = [
    model_tokens(t, lowercase=True)
    for t in ["Happy day at the beach :)", "the SAD rainy day", "happy happy cat", "sad cat"] * 5
]


def test_tokens_are_the_project_tokens_lowercased():
    tokens = model_tokens("Great Day! #sunny :)", lowercase=True)
    assert tokens == ["great", "day", "!", "#sunny", ":)"]
    assert model_tokens("Great", lowercase=False) == ["Great"]


def test_tweet_tokens_share_mentions_and_split_hashtags():
    text = "RT @JoeyXcv: so #Happy today, happy @ home #"
    assert model_tokens(text, lowercase=True, tweets=True) == [
        "rt", "@user", ":", "so", "#", "happy", "today", ",", "happy", "@", "home", "#",
    ]  # fmt: skip
    vocab = Vocabulary.build([model_tokens(text, True, True)], 1, lowercase=True, tweets=True)
    assert vocab.encode("#HAPPY @someone_else", 10) == [
        vocab.index[t] for t in ("#", "happy", "@user")
    ]
    assert vocab != Vocabulary(vocab.words[2:], lowercase=True)  # the rules are part of it


def test_vocabulary_orders_by_frequency_and_maps_unknown_words():
    vocab = Vocabulary.build(SENTENCES, min_count=5, lowercase=True)
    assert vocab.words[:2] == ["<pad>", "<unk>"]
    assert vocab.words[2] in ("happy", "day", "the", "cat", "sad")  # the most frequent first
    assert "beach" in vocab.index  # seen 5 times
    ids = vocab.encode("Happy zebra", max_words=10)
    assert ids == [vocab.index["happy"], UNK]
    assert len(vocab.encode("cat " * 30, max_words=7)) == 7


def test_word2vec_is_the_same_on_every_run():
    config = TrainConfig(word_dim=8, w2v_epochs=3)
    a, b = train_word2vec(SENTENCES, config), train_word2vec(SENTENCES, config)
    np.testing.assert_array_equal(a["happy"], b["happy"])
    assert a.vector_size == 8


def test_embedding_matrix_pads_with_zeros_and_draws_missing_words(tmp_path):
    vocab = Vocabulary(["happy", "zebra"], lowercase=True)
    vectors = train_word2vec(SENTENCES, TrainConfig(word_dim=8, w2v_epochs=1))
    matrix = embedding_matrix(vocab, vectors, 8, oov_scale=0.25, seed=1)
    assert matrix.shape == (4, 8) and matrix.dtype == torch.float32
    assert (matrix[PAD] == 0).all()
    np.testing.assert_array_equal(matrix[2].numpy(), vectors["happy"])
    assert 0 < matrix[3].abs().max() <= 0.25  # zebra: random, within the scale


def test_saved_vectors_read_back_through_gensim(tmp_path):
    vocab = Vocabulary(["happy", "naïve", "🙂"], lowercase=True)
    matrix = torch.randn(5, 6)
    save_word_vectors(vocab, matrix, tmp_path / "v.bin")
    loaded = load_word_vectors(tmp_path / "v.bin", 6)
    assert loaded.index_to_key == ["happy", "naïve", "🙂"]
    np.testing.assert_allclose(loaded["🙂"], matrix[4].numpy())


def test_text_and_keyedvectors_files_are_read_too(tmp_path):
    vectors = train_word2vec(SENTENCES, TrainConfig(word_dim=4, w2v_epochs=1))
    vectors.save_word2vec_format(str(tmp_path / "v.txt"), binary=False)
    vectors.save(str(tmp_path / "v.kv"))
    for name in ("v.txt", "v.kv"):
        loaded = load_word_vectors(tmp_path / name, 4)
        np.testing.assert_allclose(loaded["happy"], vectors["happy"], rtol=1e-5)


def test_a_vector_file_of_the_wrong_size_or_kind_is_refused(tmp_path):
    (tmp_path / "v.txt").write_text("1 3\nhappy 0.1 0.2 0.3\n")
    with pytest.raises(ConfigError, match=r"3-d vectors but train.word_dim is 200"):
        load_word_vectors(tmp_path / "v.txt", 200)
    (tmp_path / "junk.txt").write_text("this is not a vector file\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_word_vectors(tmp_path / "junk.txt", 3)
    with pytest.raises(ConfigError, match="not found"):
        load_word_vectors(tmp_path / "missing.bin", 3)


def test_tokens_with_inner_spaces_survive_the_word2vec_file(tmp_path):
    tokens = model_tokens("wait . . . what", lowercase=True)
    assert tokens == ["wait", "...", "what"]
    vocab = Vocabulary(tokens, lowercase=True)
    save_word_vectors(vocab, torch.randn(5, 3), tmp_path / "v.bin")
    assert load_word_vectors(tmp_path / "v.bin", 3).index_to_key == tokens


def test_all_but_the_top_removes_the_common_direction():
    rng = np.random.default_rng(0)
    common = rng.normal(size=8)
    rows = np.outer(rng.uniform(1, 3, size=50), common) + 0.01 * rng.normal(size=(50, 8))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert np.abs(unit @ unit.T).mean() > 0.99  # nearly parallel, as word2vec on little text
    kept = all_but_the_top(rows.astype(np.float32), 1, target_std=0.1)
    unit = kept / np.linalg.norm(kept, axis=1, keepdims=True)
    assert np.abs(unit @ unit.T).mean() < 0.5
    np.testing.assert_allclose(kept.mean(axis=0), 0, atol=1e-5)
    assert np.sqrt((kept**2).mean()) == pytest.approx(0.1, rel=1e-4)
