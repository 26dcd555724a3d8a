"""Flower's built-in strategies as a round combiner for
`cargo bench --bench robustness` (our local training, Flower's
aggregation, side by side on the same updates).

Reads JSON lines on stdin, one per round:
  {"strategy": NAME, "f": attackers, "global": [[tensor values]...],
   "deltas": [[[tensor values]...] per client], "num_examples": [...]}
and answers one JSON line {"global": [[...]...]} (or {"error": "..."}).
Clients send their full parameters (global + delta), as Flower clients do,
and the strategy's aggregate_fit (flwr.server.strategy, which shares its
aggregation functions with flwr.serverapp.strategy) combines them.
NAME: FedAvg | FedMedian | FedTrimmedAvg | Krum | MultiKrum | Bulyan |
DPFixed (DifferentialPrivacyServerSideFixedClipping around FedAvg; the
request then also carries "noise" (the noise multiplier) and "clip").
"""

import json
import sys

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
)


def strategy(name, n, f, req=None):
    quiet = {"fit_metrics_aggregation_fn": lambda _: {}}
    if name == "DPFixed":
        return DifferentialPrivacyServerSideFixedClipping(
            FedAvg(**quiet),
            noise_multiplier=float(req["noise"]),
            clipping_norm=float(req["clip"]),
            num_sampled_clients=n,
        )
    if name == "FedAvg":
        return FedAvg(**quiet)
    if name == "FedMedian":
        return FedMedian(**quiet)
    if name == "FedTrimmedAvg":
        return FedTrimmedAvg(beta=0.2, **quiet)
    if name == "Krum":
        return Krum(num_malicious_clients=f, num_clients_to_keep=0, **quiet)
    if name == "MultiKrum":
        return Krum(num_malicious_clients=f, num_clients_to_keep=n - f, **quiet)
    if name == "Bulyan":
        # Krum as the first rule (Flower's default), selecting n - 2f.
        return Bulyan(num_malicious_clients=f, to_keep=0, **quiet)
    raise ValueError(f"unknown strategy {name}")


class Proxy:
    """aggregate_fit takes (ClientProxy, FitRes) pairs; only cid is read."""

    def __init__(self, cid):
        self.cid = cid


def main():
    for line in sys.stdin:
        req = json.loads(line)
        g = [np.asarray(t, dtype=np.float32) for t in req["global"]]
        results = []
        for k, (delta, n) in enumerate(zip(req["deltas"], req["num_examples"])):
            params = [gt + np.asarray(d, dtype=np.float32) for gt, d in zip(g, delta)]
            res = FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(params),
                num_examples=int(n),
                metrics={},
            )
            results.append((Proxy(str(k)), res))
        try:
            s = strategy(req["strategy"], len(results), int(req["f"]), req)
            # The DP wrapper clips each update against the round's global,
            # which configure_fit would have recorded.
            s.current_round_params = g
            params, _ = s.aggregate_fit(1, results, [])
            out = {"global": [a.astype(np.float64).tolist() for a in parameters_to_ndarrays(params)]}
        except Exception as e:  # reported in the table, not a crash
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
