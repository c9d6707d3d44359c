#!/usr/bin/env python
"""Does FCMAE pretraining help? Fashion-MNIST evidence with one command.

    python tools/quality_evidence.py --output-dir output/fmnist --seeds 0 1

Data: Debian's ``dataset-fashion-mnist`` (70 k labeled 28×28 images; installed with apt-get by
this tool if missing and permitted, never by the toolkit at run time). The tool writes the
image trees it needs under OUTPUT/data:

* ``pretrain/``: ``--pretrain-images`` unlabeled train images (FCMAE sees no labels);
* ``labeled/train`` (``--labeled-per-class`` per class) and ``labeled/val`` (held out from
  the train split: the pretraining k-NN monitor and any choice use it);
* ``eval/train`` (= labeled/train) and ``eval/val`` = ``--test-images`` from the official test
  split, used only for the final numbers.

Protocol, per seed, for FCMAE (``convnextv2_atto`` pretrained ``--pretrain-epochs``) and random
init under identical budgets: weighted k-NN (k = 20, cosine, pooled final features), linear
probe (frozen encoder, LayerNorm + linear head) and fine-tuning, all on eval/. Plus a k-NN on
raw pixels. The pretraining log's per-epoch k-NN on labeled/val is the learning curve.
Results: OUTPUT/results.json and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fcmae.knn import knn_accuracy

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output-dir", default="output/fmnist")
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--model", default="convnextv2_atto")
    add("--input-size", type=int, default=96, help="28-px images upscaled: 96 px = 3×3 patches of 32 px")
    add("--mask-ratio", type=float, default=0.6)
    add("--pretrain-images", type=int, default=10_000)
    add("--pretrain-epochs", type=int, default=4)
    add("--pretrain-lr", type=float, default=1e-3)
    add("--batch-size", type=int, default=64)
    add("--labeled-per-class", type=int, default=300)
    add("--val-per-class", type=int, default=100)
    add("--test-images", type=int, default=2_000)
    add("--probe-epochs", type=int, default=3)
    add("--finetune-epochs", type=int, default=3)
    add("--threads", type=int, default=None)
    return parser.parse_args(argv)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as file:
        data = file.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def ensure_dataset() -> None:
    if (SOURCE / "train-images-idx3-ubyte.gz").is_file():
        return
    print("installing Debian's dataset-fashion-mnist (apt-get) ...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    for index, image in enumerate(images):
        folder = root if labels is None else root / CLASSES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{index:05d}.png")


def prepare_data(data: Path, args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Write the trees once (a ``done`` marker); returns the raw arrays for the pixel baseline."""
    ensure_dataset()
    train_x, train_y = read_idx(SOURCE / "train-images-idx3-ubyte.gz"), read_idx(SOURCE / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"), read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")
    order = np.random.default_rng(1234).permutation(len(train_x))       # fixed split, independent of --seeds
    labeled, val = [], []
    for label in range(10):
        of_class = order[train_y[order] == label]
        labeled += list(of_class[:args.labeled_per_class])
        val += list(of_class[args.labeled_per_class:args.labeled_per_class + args.val_per_class])
    taken = set(labeled) | set(val)
    pretrain = [index for index in order if index not in set(val)][:args.pretrain_images]
    test = np.random.default_rng(4321).permutation(len(test_x))[:args.test_images]
    arrays = {"train_x": train_x[labeled], "train_y": train_y[labeled], "test_x": test_x[test], "test_y": test_y[test]}
    if not (data / "done").exists():
        shutil.rmtree(data, ignore_errors=True)
        write_tree(data / "pretrain", train_x[pretrain], None)
        write_tree(data / "labeled" / "train", train_x[labeled], train_y[labeled])
        write_tree(data / "labeled" / "val", train_x[val], train_y[val])
        write_tree(data / "eval" / "val", test_x[test], test_y[test])
        (data / "eval" / "train").symlink_to(Path("..", "labeled", "train"), target_is_directory=True)
        counts = {"pretrain": len(pretrain), "labeled": len(labeled), "val": len(val), "test": len(test),
                  "pretrain_also_labeled": len(taken & set(pretrain))}
        (data / "done").write_text(json.dumps(counts))
    return arrays


def run(command: list[str], log: Path) -> str:
    """Run a command to completion, its stderr kept in ``log``; returns stderr."""
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return result.stderr


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def pixel_knn(arrays: dict[str, np.ndarray]) -> float:
    def features(x):
        return F.normalize(torch.from_numpy(x.reshape(len(x), -1)).float(), dim=1)
    return knn_accuracy(features(arrays["train_x"]), torch.from_numpy(arrays["train_y"]).long(),
                        features(arrays["test_x"]), torch.from_numpy(arrays["test_y"]).long(), k=20)


def evaluate(weights: str, seed: int, out: Path, data: Path, args: argparse.Namespace, common: list[str]) -> dict:
    """k-NN, linear probe and fine-tune of one initialisation on eval/ (test split as val)."""
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    knn_log = run(["fcmae-knn", weights, "--data-path", str(data / "eval"), "--input-size", str(args.input_size),
                   "--eval-crop-pct", "1.0", "--num-workers", "1", "--seed", str(seed)], out / "knn.log")
    knn = float(knn_log.split("top-1 ")[1].split("%")[0])
    finetune_args = ["--model", args.model, "--data-path", str(data / "eval"), "--input-size", str(args.input_size),
                     "--batch-size", str(args.batch_size), "--seed", str(seed), "--num-workers", "1",
                     "--eval-crop-pct", "1.0", "--crop-min-scale", "0.5", "--aa", "", "--reprob", "0",
                     "--mixup", "0", "--cutmix", "0", "--no-model-ema", "--warmup-epochs", "0.5",
                     "--log-level", "warning", *threads, *common]
    init = [] if weights.startswith("random:") else ["--finetune", weights]
    results = {"knn": knn}
    for mode, epochs, extra in (("probe", args.probe_epochs, ["--linear-probe", "--lr", "1e-3", "--weight-decay", "0"]),
                                ("finetune", args.finetune_epochs, ["--lr", "1e-3", "--drop-path", "0"])):
        folder = out / mode
        run(["fcmae-finetune", *finetune_args, *init, *extra, "--epochs", str(epochs), "--output-dir", str(folder),
             "--resume", "auto"], out / f"{mode}.log")
        results[mode] = [r for r in records(folder) if "acc1" in r][-1]["acc1"]
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.output_dir)
    data = root / "data"
    arrays = prepare_data(data, args)
    results = {"settings": vars(args), "pixel_knn": pixel_knn(arrays), "runs": []}
    threads = ["--threads", str(args.threads)] if args.threads else []
    for seed in args.seeds:
        pre = root / f"pretrain-seed{seed}"
        run(["fcmae-pretrain", "--model", args.model, "--data-path", str(data / "pretrain"),
             "--input-size", str(args.input_size), "--mask-ratio", str(args.mask_ratio),
             "--batch-size", str(args.batch_size), "--lr", str(args.pretrain_lr), "--warmup-epochs", "1",
             "--epochs", str(args.pretrain_epochs), "--seed", str(seed), "--num-workers", "1", "--vis-every", "0",
             "--knn-data-path", str(data / "labeled"), "--monitor-max-images", "1000", "--output-dir", str(pre),
             "--resume", "auto", "--log-level", "warning", *threads], pre.with_suffix(".log"))
        curve = [(r["epoch"] + 1, r["knn_top1"]) for r in records(pre) if "knn_top1" in r]
        for init, weights in (("fcmae", str(pre / "checkpoint-last.pth")), ("random", f"random:{args.model}")):
            scores = evaluate(weights, seed, root / f"{init}-seed{seed}", data, args, [])
            results["runs"].append({"seed": seed, "init": init, **scores,
                                    **({"knn_val_curve": curve} if init == "fcmae" else {})})
            print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| test top-1 (%), mean ± spread over seeds | FCMAE | random init |", "|---|---|---|"]
    for metric, name in (("knn", "k-NN (k=20) on pooled features"), ("probe", "linear probe"),
                         ("finetune", "fine-tune")):
        cells = []
        for init in ("fcmae", "random"):
            values = [run[metric] for run in results["runs"] if run["init"] == init]
            spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines.append(f"| k-NN on raw pixels (28×28) | {results['pixel_knn']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
