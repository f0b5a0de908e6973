"""CoRe-Fed k, gamma sensitivity grid (arXiv 2602.00647; k in {0.5, 2.0}, gamma in {0.5, 2.0}).

The grid is ``launch/configs/corefed_ablation.py``'s ``GRID``; each point is
that dataset's CoRe-Fed config with ``corefed.k`` and ``corefed.gamma`` set,
run by ``fedjax_sim.simulation.train_and_evaluate`` (which logs accuracy,
D_Cosine, D_Manhattan, ... to ``<workdir>/<point>/metrics.jsonl``).

  python launch/experiments/corefed_grid.py --dataset digits --rounds 300 --seeds 0,1,2
  python launch/experiments/corefed_grid.py --dataset cifar10 \\
      --data-dir ~/tensorflow_datasets --rounds 1000

Prints one line per (k, gamma) with the final metrics, mean over seeds.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from fedjax_sim import simulation
from fedjax_sim.launch.configs import corefed_ablation

KEYS = ("test_accuracy", "d_cosine", "d_manhattan", "client_acc_worst10")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", default="digits", choices=sorted(corefed_ablation.DATASETS))
  ap.add_argument("--rounds", type=int, default=0, help="0 = the config's")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--workdir", default="runs/corefed_grid")
  args = ap.parse_args()
  for k, gamma in corefed_ablation.GRID:
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
      c = corefed_ablation.get_config(f"{args.dataset}:corefed")
      c.corefed.k, c.corefed.gamma, c.seed, c.progress = k, gamma, seed, False
      if args.rounds:
        c.rounds = args.rounds
      if args.data_dir:
        c.data.data_dir = os.path.expanduser(args.data_dir)
      wd = os.path.join(args.workdir, args.dataset, f"k{k}_gamma{gamma}_seed{seed}")
      rows.append(simulation.train_and_evaluate(c, wd))
    print(f"k={k} gamma={gamma}: " + ", ".join(
        f"{key} {np.mean([r[key] for r in rows]):.4f}" for key in KEYS), flush=True)


if __name__ == "__main__":
  main()
