"""How the pretrained MVSA recipe was chosen: candidates scored on carves of the training split.

docs/results.md ("How the pretrained recipe was chosen") reports what this prints. For carve
k = 1, 2, 3 the training split of DATA/filtered.parquet (the MVSA dataset folder that
``vsotools run pipelines/mvsa.toml`` writes at ``runs/mvsa/data``) is split again 80/20 by a
hash of (k, photo id); each candidate trains on the 80 (carving 15% of it out for epoch
selection, as every training does) and is scored on the held-out 20. The test split of DATA is
never read. Each candidate is ``pipelines/mvsa.toml``'s ``[train]`` with a few settings changed
(``CANDIDATES``); the figures are the means over the carves.

``--probe`` adds the floor of a logistic regression (scikit-learn, the ``bench`` extra) on the
frozen encoders' features the candidates stored, both branches and each alone, standardised,
C from 0.003 to 1, with and without balanced class weights: the best mean of each.

    .venv/bin/python benchmarks/mvsa_carves.py runs/mvsa/data [--workdir runs/mvsa-carves]
        [--runs tF iF ...] [--probe]

Everything lands in the work folder and a rerun picks up where it stopped: the carves, their
shard sets, one training folder per candidate and carve, and the frozen encoders' features
(``features-K``, shared by the candidates of carve K; ``features-K-tuned`` for those whose text
branch starts from tFT's fine-tuned one). On two CPU cores a frozen candidate takes about a
minute per carve once the features are stored (about two minutes per carve and encoder), a
fine-tuned one about five minutes per carve.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vsotools.core.config import load_recipe
from vsotools.core.files import atomic_open
from vsotools.core.schema import sample_key
from vsotools.dataset.folder import DatasetFolder
from vsotools.shards.manifest import read_manifest
from vsotools.shards.stage import write_shards
from vsotools.training.folder import TrainingFolder, training_inputs
from vsotools.training.train import train

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "mvsa.toml"
CARVES = (1, 2, 3)
HELD_OUT = 0.2
METRICS = ("accuracy", "macro_f1", "roc_auc")
FINE_TUNED = ["train.frozen_branches=", "train.encoder_lr=3e-5"]
JOINT = ["train.frozen_branches=image", "train.encoder_lr=3e-5", "train.dropout=0.5"]
FROM_TFT = ["train.init_text={work}/tFT-{k}/checkpoint.pt", "train.frozen_branches=text,image"]

CANDIDATES: dict[str, tuple[str, list[str]]] = {
    # name: (model, settings over pipelines/mvsa.toml's [train]); in the order of the table.
    "tF": ("text", []),
    "iF": ("image", []),
    "fF": ("fusion", []),
    "fLin": ("fusion", ["train.fc_sizes=", "train.weight_decay=0.01"]),
    "fD5": ("fusion", ["train.dropout=0.5"]),
    "fNoCW": ("fusion", ["train.class_weights=none"]),
    "fW": ("fusion", ["train.weight_decay=0.001", "train.dropout=0.5"]),
    "fLoss": ("fusion", ["train.select=val_loss"]),
    "tFT": ("text", [*FINE_TUNED, "train.epochs=5"]),
    "tFT2": ("text", [*FINE_TUNED, "train.dropout=0.5", "train.epochs=4"]),
    "fFTb": ("fusion", [*FROM_TFT, "train.dropout=0.5"]),
    "fFTbM": ("fusion", [*FROM_TFT, "train.dropout=0.5", "train.modality_dropout=0.25"]),
    "fFTj": ("fusion", [*JOINT, "train.epochs=4"]),
    "fFTjM": ("fusion", [*JOINT, "train.epochs=4", "train.modality_dropout=0.25"]),
}
NEEDS = {"fFTb": "tFT", "fFTbM": "tFT"}


def carve(data: Path, work: Path, k: int) -> Path:
    """Carve k: the training split of ``data``, split again 80/20, as a dataset folder whose
    images are those of ``data``, and its shard set (the same for every candidate, which differ
    in [train] only), whose location this returns."""
    folder = work / f"carve-{k}"
    filtered = DatasetFolder(folder).filtered
    if not filtered.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        images = folder / "images"
        if not images.exists():
            images.symlink_to((data / "images").resolve())
        table = pq.read_table(DatasetFolder(data).filtered)
        table = table.filter(pc.equal(table["split"], "train"))
        splits = [
            "test" if _fraction(f"dev{k}:{photo_id}") < HELD_OUT else "train"
            for photo_id in table["photo_id"].to_pylist()
        ]
        column = table.schema.get_field_index("split")
        with atomic_open(filtered) as fh:  # its presence marks the carve as made
            pq.write_table(table.set_column(column, "split", pa.array(splits)), fh)
    parts = pq.read_table(filtered, columns=["split", "label"]).to_pydict()
    held_out = [label for split, label in zip(*parts.values(), strict=True) if split == "test"]
    majority = max(held_out.count(0), held_out.count(1)) / len(held_out)
    print(
        f"carve {k}: {len(parts['split']) - len(held_out)} training, {len(held_out)} held out"
        f" (majority rate {majority:.3f})"
    )
    shards = work / f"carve-{k}-shards"
    write_shards(load_recipe(RECIPE), folder, shards)
    return shards


def _fraction(text: str) -> float:
    # The same hash as dataset.filter.split_of's, over another key ("devK:ID", not "K\0ID"):
    # split_of would carve other pairs, and the documented figures are for these carves.
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def score(name: str, k: int, shards: Path, work: Path) -> dict:
    """Candidate ``name`` trained on carve k's ``shards`` (or as an earlier run of the same
    settings on the same shards left it): its held-out figures."""
    model, settings = CANDIDATES[name]
    features = work / (f"features-{k}-tuned" if name in NEEDS else f"features-{k}")
    assignments = [
        f"train.model={model}",
        f"train.features_dir={features}",
        *(s.format(work=work, k=k) for s in settings),
    ]
    recipe = load_recipe(RECIPE, assignments)
    folder = TrainingFolder(work / f"{name}-{k}")
    # As `vsotools run` does: a finished training is reused only when it is current.
    status = folder.status(training_inputs(recipe, read_manifest(str(shards)).fingerprint))
    if status.state == "stale":
        sys.exit(f"{folder}: {status.why}; remove it")
    if not status.current:
        train(recipe, shards, folder.root, resume=status.state == "unfinished", progress=False)
    final = folder.read_final()
    assert final is not None
    return final


def probe(work: Path) -> None:
    """The logistic-regression floor on the frozen encoders' stored features."""
    import numpy as np
    import torch

    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        sys.exit("--probe needs scikit-learn: pip install -e '.[bench]'")
    found: dict[tuple[str, int, str | None], list[tuple[float, float, float]]] = {}
    for k in CARVES:
        features = {}
        for branch in ("text", "image"):
            files = sorted((work / f"features-{k}").glob(f"features-{branch}-*.pt"))
            if len(files) != 1:
                sys.exit(f"--probe: expected one {branch} feature file in features-{k}, found "
                         f"{len(files)}; run tF and iF first")  # fmt: skip
            saved = torch.load(files[0], weights_only=True)
            features[branch] = dict(zip(saved["keys"], saved["features"].numpy(), strict=True))
        rows = pq.read_table(work / f"carve-{k}" / "filtered.parquet").to_pylist()
        parts = {split: [r for r in rows if r["split"] == split] for split in ("train", "test")}
        labels = {split: np.array([r["label"] for r in part]) for split, part in parts.items()}
        for branches in (("text",), ("image",), ("text", "image")):

            def inputs(part, branches=branches, features=features):
                keys = [sample_key(r["photo_id"]) for r in part]
                return np.concatenate(
                    [np.stack([features[b][key] for key in keys]) for b in branches], axis=1
                )

            x_train, x_test = inputs(parts["train"]), inputs(parts["test"])
            scaler = StandardScaler().fit(x_train)
            for c in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
                for weights in (None, "balanced"):
                    regression = LogisticRegression(C=c, max_iter=3000, class_weight=weights)
                    regression.fit(scaler.transform(x_train), labels["train"])
                    p = regression.predict_proba(scaler.transform(x_test))[:, 1]
                    y = labels["test"]
                    found.setdefault(("+".join(branches), c, weights), []).append(
                        (
                            accuracy_score(y, p > 0.5),
                            f1_score(y, p > 0.5, average="macro"),
                            roc_auc_score(y, p),
                        )
                    )
    for branches in ("text", "image", "text+image"):
        means = {
            key: [statistics.fmean(run[i] for run in runs) for i in range(3)]
            for key, runs in found.items()
            if key[0] == branches
        }
        best = [max(m[i] for m in means.values()) for i in range(3)]
        print(f"probe {branches}: best mean acc {best[0]:.3f} macroF1 {best[1]:.3f}"
              f" AUC {best[2]:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the MVSA dataset folder (runs/mvsa/data)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/mvsa-carves"))
    parser.add_argument("--runs", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--probe", action="store_true", help="the logistic-regression floor")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not DatasetFolder(args.data).filtered.is_file():
        sys.exit(f"{args.data}: no filtered.parquet; run vsotools run pipelines/mvsa.toml first")
    work = args.workdir.resolve()
    missing = sorted({NEEDS[n] for n in args.runs if n in NEEDS} - set(args.runs))
    if missing:
        sys.exit(f"--runs: fFTb and fFTbM start from tFT's text branch; add {', '.join(missing)}")
    carves = {k: carve(args.data, work, k) for k in CARVES}  # k -> its shard set
    for name in [n for n in CANDIDATES if n in args.runs]:
        runs = [score(name, k, carves[k], work) for k in CARVES]
        for k, final in zip(CARVES, runs, strict=True):
            print(f"{name} carve {k}: acc {final['accuracy']:.3f} macroF1"
                  f" {final['macro_f1']:.3f} AUC {final['roc_auc']:.3f}")  # fmt: skip
        mean = [statistics.fmean(final[m] for final in runs) for m in METRICS]
        print(f"{name} [{CANDIDATES[name][0]}]: mean acc {mean[0]:.3f} macroF1 {mean[1]:.3f}"
              f" AUC {mean[2]:.3f}", flush=True)  # fmt: skip
    if args.probe:
        probe(work)


if __name__ == "__main__":
    main()
