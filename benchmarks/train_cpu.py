"""Training throughput of the fusion model (paper sizes, batch 100), on synthetic tensors and
from shards, with the FLOPs of a step counted by torch and a dense matmul as the reference.

- synthetic: uint8 images and token ids already in memory; the training step alone (what the
  device allows);
- shards: the real loader (``ShardStream`` with workers) feeding the same step (what the loader
  allows);
- reference: float32 (or bf16 on GPU) matrix multiplication FLOP/s measured in the same run, so
  ``utilisation = model FLOP/s / matmul FLOP/s`` can be compared across machines.

    .venv/bin/python benchmarks/train_cpu.py [--steps 3] [--workers 1] [--small]

``--small`` uses the small recipe (112-pixel crops, half-width convolutions, 1024-wide head).
``benchmarks/train_gpu.py`` runs the same measurements on a GPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vsotools.core.config import TrainConfig
from vsotools.training.inference import autocast, autocast_dtype
from vsotools.training.loader import BatchMover, SampleDecoder, ShardStream, make_loader
from vsotools.training.models import build_model
from vsotools.training.vocab import Vocabulary

VOCAB_SIZE = 20_000
MEAN_WORDS = 20


def paper_config(**changes) -> TrainConfig:
    return TrainConfig(**changes)


def small_config(**changes) -> TrainConfig:
    settings = {
        "crop_size": 112,
        "conv_channels": [48, 128, 192, 192, 128],
        "fc_sizes": [1024, 1024],
    }
    settings.update(changes)
    return TrainConfig(**settings)


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    mover: BatchMover
    dtype: torch.dtype | None


def setup(config: TrainConfig, device: torch.device) -> Setup:
    torch.manual_seed(0)
    embeddings = torch.randn(VOCAB_SIZE, config.word_dim) * 0.1
    model = build_model(config, embeddings).to(device)
    channels_last = device.type == "cuda" and config.channels_last
    if channels_last:
        model.image.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mover = BatchMover(device, crop_size=config.crop_size, channels_last=channels_last)
    return Setup(model, optimizer, mover, autocast_dtype(config.precision, device))


def synthetic_batch(config: TrainConfig, batch: int) -> dict:
    """A uint8 batch as the loader gives it: images (N, H, W, 3), tokens padded to the longest."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 2 * MEAN_WORDS, (batch,), generator=generator)
    tokens = torch.randint(2, VOCAB_SIZE, (batch, int(lengths.max())), generator=generator)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    size = config.crop_size
    return {
        "images": torch.randint(
            0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator
        ),
        "tokens": tokens.to(torch.int32),
        "lengths": lengths,
        "labels": torch.randint(0, 2, (batch,), generator=generator),
    }


def train_step(s: Setup, batch: dict) -> torch.Tensor:
    inputs = s.mover.inputs(batch, train=True)
    labels = s.mover.labels(batch)
    with autocast(s.mover.device, s.dtype):
        logits = s.model(**inputs)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    return loss


def flops_per_sample(s: Setup, batch: dict) -> float:
    """FLOPs of one training step (forward and backward), per sample, counted by torch."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(s, batch)
    return counter.get_total_flops() / len(batch["labels"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_rate(s: Setup, batch: dict, steps: int, warmup: int) -> float:
    """Samples/s of training steps on a batch already in (pinned) host memory."""
    if s.mover.device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    for _ in range(warmup):
        train_step(s, batch)
    synchronize(s.mover.device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(s, batch)
    synchronize(s.mover.device)
    return steps * len(batch["labels"]) / (time.perf_counter() - started)


def shard_rate(
    s: Setup, config: TrainConfig, shards, vocab: Vocabulary, workers: int, steps: int, warmup: int
) -> float:
    """Samples/s of training steps fed by the real loader from shards."""
    decoder = SampleDecoder(
        text=vocab,
        max_tokens=config.max_words,
        crop_size=config.crop_size,
        train=True,
        gpu_decode=config.gpu_decode,
    )
    stream = ShardStream(
        shards,
        decoder,
        batch_size=config.batch_size,
        steps=steps + warmup,
        seed=0,
        shuffle_buffer=500,
    )
    loader = make_loader(stream, workers, pin_memory=s.mover.device.type == "cuda")
    samples = 0
    started = 0.0
    for index, batch in enumerate(loader):
        if index == warmup:
            synchronize(s.mover.device)
            started = time.perf_counter()
        train_step(s, batch)
        if index >= warmup:
            samples += len(batch["labels"])
    synchronize(s.mover.device)
    return samples / (time.perf_counter() - started)


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Dense ``size x size`` matrix multiplication FLOP/s: the machine's reference."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10:
            continue
        synchronize(device)
    synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def make_shards(root: Path, samples: int):
    """Pre-resized shards (shorter side 256) from real photos when present; their vocabulary."""
    from train_loader import source_pairs, write_shards

    from vsotools.core import text
    from vsotools.training.vocab import model_tokens

    source, pairs = source_pairs(samples)
    shards = write_shards(root, pairs, per_shard=max(1, samples // 8))
    vocab = Vocabulary.build((model_tokens(text.clean_text(t), True) for _, t, _ in pairs), 1, True)
    return source, shards, vocab


def report(name: str, rate: float, flops: float, reference: float) -> None:
    achieved = rate * flops
    print(
        f"{name:<28} {rate:9.1f} samples/s  {achieved / 1e9:9.1f} GFLOP/s"
        f"  = {achieved / reference:.3f} of the matmul reference"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="the small recipe's sizes")
    parser.add_argument("--no-shards", action="store_true", help="synthetic tensors only")
    args = parser.parse_args()

    device = torch.device("cpu")
    config = (small_config if args.small else paper_config)(device="cpu", workers=args.workers)
    s = setup(config, device)
    batch = synthetic_batch(config, config.batch_size)
    flops = flops_per_sample(s, batch)
    print(f"threads {torch.get_num_threads()}, cores {os.cpu_count()}, torch {torch.__version__}")
    print(
        f"fusion model, crop {config.crop_size}, convs {config.conv_channels},"
        f" head {config.fc_sizes}, batch {config.batch_size}"
    )
    print(f"counted: {flops / 1e9:.2f} GFLOP per training sample (forward + backward)")
    reference = matmul_flops(device, torch.float32, 1024, 3.0)
    print(f"reference: float32 1024x1024 matmul {reference / 1e9:.1f} GFLOP/s")
    report("synthetic tensors", synthetic_rate(s, batch, args.steps, args.warmup), flops, reference)
    if not args.no_shards:
        with tempfile.TemporaryDirectory() as tmp:
            samples = config.batch_size * (args.steps + args.warmup)
            source, shards, vocab = make_shards(Path(tmp), samples)
            rate = shard_rate(s, config, shards, vocab, args.workers, args.steps, args.warmup)
            report(f"shards ({args.workers} worker(s))", rate, flops, reference)
            print(f"shards: {samples} samples from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
