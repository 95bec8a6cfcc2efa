"""The training checkpoint: what a run saves, how it is written, and how a model comes back.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so that
``torch.load(path, weights_only=True)`` reads it::

    format, version       "vsotools-checkpoint", 1
    model_type            "fusion" | "text" | "image"
    recipe                the resolved recipe as TOML text
    vocab, lowercase      the text model's words in id order (with <pad>, <unk>), or None
    tweet_tokens          whether mentions and hashtags were normalised (absent: no)
    model                 state dict (the word vectors are its text.embedding.weight)
    optimizer, scheduler  state dicts
    epoch, step           epochs finished, optimizer steps taken
    steps_per_epoch, world_size
    rng                   python, torch and CUDA generator states
    history               one dict per finished epoch (what RUN/metrics.jsonl holds)
    selection             the model-selection state (best score, its epoch, epochs since)
    shards                the fingerprint of the shard set it trained on (absent: unknown)
    starts                the sha256 of the checkpoints its branches started from (init_text,
                          init_image; absent: unknown)

A training folder keeps two (``training.folder``): ``last.pt``, the state after the last
finished epoch (what a resumed training reads), and ``checkpoint.pt``, the selected model (the
last epoch's, or the best on the validation split), a hard link to the ``last.pt`` of the epoch
that was selected. ``training.state.TrainState`` assembles the dict (with ``model_entries``) and
restores itself from it; the readers below take it apart.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import torch

from vsotools.core.config import Recipe, recipe_from_dict, recipe_to_toml
from vsotools.core.errors import VsoError
from vsotools.core.extras import first_line
from vsotools.core.files import UnsafeFile, open_regular_file
from vsotools.training import encoders
from vsotools.training.minilm import TextTokenizer
from vsotools.training.models import SentimentNet, build_model
from vsotools.training.vocab import SPECIALS, Vocabulary

FORMAT = "vsotools-checkpoint"
VERSION = 1


class CheckpointError(VsoError):
    """A checkpoint is missing, unreadable or not a vsotools checkpoint."""


def model_entries(
    recipe: Recipe, model: SentimentNet, reader: Vocabulary | TextTokenizer | None
) -> dict[str, Any]:
    """The keys of a checkpoint that describe the model alone (its type, recipe, how it reads
    text, its weights): what ``model_of`` needs. ``training.state.TrainState.to_checkpoint``
    adds the training's state to them."""
    words = reader if isinstance(reader, Vocabulary) else None
    text_spec = None
    if isinstance(reader, TextTokenizer):
        text_spec = encoders.text_spec(model.text, reader)  # type: ignore[arg-type]
    return {
        "model_type": recipe.train.model,
        "recipe": recipe_to_toml(recipe),
        "vocab": words.words if words is not None else None,
        "lowercase": words.lowercase if words is not None else recipe.train.lowercase,
        "tweet_tokens": words.tweets if words is not None else recipe.train.tweet_tokens,
        "text_spec": text_spec,
        "model": model.state_dict(),
    }


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (with the format stamp) through a temporary file and ``os.replace``."""
    from vsotools.core.files import atomic_open

    with atomic_open(path, "wb") as fh:
        sink = _ErrorKeepingWriter(fh)
        try:
            torch.save({"format": FORMAT, "version": VERSION, **state}, sink)
        except RuntimeError:
            # torch reports a failed write as "unexpected pos ..."; say what really failed
            # (a full disk: "No space left on device").
            if sink.error is not None:
                raise sink.error from None
            raise


class _ErrorKeepingWriter:
    """A file to write that keeps the first OSError its ``write`` raised."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.raw.flush()


def publish(source: str | Path, target: str | Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link; a copy where links fail),
    atomically: ``target`` is never missing or partial."""
    source, target = Path(source), Path(target)
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(source, target):
            # Already so; and rename() of one link of a file over another link of the same file
            # does nothing, which would leave the temporary link behind.
            return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def load_weights_file(path: str | Path) -> Any:
    """Whatever a torch file holds (read with ``weights_only=True`` onto the CPU): a vsotools
    checkpoint or, for ``train.init_image``, a plain state dict."""
    path = Path(path)
    try:
        with open_regular_file(path) as fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except UnsafeFile as exc:
        raise CheckpointError(f"the checkpoint {exc.detail}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None


def is_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU."""
    state = load_weights_file(path)
    if not is_checkpoint(state):
        raise CheckpointError(f"{path}: not a vsotools checkpoint")
    return checked_version(state, path)


def checked_version(state: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r}; this vsotools reads {VERSION}"
        )
    return state


def recipe_of(state: dict[str, Any]) -> Recipe:
    """The resolved recipe a checkpoint was trained with."""
    text = state.get("recipe")
    if not isinstance(text, str):
        raise CheckpointError("the checkpoint holds no recipe (TOML text)")
    try:
        return recipe_from_dict(tomllib.loads(text), base_dir=Path("/"))
    except (tomllib.TOMLDecodeError, VsoError) as exc:
        raise CheckpointError(
            f"the checkpoint's recipe is unreadable ({first_line(exc)})"
        ) from None


def vocabulary_of(state: dict[str, Any]) -> Vocabulary | None:
    words = state.get("vocab")
    if words is None:
        return None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise CheckpointError("the checkpoint's vocabulary is not a list of words")
    return Vocabulary(
        words[len(SPECIALS) :],
        lowercase=bool(state.get("lowercase", True)),
        tweets=bool(state.get("tweet_tokens", False)),
    )


def model_of(
    state: dict[str, Any],
) -> tuple[SentimentNet, Recipe, Vocabulary | TextTokenizer | None]:
    """The trained model (on the CPU, in eval mode), its recipe, and what turns its text into
    token ids (the Kim CNN's vocabulary or a pretrained encoder's tokenizer; None: no text).

    Nothing is downloaded or read from a weight package: a pretrained encoder is built from the
    description the checkpoint keeps (MiniLM needs ``transformers`` for that) and gets the
    trained weights from the state dict.
    """
    recipe = recipe_of(state)
    config = recipe.train
    reader: Vocabulary | TextTokenizer | None = vocabulary_of(state)
    kim_cnn = encoders.has_branch(config, "text") and not encoders.is_pretrained(config, "text")
    if reader is None and kim_cnn:
        raise CheckpointError(
            f"the checkpoint's {config.model} model reads text but holds no vocabulary"
        )
    embeddings = None if reader is None else torch.zeros(len(reader), config.word_dim)
    text = image = None
    if encoders.is_pretrained(config, "text"):
        if not state.get("text_spec"):
            raise CheckpointError("the checkpoint's MiniLM text branch has no description")
        try:
            text, reader = encoders.text_from_spec(state["text_spec"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"the checkpoint's MiniLM text branch has an unreadable description"
                f" ({type(exc).__name__}: {first_line(exc)})"
            ) from None
    if encoders.is_pretrained(config, "image"):
        image = encoders.blank_image()
    model = build_model(config, embeddings, text=text, image=image)
    _load_weights(model, state.get("model"), config.model)
    model.eval()
    return model, recipe, reader


def _load_weights(model: SentimentNet, weights: Any, kind: str) -> None:
    """Load a checkpoint's state dict into ``model``, refusing one that does not fit it or
    holds weights that are not numbers (a training that diverged): such a model would score
    every input NaN."""
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise CheckpointError("the checkpoint's model is not a state dict of tensors")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint's weights do not fit its {kind} model ({first_line(exc)})"
        ) from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"the checkpoint's weight {name} holds NaN or infinite values")


def load_model(
    path: str | Path,
) -> tuple[SentimentNet, Recipe, Vocabulary | TextTokenizer | None]:
    """``model_of`` the checkpoint file at ``path``; a checkpoint that loads but does not hold
    a model vsotools can rebuild is refused in one line naming the file."""
    state = load_checkpoint(path)
    try:
        return model_of(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state["cuda"])
