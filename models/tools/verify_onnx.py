#!/usr/bin/env python3
"""Check an ONNX file in onnxruntime against expected outputs.

Usage: verify_onnx.py --model M.onnx --data F.safetensors [--tol 1e-5]

F holds tensors `in.<input name>` (fed as is) and `out.<output name>` (what
our runtime produced). Exits 0 when every output agrees within --tol (max
absolute difference), 1 otherwise, 2 when onnxruntime is missing. Prints one
JSON line with the differences.
"""
import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    try:
        import numpy as np
        import onnxruntime as ort
        from safetensors.numpy import load_file
    except ImportError as e:
        print(f"verify_onnx: {e}; pip install onnxruntime numpy safetensors", file=sys.stderr)
        return 2
    tensors = load_file(args.data)
    feeds = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
    expected = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    got = dict(zip(list(expected), sess.run(list(expected), feeds)))
    diffs = {k: float(np.max(np.abs(got[k] - expected[k]))) for k in expected}
    ok = all(d <= args.tol for d in diffs.values())
    print(json.dumps({"onnxruntime": ort.__version__, "max_abs_diff": diffs, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
