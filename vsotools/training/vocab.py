"""The text model's vocabulary and its static word vectors.

Tokens are ``vsotools.core.text.tokenize`` tokens (optionally lower-cased, and optionally with tweet
mentions and hashtags normalised), so the vocabulary follows the same idea of a token as the word
bounds of ``filter``. A ``Vocabulary`` maps tokens to ids: 0 is padding, 1 stands for every token
outside the vocabulary. Word vectors are trained with gensim's Word2Vec on the training texts, or
read from a file the user gives; vocabulary words without a vector get a random one. The final
matrix is saved with a run as a word2vec binary file, which ``train.word_vectors`` reads back.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from vsotools.core import text as text_rules
from vsotools.core.config import TrainConfig
from vsotools.core.errors import ConfigError

_SPACE = re.compile(r"\s+")

PAD = 0
UNK = 1
SPECIALS = ("<pad>", "<unk>")


MENTION = "@user"
HASH = "#"


def model_tokens(text: str, lowercase: bool, tweets: bool = False) -> list[str]:
    """The tokens the text model reads for ``text``.

    Whitespace inside a token (TweetTokenizer keeps ``. . .`` whole) is removed: a word in a
    word2vec file cannot hold a space. With ``tweets``, every ``@mention`` becomes ``@user`` and
    a hashtag becomes two tokens, ``#`` and its word (``#happy`` -> ``#``, ``happy``), so that
    a word reads the same with or without its hash and handles do not crowd the vocabulary.
    """
    tokens = [_SPACE.sub("", t) for t in text_rules.tokenize(text)]
    if tweets:
        tokens = list(_tweet_tokens(tokens))
    return [t.lower() for t in tokens] if lowercase else tokens


def _tweet_tokens(tokens: list[str]) -> Iterable[str]:
    for token in tokens:
        if len(token) > 1 and token[0] == "@":
            yield MENTION
        elif len(token) > 1 and token[0] == "#":
            yield HASH
            yield token[1:]
        else:
            yield token


class Vocabulary:
    """Token <-> id, with ``<pad>`` at 0 and ``<unk>`` at 1."""

    def __init__(self, words: Sequence[str], lowercase: bool, tweets: bool = False):
        """``words`` are the vocabulary's own words (without the two specials), in id order;
        ``lowercase`` and ``tweets`` are ``model_tokens``'s rules."""
        self.words: list[str] = [*SPECIALS, *words]
        self.lowercase = lowercase
        self.tweets = tweets
        self.index = {word: i for i, word in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be unique")

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.words == other.words
            and self.lowercase == other.lowercase
            and self.tweets == other.tweets
        )

    def encode(self, text: str, max_words: int) -> list[int]:
        """Ids of the first ``max_words`` tokens of ``text`` (unpadded)."""
        tokens = model_tokens(text, self.lowercase, self.tweets)[:max_words]
        return [self.index.get(t, UNK) for t in tokens]

    @classmethod
    def build(
        cls,
        token_lists: Iterable[list[str]],
        min_count: int,
        lowercase: bool,
        tweets: bool = False,
    ) -> Vocabulary:
        """Every token seen at least ``min_count`` times, most frequent first (ties by text);
        ``lowercase`` and ``tweets`` record the rules that made the tokens."""
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        kept = [w for w, c in counts.items() if c >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(kept, lowercase, tweets)


def stable_hash(word: str) -> int:
    """Python's ``hash`` of a string changes between processes; word2vec's seeding must not."""
    return zlib.crc32(word.encode("utf-8"))


def train_word2vec(sentences: list[list[str]], config: TrainConfig):
    """gensim KeyedVectors trained on ``sentences`` with the recipe's word2vec settings.

    One worker thread and a stable hash make the vectors the same on every run with one seed.
    """
    from gensim.models import Word2Vec

    model = Word2Vec(
        sentences=sentences,
        vector_size=config.word_dim,
        window=config.w2v_window,
        min_count=config.w2v_min_count,
        sg=1 if config.w2v_algorithm == "skipgram" else 0,
        epochs=config.w2v_epochs,
        seed=config.seed,
        workers=1,
        hashfxn=stable_hash,
    )
    return model.wv


def load_word_vectors(path: str | Path, word_dim: int):
    """Vectors from a gensim KeyedVectors file or a word2vec binary or text file."""
    from gensim.models import KeyedVectors

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.word_vectors: {path} not found")
    with path.open("rb") as fh:
        head = fh.read(2)
    try:
        if head[:1] == b"\x80":  # a pickle: gensim's own KeyedVectors.save format
            vectors = KeyedVectors.load(str(path))
        else:
            vectors = _load_word2vec_format(path)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"train.word_vectors: cannot read {path} ({exc})") from None
    if vectors.vector_size != word_dim:
        raise ConfigError(
            f"train.word_vectors: {path} holds {vectors.vector_size}-d vectors"
            f" but train.word_dim is {word_dim}"
        )
    return vectors


def _load_word2vec_format(path: Path):
    from gensim.models import KeyedVectors

    # Text first: a binary file fails that parse on its first vector (bytes that are not
    # UTF-8, or not dim numbers), while a text file can pass as binary and yield garbage.
    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=False)
    except (ValueError, UnicodeDecodeError, EOFError):
        return KeyedVectors.load_word2vec_format(str(path), binary=True)


def embedding_matrix(
    vocab: Vocabulary,
    vectors,
    word_dim: int,
    oov_scale: float,
    seed: int,
    drop_components: int = 0,
):
    """``(len(vocab), word_dim)`` float32 tensor: zeros for padding, a vector per word.

    Words that ``vectors`` lacks (and ``<unk>``) get a vector drawn uniformly from
    ``[-oov_scale, oov_scale]``, from a generator seeded by ``seed``. With ``drop_components``
    k > 0, the given vectors lose their mean and their top k principal directions, and are
    scaled so that their entries spread like the random ones.
    """
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(-oov_scale, oov_scale, size=(len(vocab), word_dim)).astype(np.float32)
    known = [
        (i, word)
        for i, word in enumerate(vocab.words[len(SPECIALS) :], start=len(SPECIALS))
        if vectors is not None and word in vectors.key_to_index
    ]
    if known:
        rows = np.stack([vectors[word] for _, word in known]).astype(np.float32)
        if drop_components:
            rows = all_but_the_top(rows, drop_components, target_std=oov_scale / np.sqrt(3))
        matrix[[i for i, _ in known]] = rows
    matrix[PAD] = 0.0
    return torch.from_numpy(matrix)


def all_but_the_top(rows: np.ndarray, components: int, target_std: float) -> np.ndarray:
    """``rows`` without their mean and top ``components`` principal directions, scaled so that
    their entries have standard deviation ``target_std``."""
    centred = rows - rows.mean(axis=0, keepdims=True)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    top = directions[:components]
    kept = centred - (centred @ top.T) @ top
    spread = float(np.sqrt((kept**2).mean()))
    return (kept * (target_std / spread) if spread > 0 else kept).astype(np.float32)


def count_known(vocab: Vocabulary, vectors) -> int:
    """How many vocabulary words (specials aside) ``vectors`` has."""
    return sum(1 for w in vocab.words[len(SPECIALS) :] if w in vectors.key_to_index)


def save_word_vectors(vocab: Vocabulary, matrix: torch.Tensor, path: str | Path) -> None:
    """Write the vocabulary's vectors (specials aside) as a word2vec binary file, atomically.

    The format: a ``"count dim"`` header line, then per word its UTF-8 text, a space and ``dim``
    little-endian float32 values. gensim's ``load_word2vec_format(binary=True)`` reads it.
    """
    from vsotools.core.files import atomic_open

    words = vocab.words[len(SPECIALS) :]
    rows = matrix[len(SPECIALS) :].to(torch.float32).numpy().astype("<f4")
    with atomic_open(path, "wb") as fh:
        fh.write(f"{len(words)} {matrix.shape[1]}\n".encode())
        for word, row in zip(words, rows, strict=True):
            fh.write(word.encode("utf-8") + b" " + row.tobytes() + b"\n")
