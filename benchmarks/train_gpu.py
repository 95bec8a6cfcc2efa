"""Fusion training throughput on a GPU: the device's ceiling (synthetic tensors) against what the
loader allows (shards, CPU JPEG decode in workers, and GPU decode when torchvision is present).

It prints an estimate first (FLOPs per training sample counted by torch, and what the GPU's
measured bf16 matmul rate would allow at 40% of it), then measures:

- ``synthetic``: training steps (bf16 autocast, channels-last) on a pinned uint8 batch;
- ``shards, N workers``: the same steps fed by ``ShardStream`` from pre-resized shards;
- ``shards, GPU decode``: the same with ``train.gpu_decode`` (torchvision.io.decode_jpeg).

If the shard rate is well below the synthetic rate, training is loader-bound: add workers (CPU
cores), or decode on the GPU. On a machine with a GPU::

    .venv/bin/python benchmarks/train_gpu.py --workers 4,8,14 --json $OUT/train_gpu.json

``--smoke`` runs every measurement at a tiny size on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from train_cpu import (
    flops_per_sample,
    make_shards,
    matmul_flops,
    paper_config,
    setup,
    shard_rate,
    synthetic_batch,
    synthetic_rate,
)

from vsotools.core.config import TrainConfig


def smoke_config(**changes) -> TrainConfig:
    settings = {
        "crop_size": 64,
        "conv_channels": [8, 16, 16, 16, 16],
        "fc_sizes": [32, 32],
        "word_dim": 16,
        "num_filters": 8,
        "batch_size": 20,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", default="4,8", help="comma-separated loader worker counts")
    parser.add_argument("--batches", default="100,256", help="batch sizes for the synthetic rate")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()

    if args.smoke:
        device = torch.device("cpu")
        make_config = smoke_config
        steps, warmup = 2, 1
        matmul_dtype, matmul_size = torch.float32, 256
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke to check the script on a CPU")
            return 1
        device = torch.device("cuda")
        make_config = paper_config
        steps, warmup = args.steps, args.warmup
        matmul_dtype, matmul_size = torch.bfloat16, 8192
    workers_list = [int(w) for w in args.workers.split(",")]
    batch_sizes = [int(b) for b in args.batches.split(",")]
    figures: dict = {"device": str(device), "torch": torch.__version__, "cores": os.cpu_count()}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)

    # --- the estimate, before measuring anything ---
    config = make_config(device=device.type)
    s = setup(config, device)
    flops = flops_per_sample(s, synthetic_batch(config, config.batch_size))
    reference = matmul_flops(device, matmul_dtype, matmul_size, 3.0)
    estimate = 0.4 * reference / flops
    figures.update(flops_per_sample=flops, matmul_flops=reference, estimate_samples_s=estimate)
    print(f"{figures.get('gpu', device)}; torch {torch.__version__}; {os.cpu_count()} CPU cores")
    print(f"counted: {flops / 1e9:.2f} GFLOP per training sample (forward + backward)")
    print(f"reference: {matmul_dtype} {matmul_size}^2 matmul {reference / 1e12:.1f} TFLOP/s")
    print(f"estimate: at 40% of that, {estimate:,.0f} samples/s")

    # --- the device's ceiling ---
    figures["synthetic"] = {}
    for batch_size in batch_sizes:
        config = make_config(device=device.type, batch_size=batch_size)
        s = setup(config, device)
        rate = synthetic_rate(s, synthetic_batch(config, batch_size), steps, warmup)
        figures["synthetic"][batch_size] = rate
        print(f"synthetic, batch {batch_size:<4}        {rate:10,.0f} samples/s")

    # --- what the loader allows ---
    figures["shards"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(device=device.type)
        samples = config.batch_size * (steps + warmup)
        source, shards, vocab = make_shards(Path(tmp), samples)
        print(f"shards: {samples} samples from {source}, {len(shards)} shards")
        ceiling = figures["synthetic"].get(config.batch_size)
        runs = [(w, False) for w in workers_list]
        if has_torchvision() and device.type == "cuda":
            runs += [(w, True) for w in workers_list]
        for workers, gpu_decode in runs:
            config = make_config(device=device.type, workers=workers, gpu_decode=gpu_decode)
            s = setup(config, device)
            rate = shard_rate(s, config, shards, vocab, workers, steps, warmup)
            name = f"shards, {workers} workers" + (", GPU decode" if gpu_decode else "")
            figures["shards"][name] = rate
            share = f" = {rate / ceiling:.2f} of synthetic" if ceiling else ""
            print(f"{name:<30} {rate:10,.0f} samples/s{share}")
        if not has_torchvision():
            print("GPU decode not measured: torchvision is not installed")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
