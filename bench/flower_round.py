#!/usr/bin/env python3
"""Flower (flwr) peer benchmark: R FedAvg rounds over C simulated clients.

The Python side of the federated-aggregation comparison against our Rust
aggregator. Runs a real Flower simulation (ServerApp + ClientApp on the Ray
backend, all in one command) in which every client trains the global model
locally and the server averages the results with Flower's own FedAvg
(weighted by each client's sample count, Flower's default), then reports
timings, peak memory and the final model's training accuracy.

Installed and tested with (python 3.11.7, torch 2.x CPU):

    pip install 'flwr[simulation]'      # resolved to flwr==1.42.0, ray==2.55.1
    pip install psutil                  # optional: process-tree memory sampling

(pin it with `pip install 'flwr[simulation]==1.42.0'` to reproduce exactly).
flwr 1.42 marks the Python entry point `flwr.simulation.run_simulation` as
deprecated in favour of the `flwr run` CLI; it still runs the same Simulation
Runtime in-process (ServerApp in a thread, ClientApps in Ray actors), which is
what this script needs to time it from the inside. The message-based
`flwr.serverapp.strategy.FedAvg` strategy is used.

Input: a safetensors file (as written by our Rust bench) holding
  x        float32 [n, 64]   input features
  y        int64   [n]       labels 0..9
  client   int64   [n]       which client (0..C-1) each row belongs to
  layers.0.weight [32, 64], layers.0.bias [32],
  layers.1.weight [10, 32], layers.1.bias [10]   initial global model:
           Linear(64,32) -> ReLU -> Linear(32,10), softmax cross-entropy
and string metadata `epochs`, `batch_size`, `lr` (Adam learning rate) and
`clients` (C).

Each round: all C clients (fraction 1.0, min_train_nodes = C, no client-side
evaluation) start from the global weights and train `epochs` epochs of Adam(lr)
over their own rows in shuffled mini-batches of `batch_size` (last batch may be
smaller; a fresh Adam state every round). Afterwards the accuracy of the final
global model on all training rows is computed as a sanity check.

Resources: Ray is started with num_cpus=2 (the machine has 2 cores; change with
--num-cpus) and each client asks for num_cpus=1, so two Ray actors train
clients concurrently; each actor limits torch to one thread
(torch.set_num_threads(1)). Telemetry is switched off (FLWR_TELEMETRY_ENABLED=0)
and Flower/Ray logging is reduced to WARNING/ERROR.

Output (one JSON line with --json, otherwise the same as readable lines):
  flwr_version, torch_version, clients, rows, rounds
  total_wall_s   run_simulation() call to return: Ray start, actor pool,
                 all rounds, Ray shutdown (not python/torch import, not the
                 file read in the driver)
  startup_s      run_simulation() call to the first client fit starting
                 (Ray + actor start, ClientApp import in the first actor)
  round_wall_s   per round: first client fit start -> FedAvg aggregate done
                 (client fits on the actors, message passing through Flower's
                 in-memory link state, server-side aggregation). Round 1 is
                 "cold": each Ray actor pays one-off costs inside it (the first
                 Adam step lazily imports torch._dynamo, ~1.5 s; the data file
                 read; the second actor's import of torch/flwr if it was not
                 ready when the first client started). Run --rounds 2 or more
                 and read round_wall_s[1:] for the warm, steady-state round.
                 Flower's in-memory grid polls for replies every 0.1 s, so
                 round times carry up to ~0.1 s of polling slack.
  round_dispatch_wall_s  per round: strategy configure_train -> aggregate done
                 (adds the wait for the actor pool in round 1)
  round_fit_span_s, round_aggregate_s, round_client_fit_sum_s  breakdown
  shutdown_s     last aggregate done -> run_simulation() returned (ray.shutdown)
  teardown_wait_s  after that, waiting for the orphaned Ray actor processes to
                 exit (not in total_wall_s; stragglers after 15 s are killed
                 by PID and listed in killed_leftovers)
  peak_rss_mb    peak memory of the whole process tree: the psutil sample
                 maximum (sum of RSS over the driver and all descendants, Ray's
                 gcs_server/raylet/workers included, sampled every 50 ms; shared
                 pages are counted once per process, so it over-counts shared
                 libraries). Without psutil it falls back to getrusage
                 SELF + CHILDREN maxrss (CHILDREN is the largest single reaped
                 descendant, not a sum, so that number is a lower bound).
  peak_pss_tree_mb  peak summed PSS of the tree (shared pages split between
                 sharers; sampled every 250 ms) - the fairer "memory used" figure
  peak_rss_self_mb, peak_rss_children_mb, peak_rss_tree_mb, peak_rss_method,
  peak_tree_procs (process names in the tree at the RSS peak)
  accuracy, final_loss          final global model, all rows
  initial_accuracy, initial_loss  initial global model, all rows

Usage:
  python3 bench/flower_round.py --data FILE [--rounds 1] [--json]
      [--num-cpus 2] [--seed 0]

Exit status: 0 ok, 1 missing/malformed input or a failed simulation,
2 bad command line or flwr/torch/safetensors not installed.
"""

from __future__ import annotations

import os

# Before flwr/ray are imported: no telemetry, quieter Ray.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

FEATURES = 64
HIDDEN = 32
CLASSES = 10
PARAM_SHAPES = {
    "layers.0.weight": (HIDDEN, FEATURES),
    "layers.0.bias": (HIDDEN,),
    "layers.1.weight": (CLASSES, HIDDEN),
    "layers.1.bias": (CLASSES,),
}
META_KEYS = ("epochs", "batch_size", "lr", "clients")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- input file


def load_bench_file(path: str) -> dict:
    """Read and validate the safetensors input. Raises BenchError."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"data file not found: {path}")
    try:
        from safetensors import safe_open
    except ImportError as ex:  # pragma: no cover
        raise BenchError("the `safetensors` package is not installed") from ex
    try:
        tensors = {}
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as ex:  # noqa: BLE001 - any parse error is "malformed"
        raise BenchError(f"cannot read {path} as safetensors: {ex}") from ex

    missing = [k for k in ("x", "y", "client", *PARAM_SHAPES) if k not in tensors]
    if missing:
        raise BenchError(f"{path}: missing tensors {missing}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise BenchError(f"{path}: missing __metadata__ keys {missing}")
    try:
        epochs = int(meta["epochs"])
        batch_size = int(meta["batch_size"])
        lr = float(meta["lr"])
        clients = int(meta["clients"])
    except ValueError as ex:
        raise BenchError(f"{path}: bad metadata value: {ex}") from ex
    if epochs < 1 or batch_size < 1 or clients < 1 or not (lr > 0 and np.isfinite(lr)):
        raise BenchError(
            f"{path}: metadata out of range: epochs={epochs} batch_size={batch_size} "
            f"lr={lr} clients={clients}"
        )

    x, y, client = tensors["x"], tensors["y"], tensors["client"]
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != FEATURES:
        raise BenchError(f"{path}: x must be float32 [n, {FEATURES}], got {x.dtype} {list(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise BenchError(f"{path}: no rows")
    for name, t in (("y", y), ("client", client)):
        if t.dtype != np.int64 or t.shape != (n,):
            raise BenchError(f"{path}: {name} must be int64 [{n}], got {t.dtype} {list(t.shape)}")
    if y.min() < 0 or y.max() >= CLASSES:
        raise BenchError(f"{path}: labels must lie in 0..{CLASSES - 1}")
    if client.min() < 0 or client.max() >= clients:
        raise BenchError(f"{path}: client ids must lie in 0..{clients - 1} (metadata clients={clients})")
    if not np.all(np.isfinite(x)):
        raise BenchError(f"{path}: x holds non-finite values")
    params = {}
    for key, shape in PARAM_SHAPES.items():
        t = tensors[key]
        if t.dtype != np.float32 or t.shape != shape:
            raise BenchError(f"{path}: {key} must be float32 {list(shape)}, got {t.dtype} {list(t.shape)}")
        params[key] = t
    return {
        "x": x, "y": y, "client": client, "params": params,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "clients": clients,
    }


# ---------------------------------------------------------------- model (shared by server and clients)


def make_model():
    import torch.nn as nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES)])

        def forward(self, x):
            return self.layers[1](self.layers[0](x).relu())

    return MLP()


# ---------------------------------------------------------------- ClientApp
#
# The ClientApp lives in this module so that Ray's cloudpickle can send it by
# reference: main() imports this file as the module `flower_round` (the bench/
# directory is on sys.path, which Flower forwards to the actors via PYTHONPATH)
# and hands `flower_round.client_app` to run_simulation. Each actor process
# then imports this module once and keeps the parsed data file in _DATA_CACHE.

_DATA_CACHE: dict = {}


def _client_rows(path: str, partition: int):
    import torch

    if path not in _DATA_CACHE:
        data = load_bench_file(path)
        order = np.argsort(data["client"], kind="stable")
        bounds = np.searchsorted(data["client"][order], np.arange(data["clients"] + 1))
        _DATA_CACHE[path] = (
            torch.from_numpy(data["x"][order].copy()),
            torch.from_numpy(data["y"][order].copy()),
            bounds,
        )
    x, y, bounds = _DATA_CACHE[path]
    lo, hi = int(bounds[partition]), int(bounds[partition + 1])
    return x[lo:hi], y[lo:hi]


def _build_client_app():
    try:
        from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
    except ImportError:  # the module is also imported for its data loader
        return None

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        t_start = time.time()
        torch.set_num_threads(1)
        cfg = msg.content["config"]
        partition = int(context.node_config["partition-id"])
        x, y = _client_rows(str(cfg["data-path"]), partition)
        n = int(x.shape[0])
        epochs, batch = int(cfg["epochs"]), int(cfg["batch-size"])

        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
        loss_fn = torch.nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(
            int(cfg["seed"]) * 1_000_003 + int(cfg["server-round"]) * 10_007 + partition
        )
        loss_sum, seen = 0.0, 0
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch):
                idx = perm[s:s + batch]
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
        t_end = time.time()
        metrics = MetricRecord({
            "num-examples": n,
            "train-loss": loss_sum / seen if seen else 0.0,
            "t-start": t_start,
            "t-end": t_end,
        })
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


client_app = _build_client_app()


# ---------------------------------------------------------------- memory sampling


class TreeRssSampler:
    """Sample the memory of this process and all its descendants.

    RSS is summed every `interval` seconds; PSS (shared pages split between
    the processes sharing them, so the sum does not double-count torch/ray
    libraries) every `pss_every` samples, from /proc/PID/smaps_rollup.
    """

    def __init__(self, interval: float = 0.05, pss_every: int = 5) -> None:
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process()
        self.interval = interval
        self.pss_every = pss_every
        self.peak = 0
        self.peak_pss = 0
        self.peak_procs: list[str] = []
        self.seen: dict = {}  # (pid, create_time) -> Process, every descendant ever seen
        self._n = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def sample(self, pss: bool = False) -> None:
        procs = [self.proc]
        try:
            procs += self.proc.children(recursive=True)
        except self.psutil.Error:
            pass
        total, total_pss, names = 0, 0, []
        for p in procs[1:]:
            try:
                self.seen.setdefault((p.pid, p.create_time()), p)
            except self.psutil.Error:
                pass
        for p in procs:
            try:
                if pss:
                    mi = p.memory_full_info()
                    total_pss += getattr(mi, "pss", 0)
                else:
                    mi = p.memory_info()
                total += mi.rss
                names.append(p.name())
            except self.psutil.Error:
                pass
        if total > self.peak:
            self.peak, self.peak_procs = total, names
        self.peak_pss = max(self.peak_pss, total_pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            self.sample(pss=self._n % self.pss_every == 0)
            self._stop.wait(self.interval)

    def start(self) -> "TreeRssSampler":
        self._th.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._th.join()
        self.sample(pss=True)


def reap_descendants(sampler: "TreeRssSampler | None", timeout: float = 15.0) -> tuple[float, list[str]]:
    """Wait for every descendant process seen during the run to exit.

    ray.shutdown() (called by Flower when the simulation ends) stops raylet and
    gcs_server, but the ClientAppActor workers, by then re-parented to init,
    take a few seconds to notice and exit. Wait up to `timeout` s for them,
    then terminate/kill the stragglers (only these PIDs, nothing by name).
    Returns (seconds waited, names of processes that had to be killed).
    """
    if sampler is None:
        return 0.0, []
    psutil = sampler.psutil
    t0 = time.time()
    procs = []
    for p in sampler.seen.values():
        try:
            if p.is_running():  # also checks create_time: no PID reuse
                procs.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    killed = []
    for p in alive:
        try:
            killed.append(f"{p.pid}:{p.name()}")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return time.time() - t0, killed


# ---------------------------------------------------------------- simulation


def quiet_logging() -> None:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class DropDeprecation(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage().lower()
            # expected with fraction_evaluate=0.0 / the run_simulation entry point
            return "deprecated" not in text and "evaluation will be skipped" not in text

    for h in logging.getLogger("flwr").handlers:
        h.addFilter(DropDeprecation())


def run_bench(args: argparse.Namespace) -> dict:
    data = load_bench_file(args.data)
    try:
        import flwr
        import torch
        from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation
    except ImportError as ex:
        print(f"flower_round: missing dependency: {ex} "
              "(pip install 'flwr[simulation]' torch)", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    quiet_logging()

    # Import this file as a real module so the ClientApp pickles by reference.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_round as mod  # noqa: E402

    C = data["clients"]
    rounds = args.rounds
    rows = int(data["x"].shape[0])
    times: dict = {"configure": {}, "aggregate_done": {}, "aggregate_s": {},
                   "fit_first": {}, "fit_last": {}, "fit_sum": {}}
    result: dict = {}

    def aggr_metrics(records, weight_key) -> MetricRecord:
        ms = [next(iter(r.metric_records.values())) for r in records]
        total = sum(float(m[weight_key]) for m in ms)
        loss = sum(float(m["train-loss"]) * float(m[weight_key]) for m in ms) / max(total, 1.0)
        return MetricRecord({
            weight_key: int(total),
            "train-loss": loss,
            "t-first": min(float(m["t-start"]) for m in ms),
            "t-last": max(float(m["t-end"]) for m in ms),
            "fit-sum": sum(float(m["t-end"]) - float(m["t-start"]) for m in ms),
            "replies": len(ms),
        })

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            times["configure"][server_round] = time.time()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            t0 = time.time()
            arrays, metrics = super().aggregate_train(server_round, replies)
            t1 = time.time()
            times["aggregate_done"][server_round] = t1
            times["aggregate_s"][server_round] = t1 - t0
            if metrics is not None:
                times["fit_first"][server_round] = float(metrics["t-first"])
                times["fit_last"][server_round] = float(metrics["t-last"])
                times["fit_sum"][server_round] = float(metrics["fit-sum"])
                result.setdefault("replies", []).append(int(metrics["replies"]))
            errors = sum(1 for m in replies if m.has_error())
            if errors:
                first = next(m for m in replies if m.has_error())
                result.setdefault("errors", []).append(
                    f"round {server_round}: {errors} client errors, e.g. {first.error.reason}")
            return arrays, metrics

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0,
            min_train_nodes=C, min_available_nodes=C, min_evaluate_nodes=0,
            train_metrics_aggr_fn=aggr_metrics,
        )
        init = ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in data["params"].items()})
        res = strategy.start(
            grid=grid, initial_arrays=init, num_rounds=rounds,
            train_config=ConfigRecord({
                "data-path": str(Path(args.data).resolve()),
                "epochs": data["epochs"], "batch-size": data["batch_size"],
                "lr": data["lr"], "seed": args.seed,
            }),
        )
        result["arrays"] = res.arrays

    backend_config = {
        "init_args": {
            "num_cpus": args.num_cpus, "num_gpus": 0,
            "logging_level": "ERROR", "log_to_driver": False,
            "include_dashboard": False,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }

    # Ray's session directory (logs, sockets) in a private temp dir removed
    # afterwards (short path: Ray's unix socket paths must stay < 108 chars).
    ray_tmp = tempfile.mkdtemp(prefix="flwr_ray_", dir="/tmp")
    backend_config["init_args"]["_temp_dir"] = ray_tmp

    sampler = None
    try:
        sampler = TreeRssSampler().start()
    except ImportError:
        pass

    t_begin = time.time()
    try:
        run_simulation(
            server_app=server_app, client_app=mod.client_app,
            num_supernodes=C, backend_name="ray", backend_config=backend_config,
        )
    except SystemExit as ex:  # flwr_exit() on fatal errors
        raise BenchError(f"Flower simulation exited ({ex.code})") from ex
    except Exception as ex:  # noqa: BLE001
        raise BenchError(f"Flower simulation failed: {ex}") from ex
    finally:
        t_end = time.time()
        try:
            import ray
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if sampler is not None:
            sampler.stop()
        reap_s, killed = reap_descendants(sampler)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    if result.get("errors"):
        raise BenchError("; ".join(result["errors"]))
    done = sorted(times["aggregate_done"])
    if done != list(range(1, rounds + 1)) or "arrays" not in result or result["arrays"] is None:
        raise BenchError(f"simulation finished without {rounds} aggregated rounds (got {done})")
    if any(r != C for r in result["replies"]):
        raise BenchError(f"expected {C} replies per round, got {result['replies']}")

    # Sanity check: initial and final global model on all training rows.
    def evaluate(state_dict) -> tuple[float, float]:
        model = make_model()
        model.load_state_dict(state_dict)
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(data["x"]))
            yt = torch.from_numpy(data["y"])
            acc = float((logits.argmax(1) == yt).float().mean())
            return acc, float(torch.nn.functional.cross_entropy(logits, yt))

    accuracy, final_loss = evaluate(result["arrays"].to_torch_state_dict())
    initial_accuracy, initial_loss = evaluate(
        {k: torch.from_numpy(v.copy()) for k, v in data["params"].items()})

    r = range(1, rounds + 1)
    kb = 1024.0
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb
    tree_mb = sampler.peak / (1024.0 * 1024.0) if sampler else None
    pss_mb = sampler.peak_pss / (1024.0 * 1024.0) if sampler and sampler.peak_pss else None
    out = {
        "flwr_version": flwr.__version__,
        "torch_version": torch.__version__,
        "backend": "ray",
        "num_cpus": args.num_cpus,
        "clients": C,
        "rows": rows,
        "epochs": data["epochs"],
        "batch_size": data["batch_size"],
        "lr": data["lr"],
        "rounds": rounds,
        "total_wall_s": round(t_end - t_begin, 4),
        "startup_s": round(times["fit_first"][1] - t_begin, 4),
        "round_wall_s": [round(times["aggregate_done"][i] - times["fit_first"][i], 4) for i in r],
        "round_dispatch_wall_s": [round(times["aggregate_done"][i] - times["configure"][i], 4) for i in r],
        "round_fit_span_s": [round(times["fit_last"][i] - times["fit_first"][i], 4) for i in r],
        "round_aggregate_s": [round(times["aggregate_s"][i], 4) for i in r],
        "round_client_fit_sum_s": [round(times["fit_sum"][i], 4) for i in r],
        "shutdown_s": round(t_end - times["aggregate_done"][rounds], 4),
        "peak_rss_mb": round(tree_mb if tree_mb is not None else self_mb + children_mb, 1),
        "peak_rss_method": ("psutil tree sum (driver + all descendants, 50 ms samples)"
                            if tree_mb is not None else
                            "getrusage SELF + CHILDREN maxrss (lower bound: CHILDREN is the largest single child)"),
        "peak_rss_self_mb": round(self_mb, 1),
        "peak_rss_children_mb": round(children_mb, 1),
        "peak_rss_tree_mb": round(tree_mb, 1) if tree_mb is not None else None,
        "peak_pss_tree_mb": round(pss_mb, 1) if pss_mb is not None else None,
        "peak_tree_procs": sampler.peak_procs if sampler else None,
        "accuracy": round(accuracy, 4),
        "final_loss": round(final_loss, 4),
        "initial_accuracy": round(initial_accuracy, 4),
        "initial_loss": round(initial_loss, 4),
    }
    out["teardown_wait_s"] = round(reap_s, 4)
    if killed:
        out["killed_leftovers"] = killed
    return out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="safetensors file from the Rust bench")
    ap.add_argument("--rounds", type=positive_int, default=1)
    ap.add_argument("--num-cpus", type=positive_int, default=2,
                    help="CPUs given to Ray (each client takes 1; default 2)")
    ap.add_argument("--seed", type=int, default=0, help="client shuffling seed")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    try:
        out = run_bench(args)
    except BenchError as ex:
        print(f"flower_round: error: {ex}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
