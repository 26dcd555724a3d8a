#!/usr/bin/env python3
"""PyTorch (CPU) side of the training-throughput comparison against dai-train.

Trains a small MLP (Linear layers with an activation after each) with
cross-entropy loss on the digits data set (models/data/digits.csv.gz) or on
synthetic random data, and reports training throughput as ONE JSON line:

  {"torch": "2.x", "threads": 1, "batch": 32, "optimizer": "sgd",
   "samples_per_sec": ..., "epochs": 5, "final_loss": ..., ...}

Timing: one untimed warm-up epoch, then `--epochs` epochs timed together with
time.perf_counter. Each epoch shuffles with torch.randperm (fixed generator)
and walks the shuffled data in mini-batches by slicing (the last batch may be
smaller): zero_grad, forward, loss, backward, step. samples_per_sec is
epochs * samples / seconds. final_loss is the mean cross-entropy over the
whole data set after training, computed outside the timed region.

Usage:
  python3 bench/torch_train.py --sizes 64,64,32,10 --activations relu,relu,none \
      --optimizer sgd --lr 0.05 --momentum 0.9 --batch 32 --epochs 5 --threads 1 \
      [--data models/data/digits.csv.gz | --synthetic N] [--seed 0]

Needs numpy and torch (pip install torch); the data loading needs numpy only.
Exit status: 0 ok, 1 bad input or data, 2 torch missing (or bad command-line usage).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "models" / "data" / "digits.csv.gz"
ACTIVATIONS = ("relu", "gelu", "none")
OPTIMIZERS = ("sgd", "adam")
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_sizes(text: str) -> list[int]:
    """'64,64,32,10' -> [64, 64, 32, 10]: input width, hidden widths, classes."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise BenchError(f"--sizes must be comma-separated integers, got {text!r}") from e
    if len(sizes) < 2:
        raise BenchError(f"--sizes needs at least an input and an output size, got {text!r}")
    if any(s < 1 for s in sizes):
        raise BenchError(f"--sizes must all be >= 1, got {text!r}")
    return sizes


def parse_activations(text: str, n_layers: int) -> list[str]:
    """One activation per Linear layer (the last is usually 'none': logits)."""
    acts = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in acts if a not in ACTIVATIONS]
    if bad:
        raise BenchError(f"unknown activation(s) {', '.join(bad)}; choose from {', '.join(ACTIVATIONS)}")
    if len(acts) != n_layers:
        raise BenchError(f"--activations needs {n_layers} entries (one per Linear layer), got {len(acts)}")
    return acts


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time PyTorch CPU training of a small MLP.")
    ap.add_argument("--sizes", default="64,64,32,10", help="layer widths, input first (default 64,64,32,10)")
    ap.add_argument("--activations", default="relu,relu,none",
                    help="one per Linear layer: relu, gelu (tanh approximation) or none (default relu,relu,none)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    ap.add_argument("--lr", type=positive_float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (ignored by adam)")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--epochs", type=positive_int, default=5, help="timed epochs (after 1 untimed warm-up epoch)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and synthetic data")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, default=None, help=f"digits CSV(.gz) (default {DEFAULT_DATA})")
    src.add_argument("--synthetic", type=positive_int, metavar="N", default=None,
                     help="use N random samples of width sizes[0] with random labels instead")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- data (numpy only)


def load_digits_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the digits CSV (optionally gzip'd): 64 pixel columns 0..16, then the label 0..9.

    Returns (x, y): x float32 of shape (N, 64) scaled by 1/16 into [0, 1],
    y int64 of shape (N,).
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"data file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            raw = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {path} as a numeric CSV: {e}") from e
    if raw.shape[0] == 0 or raw.shape[1] != DIGITS_FEATURES + 1:
        raise BenchError(f"{path}: expected rows of {DIGITS_FEATURES + 1} columns, got shape {raw.shape}")
    feats, labels = raw[:, :DIGITS_FEATURES], raw[:, DIGITS_FEATURES]
    if np.any(feats < 0) or np.any(feats > 16) or np.any(feats != np.round(feats)):
        raise BenchError(f"{path}: features must be integers in 0..16")
    if np.any(labels != np.round(labels)) or np.any(labels < 0) or np.any(labels >= DIGITS_CLASSES):
        raise BenchError(f"{path}: labels must be integers in 0..{DIGITS_CLASSES - 1}")
    x = (feats / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    return x, y


def synthetic_data(n: int, in_features: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N standard-normal float32 samples and uniform random labels, deterministic per seed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_features), dtype=np.float32)
    y = rng.integers(0, n_classes, size=n, dtype=np.int64)
    return x, y


def load_data(args: argparse.Namespace, sizes: list[int]) -> tuple[np.ndarray, np.ndarray, str]:
    """The (x, y, description) the arguments ask for, checked against the layer sizes."""
    if args.synthetic is not None:
        x, y = synthetic_data(args.synthetic, sizes[0], sizes[-1], args.seed)
        return x, y, f"synthetic:{args.synthetic}"
    path = args.data if args.data is not None else DEFAULT_DATA
    x, y = load_digits_csv(path)
    if sizes[0] != x.shape[1]:
        raise BenchError(f"--sizes starts with {sizes[0]} but the data has {x.shape[1]} features")
    if sizes[-1] < DIGITS_CLASSES:
        raise BenchError(f"--sizes ends with {sizes[-1]} but the data has {DIGITS_CLASSES} classes")
    return x, y, f"digits:{Path(path).name}"


# ---------------------------------------------------------------- torch


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"PyTorch is not installed ({e}); pip install torch") from e
    return torch


def build_model(torch, sizes: list[int], activations: list[str]):
    layers = []
    for i, act in enumerate(activations):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if act == "relu":
            layers.append(torch.nn.ReLU())
        elif act == "gelu":
            layers.append(torch.nn.GELU(approximate="tanh"))
    return torch.nn.Sequential(*layers)


def build_optimizer(torch, name: str, params, lr: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)  # betas (0.9, 0.999), eps 1e-8: as dai-train


def train(torch, x_np: np.ndarray, y_np: np.ndarray, *, sizes: list[int], activations: list[str],
          optimizer: str, lr: float, momentum: float, batch: int, epochs: int, seed: int,
          device: str = "cpu") -> dict:
    """Warm-up epoch, then `epochs` timed epochs; returns the measured numbers.

    On a CUDA device the clock is read only after torch.cuda.synchronize(), so
    queued kernels are inside the timed region.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    torch.manual_seed(seed)
    model = build_model(torch, sizes, activations).to(dev)
    opt = build_optimizer(torch, optimizer, model.parameters(), lr, momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(np.ascontiguousarray(x_np)).to(dev)
    y = torch.from_numpy(np.ascontiguousarray(y_np)).to(dev)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same order on every device

    def epoch() -> None:
        perm = torch.randperm(n, generator=gen).to(dev)
        xs, ys = x[perm], y[perm]
        for start in range(0, n, batch):
            xb, yb = xs[start:start + batch], ys[start:start + batch]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()

    model.train()
    epoch()  # warm-up, untimed
    sync()
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync()
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        model.eval()
        final_loss = float(loss_fn(model(x), y).item())

    return {
        "samples": int(n),
        "seconds": round(seconds, 6),
        "samples_per_sec": round(epochs * n / seconds, 1),
        "final_loss": round(final_loss, 6),
    }


def run(args: argparse.Namespace) -> dict:
    sizes = parse_sizes(args.sizes)
    activations = parse_activations(args.activations, len(sizes) - 1)
    x, y, data_desc = load_data(args, sizes)
    torch = import_torch()
    torch.set_num_threads(args.threads)
    measured = train(torch, x, y, sizes=sizes, activations=activations, optimizer=args.optimizer,
                     lr=args.lr, momentum=args.momentum, batch=args.batch, epochs=args.epochs,
                     seed=args.seed, device="cpu")
    return {
        "torch": torch.__version__,
        "device": "cpu",
        "threads": args.threads,
        "sizes": sizes,
        "activations": activations,
        "batch": args.batch,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum if args.optimizer == "sgd" else None,
        "data": data_desc,
        "samples": measured["samples"],
        "epochs": args.epochs,
        "seconds": measured["seconds"],
        "samples_per_sec": measured["samples_per_sec"],
        "final_loss": measured["final_loss"],
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as e:
        print(f"torch_train: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"torch_train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
