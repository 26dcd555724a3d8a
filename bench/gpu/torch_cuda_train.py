#!/usr/bin/env python3
"""PyTorch CUDA side of the GPU training-throughput comparison against dai-train's wgpu backend.

The same training loop as bench/torch_train.py (imported from there), on
device "cuda", with torch.cuda.synchronize() before each clock read. Runs every
configuration below on synthetic data and prints ONE JSON line per configuration:

  {"model": "mlp", "sizes": [64, 64, 32, 10], "batch": 32, "optimizer": "sgd",
   "samples_per_sec": ..., "final_loss": ..., "torch": "2.x", "device": "cuda", "gpu": "...", ...}

Configurations (models x batches x optimizers):
  mlp   64-64-32-10  relu,relu,none
  head  384-256-10   relu,none
  batches 32, 256, 1024 (--batches); optimizers sgd (--optimizers sgd,adam for both)

Usage:
  python3 bench/gpu/torch_cuda_train.py [--batches 32,256,1024] [--optimizers sgd]
      [--samples 16384] [--epochs 5] [--lr 0.05] [--momentum 0.9] [--seed 0]

Exit status: 0 ok, 1 no CUDA device, 2 torch missing (or bad command-line usage).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/, for torch_train

from torch_train import (  # noqa: E402
    OPTIMIZERS,
    BenchError,
    import_torch,
    positive_float,
    positive_int,
    synthetic_data,
    train,
)

MODELS = (
    ("mlp", [64, 64, 32, 10], ["relu", "relu", "none"]),
    ("head", [384, 256, 10], ["relu", "none"]),
)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def optimizer_list(text: str) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in OPTIMIZERS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(OPTIMIZERS)}, got {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time PyTorch CUDA training of the benchmark MLP and head.")
    ap.add_argument("--batches", type=int_list, default=[32, 256, 1024])
    ap.add_argument("--optimizers", type=optimizer_list, default=["sgd"])
    ap.add_argument("--samples", type=positive_int, default=16384, help="synthetic samples per epoch")
    ap.add_argument("--epochs", type=positive_int, default=5, help="timed epochs (after 1 untimed warm-up epoch)")
    ap.add_argument("--lr", type=positive_float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (ignored by adam)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads for the host side")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    torch = import_torch()
    if not torch.cuda.is_available():
        raise BenchError(
            f"torch {torch.__version__} sees no CUDA device (CPU-only wheel, or driver too old for "
            f"its CUDA {torch.version.cuda}); check nvidia-smi and reinstall torch"
        )
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(0)
    results = []
    for name, sizes, activations in MODELS:
        x, y = synthetic_data(args.samples, sizes[0], sizes[-1], args.seed)
        for optimizer in args.optimizers:
            for batch in args.batches:
                measured = train(torch, x, y, sizes=sizes, activations=activations, optimizer=optimizer,
                                 lr=args.lr, momentum=args.momentum, batch=batch, epochs=args.epochs,
                                 seed=args.seed, device="cuda")
                row = {
                    "model": name,
                    "sizes": sizes,
                    "activations": activations,
                    "batch": batch,
                    "optimizer": optimizer,
                    "lr": args.lr,
                    "momentum": args.momentum if optimizer == "sgd" else None,
                    "data": f"synthetic:{args.samples}",
                    "samples": measured["samples"],
                    "epochs": args.epochs,
                    "seconds": measured["seconds"],
                    "samples_per_sec": measured["samples_per_sec"],
                    "final_loss": measured["final_loss"],
                    "torch": torch.__version__,
                    "cuda": torch.version.cuda,
                    "device": "cuda",
                    "gpu": gpu,
                    "threads": args.threads,
                }
                print(json.dumps(row), flush=True)
                results.append(row)
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchError as e:
        print(f"torch_cuda_train: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"torch_cuda_train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
