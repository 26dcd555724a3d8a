#!/usr/bin/env bash
# aarch64 smoke test: the cross-built dai-edge (cross/build.sh) runs under
# qemu-user, loads zoo models, and answers inferences over HTTP with the
# same outputs as the native x86_64 build on the same inputs.
#
#   cross/smoke.sh    (after cross/build.sh; builds the native dai-edge if needed)
#   DAI_SMOKE_ARM_BIN=PATH cross/smoke.sh   (another aarch64 dai-edge, e.g. the --small build)
#
# qemu-aarch64-static runs WITHOUT -L: with -L /usr/aarch64-linux-gnu,
# dynamically linked binaries hang at the first thread start; without it,
# the multiarch libc6:arm64 (a dependency of libstd-rust-web-dev:arm64)
# provides the loader.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NATIVE_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CROSS_DIR=${DAI_CROSS_TARGET_DIR:-$NATIVE_DIR-cross}
ARM=${DAI_SMOKE_ARM_BIN:-$CROSS_DIR/dist/aarch64-unknown-linux-gnu/dai-edge}
[ -x "$ARM" ] || { echo "cross/smoke.sh: $ARM missing: run cross/build.sh first" >&2; exit 1; }
aarch64-linux-gnu-readelf -h "$ARM" | grep -q 'Machine:.*AArch64' \
  || { echo "cross/smoke.sh: $ARM is not an AArch64 binary" >&2; exit 1; }
cargo build --release -q -p dai-edge
NATIVE="$NATIVE_DIR/release/dai-edge"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # name port binary-runner...
  local name=$1 port=$2; shift 2
  cat > "$work/$name.yaml" <<YAML
cpu_limit: 1.0
max_parallel_agents: 1
caching_enabled: false
daemon:
  listen_addr: 127.0.0.1:$port
  data_dir: $work/$name-data
  models_dir: $ROOT/models/zoo
  models: [digits, imu-anomaly]
  fetch_missing_models: false
training:
  enabled: false
YAML
  DAI_LOG=warn "$@" --config "$work/$name.yaml" run > "$work/$name.log" 2>&1 &
  pids+=($!)
}
wait_ready() { # port name
  for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "cross/smoke.sh: $2 not ready after 120 s; its log:" >&2
  cat "$work/$2.log" >&2
  exit 1
}

native_port=$(free_port)
arm_port=$(free_port)
start native "$native_port" "$NATIVE"
start arm "$arm_port" qemu-aarch64-static "$ARM"
wait_ready "$native_port" native
wait_ready "$arm_port" arm
echo "native on :$native_port, aarch64 (qemu) on :$arm_port"

python3 - "$native_port" "$arm_port" "$ROOT/models/data/digits.csv.gz" <<'PY'
import gzip, json, sys, urllib.request
native, arm, data = sys.argv[1:]
rows = [list(map(float, l.split(",")[:64])) for l in gzip.open(data, "rt").read().split("\n")[:8] if l]
requests = {
    "digits": {"inputs": {"pixels": {"shape": [len(rows), 64], "data": [v for r in rows for v in r]}}},
    "imu-anomaly": {"inputs": {"features": {"shape": [1, 42], "data": [((i * 37) % 11) / 3.0 - 1.5 for i in range(42)]}}},
}
def infer(port, model, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{model}/infer",
                                 data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))["outputs"]
worst = 0.0
for model, body in requests.items():
    a, b = infer(native, model, body), infer(arm, model, body)
    for name in a:
        x, y = a[name]["data"], b[name]["data"]
        assert len(x) == len(y), (model, name, len(x), len(y))
        d = max(abs(p - q) for p, q in zip(x, y))
        worst = max(worst, d)
        print(f"{model}/{name}: {len(x)} values, max |native - aarch64| = {d:.2e}")
if worst > 1e-5:
    sys.exit(f"cross/smoke.sh: aarch64 output differs from native by {worst}")
print("aarch64 dai-edge under qemu answers like the native build")
PY
