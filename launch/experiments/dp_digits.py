"""Client-level DP privacy-utility report on digits: DP-FedAvg at epsilon in {1, 2, 4, 8, inf}.

Every run: digits, C = 400 clients (iid partition, about 3 training examples
each), Poisson sampling with expected cohort q*C = 40 (q = 0.1, bound K_max
from ``sampling.poisson_bound``), a linear softmax model (``mlp`` with no
hidden layer), E = 5 local epochs of SGD (B = 10, eta_l = 0.2), FedAvg's
server step (SGD, eta = 1) on the noised mean delta, 100 rounds. DP-FedAvg
(``fedjax_sim.dp.private``, McMahan et al., arXiv 1710.06963): every update
clipped to C = 0.5 (fixed; the updates' mean norm is about 0.87, 90% are
clipped), Gaussian noise z*C on the clipped sum, divided by 40. For each target
epsilon the noise multiplier z is calibrated for the 100 rounds at delta =
C^-1.1 with the RDP accountant (``fedjax_sim.privacy.calibrate``); the PLD
accountant's epsilon for the same z (the truncated Poisson sampler, analysed
exactly) is reported beside it. epsilon = inf is clipping without noise; the
non-private baseline is FedAvg (example weights, no clipping) on the same
sampler. Three seeds each (a seed changes the partition, the model init and
every round key); spreads are sample standard deviations (ddof = 1).

One compiled round per epsilon serves the three seeds (``make_round(seed=None)``).

``--dataset mnist1d`` runs the same on MNIST-1D (arXiv 2011.14439; 4,000
training signals, so about 10 per client) with the paper's CNN (``cnn1d``,
5,210 parameters), eta_l = 0.1 and C = 1.0, and writes ``dp_mnist1d.*``.

  python launch/experiments/dp_digits.py --out docs/results          # the report
  python launch/experiments/dp_digits.py --dataset mnist1d --out docs/results
  python launch/experiments/dp_digits.py --rounds 10 --seeds 0 --out /tmp/x   # smoke

Writes ``<out>/dp_<dataset>.json`` and ``<out>/dp_<dataset>.png``; the text of
``dp_digits.md`` quotes them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import ml_collections
import numpy as np

from fedjax_sim import privacy
from fedjax_sim.launch import experiment
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.metrics import sample_std
from fedjax_sim.round import make_round
from fedjax_sim.simulation import simulate

EPSILONS = ("1", "2", "4", "8", "inf")


# dataset -> (model, model_kwargs, client lr, clip norm C)
SETTINGS = {
    "digits": ("mlp", {"hidden": ()}, 0.2, 0.5),  # linear softmax regression
    "mnist1d": ("cnn1d", {"features": (25, 25, 25), "kernel_sizes": (5, 3, 3)}, 0.1, 1.0),
}


def get_config(epsilon, rounds: int, seed: int, accountant: str = "rdp",
               dataset: str = "digits"):
  """The run config at target ``epsilon`` (a number, ``"inf"``: no noise, None: no DP)."""
  model, kwargs, lr, clip = SETTINGS[dataset]
  c = get_base_config()
  c.seed, c.rounds = seed, rounds
  c.data.dataset = dataset
  if dataset == "mnist1d":
    c.data.num_samples, c.data.mnist1d_seed = 5000, 42
  c.data.num_clients, c.clients_per_round, c.data.partition = 400, 40, "iid"
  c.sampler = "poisson"
  c.model, c.model_kwargs = model, ml_collections.ConfigDict(kwargs)
  c.local_epochs, c.client_lr, c.batch_size = 5, lr, 10
  c.eval_every, c.rounds_per_call, c.progress = rounds, 10, False
  if epsilon is not None:
    c.dp.update(dict(enabled=True, clip_norm=clip, accountant=accountant,
                     noise_multiplier=0.0 if epsilon == "inf" else 1.0,
                     target_epsilon=0.0 if epsilon == "inf" else float(epsilon)))
  return c


def run_point(epsilon, seeds, rounds: int, dataset: str = "digits") -> dict:
  """Final global test accuracy of every seed at one epsilon (one compiled round)."""
  round_fn, rows, z = None, [], None
  for seed in seeds:
    cfg = get_config(epsilon, rounds, seed, dataset=dataset)
    exp = experiment.build_experiment(cfg)
    if round_fn is None:
      round_fn = make_round(exp.algorithm, exp.sampler, seed=None, mesh=exp.mesh,
                            chunk_size=cfg.chunk_size, rounds_per_call=cfg.rounds_per_call)
      algorithm = exp.algorithm  # the same math for every seed (z calibrated once)
      z = float(cfg.dp.noise_multiplier) if epsilon is not None else None
    result = simulate(algorithm, exp.sampler, exp.data, seed=seed, rounds=rounds,
                      rounds_per_call=cfg.rounds_per_call, eval_every=cfg.eval_every,
                      mesh=exp.mesh, round_fn=round_fn,
                      row_extras=experiment.dp_fields(cfg, exp.sampler))
    rows.append(result.history[-1])
  acc = [r["test_accuracy"] for r in rows]
  out = {"epsilon_target": epsilon, "noise_multiplier": z, "accuracy": acc,
         "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(sample_std(acc)),
         "final_rows": rows}
  if epsilon is not None:
    out["epsilon_rdp"] = rows[0]["dp_epsilon"]
    out["delta"] = rows[0]["dp_delta"]
    spec = experiment.privacy_spec(cfg, exp.sampler)._replace(noise_multiplier=z,
                                                               accountant="pld")
    out["epsilon_pld_same_z"] = privacy.epsilon(spec, rounds) if z else math.inf
    out["cohort_bound"] = exp.sampler.clients_per_round
  return out


def plot(points: list, baseline: dict, path: str, dataset: str = "digits") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  finite = [p for p in points if p["epsilon_target"] != "inf"]
  xs = [float(p["epsilon_target"]) for p in finite]
  ax.errorbar(xs, [p["accuracy_mean"] for p in finite], [p["accuracy_std"] for p in finite],
              marker="o", capsize=3, label=f"DP-FedAvg (C = {SETTINGS[dataset][3]})")
  inf = [p for p in points if p["epsilon_target"] == "inf"]
  if inf:
    ax.axhline(inf[0]["accuracy_mean"], color="tab:orange", ls="--",
               label="clipping only (epsilon = inf)")
  ax.axhline(baseline["accuracy_mean"], color="gray", ls=":", label="FedAvg, no DP")
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs, [f"{x:g}" for x in xs])
  ax.set_xlabel("epsilon (RDP accountant, delta = C^-1.1)")
  ax.set_ylabel("global test accuracy")
  ax.set_title(f"{dataset}, 400 clients, Poisson q = 0.1, {len(points[0]['accuracy'])} seeds")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--epsilons", default=",".join(EPSILONS))
  ap.add_argument("--dataset", default="digits", choices=sorted(SETTINGS))
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  t0 = time.time()
  points = []
  for eps in args.epsilons.split(","):
    points.append(run_point(eps, seeds, args.rounds, args.dataset))
    p = points[-1]
    print(f"epsilon {eps}: z = {p['noise_multiplier']}, accuracy {p['accuracy_mean']:.4f} +- "
          f"{p['accuracy_std']:.4f} (RDP eps {p['epsilon_rdp']:.3f}, PLD eps same z "
          f"{p['epsilon_pld_same_z']:.3f})", flush=True)
  baseline = run_point(None, seeds, args.rounds, args.dataset)
  print(f"no DP: accuracy {baseline['accuracy_mean']:.4f} +- {baseline['accuracy_std']:.4f}")
  total = time.time() - t0
  os.makedirs(args.out, exist_ok=True)
  name = f"dp_{args.dataset}"
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump({"args": vars(args), "total_s": total, "points": points, "no_dp": baseline,
               "config": get_config("1", args.rounds, 0, dataset=args.dataset).to_dict()},
              f, indent=1, default=str)
  plot(points, baseline, os.path.join(args.out, f"{name}.png"), args.dataset)
  print(f"total {total:.0f} s")


if __name__ == "__main__":
  main()
