"""Training throughput on the CPU: the paper's networks against the pretrained encoders,
fine-tuned and frozen, in one run.

Each row is samples per second of whole training steps (forward, loss, backward, Adam) on
synthetic batches already in memory, as the loader hands them over (uint8 crops, token ids
padded to the batch's longest): the step alone, what the machine allows. The rows:

- ``paper fusion``: Kim's CNN + the AlexNet-like branch at the paper's sizes (224 crops,
  [96, 256, 384, 384, 256] convolutions, 4096-wide head): the reference every other row is a
  ratio to;
- ``pretrained fusion, fine-tuned``: MiniLM + EfficientNet-Lite0 both training, head [256];
- ``pretrained fusion, frozen encoders run``: both encoders frozen but run every step (what a
  frozen encoder costs without stored features);
- ``pretrained fusion, frozen, stored features``: both frozen, their features read from a
  ``FeatureStore`` (what ``train.frozen_branches`` does);
- ``fusion: MiniLM fine-tuned, image stored``: what ``pipelines/mvsa.toml``'s fusion trains;
- ``text: MiniLM fine-tuned`` and ``image: EfficientNet-Lite0 fine-tuned``: one branch each.

    .venv/bin/python benchmarks/train_encoders.py [--batch 32] [--steps 3] [--threads 2]

Needs the ``pretrained`` extra. Text lengths follow tweets (8 to 40 subword tokens).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from vsotools.core.config import TrainConfig
from vsotools.training import encoders
from vsotools.training.features import FeatureStore
from vsotools.training.loader import BatchMover
from vsotools.training.models import build_model

VOCAB = 20_000


def batch_of(size: int, crop: int, max_tokens: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, max_tokens, (size,), generator=generator)
    tokens = torch.randint(1000, VOCAB, (size, int(lengths.max())), generator=generator)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    images = torch.randint(0, 256, (size, crop, crop, 3), dtype=torch.uint8, generator=generator)
    return {
        "keys": [str(i) for i in range(size)],
        "labels": torch.randint(0, 2, (size,), generator=generator),
        "tokens": tokens,
        "lengths": lengths,
        "images": images,
    }


def model_for(config: TrainConfig) -> nn.Module:
    torch.manual_seed(0)
    text = image = None
    if encoders.is_pretrained(config, "text"):
        text = encoders.load_text(config)[0]
    if encoders.is_pretrained(config, "image"):
        image = encoders.load_image(config)
    embeddings = torch.randn(VOCAB, config.word_dim) * 0.1
    return build_model(config, embeddings, text=text, image=image)


def rate(
    model: nn.Module,
    batch: dict,
    mover: BatchMover,
    steps: int,
    frozen: tuple[str, ...] = (),
    store: FeatureStore | None = None,
) -> float:
    """Samples per second of ``steps`` training steps after one warm-up step."""
    for name in frozen:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for name in frozen:
        getattr(model, name).eval()
    if store is not None:  # stored features replace the stored branches' inputs
        dropped = {"text": ("tokens", "lengths"), "image": ("images",)}
        gone = {k for branch in store.branches for k in dropped[branch]}
        batch = {k: v for k, v in batch.items() if k not in gone}

    def step() -> None:
        inputs = mover.inputs(batch, train=True)
        if store is not None:
            inputs.update(store.inputs(batch["keys"], mover.device))
        loss = criterion(model(**inputs), mover.labels(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["labels"]) / (time.perf_counter() - started)


def stored_features(
    model: nn.Module, batch: dict, mover: BatchMover, branches: tuple[str, ...] = ("text", "image")
) -> FeatureStore:
    """The frozen encoders' features of the batch, as ``training.features`` would store them."""
    inputs = mover.inputs(batch, train=False)
    keys = batch["keys"]
    model.eval()
    with torch.no_grad():
        matrices = {}
        if "text" in branches:
            matrices["text"] = model.text(inputs["tokens"], inputs["lengths"])
        if "image" in branches:
            matrices["image"] = model.image(inputs["images"])
    rows = {key: row for row, key in enumerate(keys)}
    return FeatureStore({name: rows for name in matrices}, matrices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    crop = 224
    batch = batch_of(args.batch, crop, max_tokens=40)
    pretrained = dict(text_encoder="minilm", image_encoder="efficientnet_lite0", fc_sizes=[256])

    rows: list[tuple[str, float]] = []
    paper = TrainConfig(model="fusion", device="cpu")
    rows.append(
        ("paper fusion (reference)", rate(model_for(paper), batch, _mover(paper), args.steps))
    )
    config = TrainConfig(model="fusion", device="cpu", **pretrained)
    mover = _mover(config)
    rows.append(
        ("pretrained fusion, fine-tuned", rate(model_for(config), batch, mover, args.steps))
    )
    rows.append(
        (
            "pretrained fusion, frozen encoders run",
            rate(model_for(config), batch, mover, args.steps, frozen=("text", "image")),
        )
    )
    model = model_for(config)
    store = stored_features(model, batch, mover)
    rows.append(
        (
            "pretrained fusion, frozen, stored features",
            rate(model, batch, mover, args.steps, frozen=("text", "image"), store=store),
        )
    )
    model = model_for(config)
    store = stored_features(model, batch, mover, ("image",))
    rows.append(
        (
            "fusion: MiniLM fine-tuned, image stored",
            rate(model, batch, mover, args.steps, frozen=("image",), store=store),
        )
    )
    text = TrainConfig(model="text", device="cpu", **pretrained)
    rows.append(("text: MiniLM fine-tuned", rate(model_for(text), batch, _mover(text), args.steps)))
    image = TrainConfig(model="image", device="cpu", **pretrained)
    rows.append(
        (
            "image: EfficientNet-Lite0 fine-tuned",
            rate(model_for(image), batch, _mover(image), args.steps),
        )
    )

    reference = rows[0][1]
    print(f"batch {args.batch}, {args.steps} steps, {args.threads} threads, 224-pixel crops")
    print(f"{'':44}{'samples/s':>10}{'x paper':>9}")
    for name, value in rows:
        print(f"{name:44}{value:>10.1f}{value / reference:>9.2f}")


def _mover(config: TrainConfig) -> BatchMover:
    mean, std = encoders.image_normalisation(config)
    return BatchMover(torch.device("cpu"), crop_size=config.crop_size, mean=mean, std=std)


if __name__ == "__main__":
    main()
