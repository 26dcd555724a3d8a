#!/usr/bin/env bash
# GPU training-throughput comparison: dai-train's wgpu backend vs PyTorch CUDA.
#
# For a Linux machine with an NVIDIA GPU, this repository, a Rust toolchain via
# rustup, python3 with venv/pip, and network access to the package registries.
# Run from anywhere:
#
#   bash bench/gpu/run_gpu_bench.sh
#
# What it does:
#   1. checks nvidia-smi, cargo and python3;
#   2. installs PyTorch (the default Linux wheel, which is the CUDA build) into
#      a virtual environment under $OUT_DIR, unless it already works there;
#   3. runs `cargo bench --bench training -- --gpu-only` (the wgpu backend);
#   4. runs bench/gpu/torch_cuda_train.py for the same configurations
#      (MLP 64-64-32-10 and head 384-256-10, batches 32/256/1024, synthetic data);
#   5. prints a markdown table: samples/s of each and the ratio wgpu / torch-cuda.
#
# Both sides print one JSON line per configuration. The table joins them on
# (sizes, batch, optimizer); the fields read from each line are
#   "sizes"           [64, 64, 32, 10] or "64-64-32-10" (else "model" is used)
#   "batch"           integer
#   "optimizer"       "sgd" or "adam"
#   "samples_per_sec" number
# Lines of the cargo bench output that are not such JSON objects are ignored.
# For a fair ratio the wgpu bench should train the same way as the torch side:
# 16384 synthetic samples, 1 untimed warm-up epoch then 5 timed epochs,
# SGD lr 0.05 momentum 0.9 (see bench/gpu/torch_cuda_train.py --help).
#
# Environment:
#   OUT_DIR     where the venv, raw results and table go (default target/gpu-bench)
#   PYTHON      a python that already has CUDA torch: skips the venv and install
#   TORCH_ARGS  extra arguments for torch_cuda_train.py, e.g. "--optimizers sgd,adam"
#   BENCH_ARGS  extra arguments for the cargo bench after --gpu-only
#   BENCH_BIN   a prebuilt training bench executable (from
#               `cargo bench --bench training --no-run`) to run instead of cargo,
#               for a GPU machine with no Rust toolchain or no registry access
set -euo pipefail

die() { printf 'run_gpu_bench: error: %s\n' "$*" >&2; exit 1; }
step() { printf '\n=== %s\n' "$*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_DIR:-$REPO/target/gpu-bench}"
mkdir -p "$OUT_DIR"
WGPU_OUT="$OUT_DIR/wgpu.jsonl"
TORCH_OUT="$OUT_DIR/torch_cuda.jsonl"
TABLE="$OUT_DIR/table.md"

# ------------------------------------------------------------------ checks
step "checks"
command -v nvidia-smi >/dev/null 2>&1 \
  || die "nvidia-smi not found: this benchmark needs an NVIDIA GPU with its driver installed"
GPU_NAME="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)" \
  || die "nvidia-smi failed: is the NVIDIA driver loaded? (run nvidia-smi to see why)"
[ -n "$GPU_NAME" ] || die "nvidia-smi lists no GPU"
printf 'GPU: %s\n' "$GPU_NAME" >&2

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if [ -n "${BENCH_BIN:-}" ]; then
  [ -x "$BENCH_BIN" ] || die "BENCH_BIN=$BENCH_BIN is not an executable file"
else
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup, or set BENCH_BIN"
fi
command -v python3 >/dev/null 2>&1 || die "python3 not found"

ICD_FOUND=no
for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d; do
  if compgen -G "$d/nvidia*.json" >/dev/null; then ICD_FOUND=yes; fi
done
if [ "$ICD_FOUND" = no ]; then
  printf 'warning: no NVIDIA Vulkan ICD (nvidia*.json) in /usr/share/vulkan/icd.d or /etc/vulkan/icd.d;\n' >&2
  printf '         wgpu may not find the GPU (it needs libvulkan1 and the driver'"'"'s Vulkan part)\n' >&2
fi

# ------------------------------------------------------------------ torch
step "PyTorch (CUDA)"
torch_ok() {
  "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
  torch_ok "$PY" || die "PYTHON=$PY has no torch that sees a CUDA device"
else
  VENV="$OUT_DIR/venv"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" \
      || die "cannot create a venv at $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  PY="$VENV/bin/python"
  if ! torch_ok "$PY"; then
    "$PY" -m pip install --quiet --upgrade pip
    # The default Linux x86_64 torch wheel is built with CUDA (several GB to download).
    "$PY" -m pip install --quiet torch numpy || die "pip install torch numpy failed"
    torch_ok "$PY" || die "torch installed but torch.cuda.is_available() is False \
(driver too old for this torch's CUDA? see: $PY -c 'import torch; print(torch.version.cuda)' and nvidia-smi)"
  fi
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "on", torch.cuda.get_device_name(0))' >&2

# ------------------------------------------------------------------ wgpu
step "training bench --gpu-only"
read -r -a bench_args <<< "${BENCH_ARGS:-}"
if [ -n "${BENCH_BIN:-}" ]; then
  DAI_REPO="$REPO" "$BENCH_BIN" --gpu-only "${bench_args[@]}" | tee "$OUT_DIR/wgpu.log" \
    || die "$BENCH_BIN --gpu-only failed (see the output above)"
else
  cargo bench --bench training -- --gpu-only "${bench_args[@]}" | tee "$OUT_DIR/wgpu.log" \
    || die "cargo bench --bench training failed (see the output above)"
fi
grep -E '^[[:space:]]*\{' "$OUT_DIR/wgpu.log" > "$WGPU_OUT" || true
[ -s "$WGPU_OUT" ] || printf 'warning: the wgpu bench printed no JSON lines\n' >&2

# ------------------------------------------------------------------ torch cuda
step "python bench/gpu/torch_cuda_train.py"
read -r -a torch_args <<< "${TORCH_ARGS:-}"
"$PY" bench/gpu/torch_cuda_train.py "${torch_args[@]}" | tee "$TORCH_OUT" \
  || die "bench/gpu/torch_cuda_train.py failed (see the output above)"

# ------------------------------------------------------------------ table
step "table"
"$PY" - "$WGPU_OUT" "$TORCH_OUT" "$GPU_NAME" > "$TABLE" <<'EOF'
import json, re, sys

def rows(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if not isinstance(r, dict):
                continue
            sizes = r.get("sizes", r.get("model", "?"))
            if isinstance(sizes, list):
                sizes = "-".join(str(s) for s in sizes)
            else:
                sizes = "-".join(p for p in re.split(r"[,x\s-]+", str(sizes)) if p)
            try:
                key = (sizes, int(r["batch"]), str(r.get("optimizer", "?")))
                out[key] = float(r["samples_per_sec"])
            except (KeyError, TypeError, ValueError):
                continue
    return out

wgpu, torch = rows(sys.argv[1]), rows(sys.argv[2])
fmt = lambda v: "—" if v is None else f"{v:,.0f}"
print(f"GPU: {sys.argv[3]}\n")
print("| model | batch | optimizer | wgpu samples/s | torch-cuda samples/s | wgpu / torch-cuda |")
print("| --- | ---: | --- | ---: | ---: | ---: |")
for key in sorted(set(wgpu) | set(torch), key=lambda k: (k[0], k[2], k[1])):
    w, t = wgpu.get(key), torch.get(key)
    ratio = f"{w / t:.2f}" if w is not None and t else "—"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(w)} | {fmt(t)} | {ratio} |")
EOF
printf '\n' >&2
cat "$TABLE"
printf '\n(raw results: %s, %s; table: %s)\n' "$WGPU_OUT" "$TORCH_OUT" "$TABLE" >&2
