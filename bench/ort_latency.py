#!/usr/bin/env python3
"""ONNX Runtime side of the latency comparison against DAI.

Runs one model on fixed inputs and reports per-call latency of session.run
as a single JSON line on stdout:

  {"ort_version": ..., "iters": N, "p50_ms": ..., "p95_ms": ..., "mean_ms": ..., "min_ms": ...}

Inputs come from a safetensors file whose tensors named `in.<onnx input name>`
are fed to the model (e.g. the fixtures written by tests/fixtures/make_reference.py);
other tensors in the file are ignored. `--outputs` names the ONNX outputs to
fetch, so ORT computes the same subgraph as the runtime under test.

With `--profile`, onnxruntime's own profiler (SessionOptions.enable_profiling)
is on and the line also holds "profile": per-operator kernel time of the
timed runs (the warm-up runs' events are dropped), by the kernel's op_name
(after ORT's graph fusions, e.g. FusedConv), per run in ms:

  "profile": {"runs": N, "run_ms": ..., "nodes_ms": ...,
              "by_op": [{"op": ..., "nodes": ..., "ms": ..., "share": ...}, ...]}

Usage:
  python3 bench/ort_latency.py --model PATH --inputs FILE.safetensors \
      --outputs NAME[,NAME] --warmup N --iters N [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


class BenchError(Exception):
    pass


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time onnxruntime session.run on fixed inputs.")
    ap.add_argument("--model", required=True, type=Path, help="ONNX model file")
    ap.add_argument("--inputs", required=True, type=Path, help="safetensors file with in.<name> tensors")
    ap.add_argument("--outputs", required=True, help="comma-separated ONNX output names to fetch")
    ap.add_argument("--warmup", required=True, type=non_negative_int, help="untimed runs before measuring")
    ap.add_argument("--iters", required=True, type=positive_int, help="timed runs")
    ap.add_argument("--threads", type=positive_int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--profile", action="store_true", help="per-operator times from onnxruntime's profiler")
    return ap.parse_args(argv)


def load_feeds(path: Path, session) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise BenchError(f"inputs file {path} not found")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise BenchError(f"cannot read {path} as safetensors: {e}") from e
    feeds = {k[len("in."):]: v for k, v in tensors.items() if k.startswith("in.")}

    wanted = [i.name for i in session.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise BenchError(f"{path} lacks tensors for model inputs: {', '.join('in.' + n for n in missing)}")
    extra = sorted(set(feeds) - set(wanted))
    if extra:
        raise BenchError(f"{path} has in.* tensors the model does not take: {', '.join(extra)}")
    return {n: feeds[n] for n in wanted}


def percentile_ms(sorted_ns: list[int], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default method).
    # Values are rounded to 0.1 us: finer digits are timer noise.
    return round(float(np.percentile(np.asarray(sorted_ns, dtype=np.float64), q)) / 1e6, 4)


def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    if not args.model.is_file():
        raise BenchError(f"model file {args.model} not found")
    outputs = [name.strip() for name in args.outputs.split(",") if name.strip()]
    if not outputs:
        raise BenchError("--outputs is empty")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.profile:
        import tempfile

        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="dai-ort-profile-")) / "ort")
    try:
        session = ort.InferenceSession(str(args.model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BenchError(f"cannot load {args.model}: {e}") from e

    known = {o.name for o in session.get_outputs()}
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise BenchError(
            f"model has no output(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(known))}"
        )

    feeds = load_feeds(args.inputs, session)

    try:
        for _ in range(args.warmup):
            session.run(outputs, feeds)
        samples = []
        for _ in range(args.iters):
            t0 = time.perf_counter_ns()
            session.run(outputs, feeds)
            samples.append(time.perf_counter_ns() - t0)
    except Exception as e:
        raise BenchError(f"session.run failed: {e}") from e

    profile = None
    if args.profile:
        trace = Path(session.end_profiling())
        try:
            profile = summarize_profile(json.loads(trace.read_text()), args.warmup, args.iters)
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read onnxruntime's profile {trace}: {e}") from e
        finally:
            trace.unlink(missing_ok=True)
    samples.sort()
    result = {
        "ort_version": ort.__version__,
        "iters": args.iters,
        "p50_ms": percentile_ms(samples, 50),
        "p95_ms": percentile_ms(samples, 95),
        "mean_ms": round(sum(samples) / len(samples) / 1e6, 4),
        "min_ms": round(samples[0] / 1e6, 4),
    }
    if profile is not None:
        result["profile"] = profile
    return result


def summarize_profile(events: list, warmup: int, iters: int) -> dict:
    """Kernel time by op_name over the timed runs (the last `iters` model_run spans)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < warmup + iters:
        raise BenchError(f"onnxruntime's profile has {len(runs)} runs, expected {warmup + iters}")
    timed = runs[warmup:warmup + iters]
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in timed]
    by_op: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        if not any(a <= ts <= b for a, b in spans):
            continue
        op = e.get("args", {}).get("op_name", "?")
        entry = by_op.setdefault(op, [set(), 0])
        entry[0].add(e["name"])
        entry[1] += e["dur"]
    total_us = sum(v[1] for v in by_op.values())
    rows = [{"op": op, "nodes": len(v[0]), "ms": round(v[1] / iters / 1e3, 4),
             "share": (v[1] / total_us) if total_us else 0.0} for op, v in by_op.items()]
    rows.sort(key=lambda r: (-r["ms"], r["op"]))
    return {
        "runs": iters,
        "run_ms": round(float(np.median([r["dur"] for r in timed])) / 1e3, 4),
        "nodes_ms": round(total_us / iters / 1e3, 4),
        "by_op": rows,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as e:
        print(f"ort_latency: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"ort_latency: error: missing Python package ({e}); pip install onnxruntime safetensors numpy",
              file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
