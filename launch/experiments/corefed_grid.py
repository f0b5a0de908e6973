"""CoRe-Fed k, gamma sensitivity grid (arXiv 2602.00647; k in {0.5, 2.0}, gamma in {0.5, 2.0}).

The grid is ``launch/configs/corefed_ablation.py``'s ``GRID``; each point is
that dataset's CoRe-Fed config with ``corefed.k`` and ``corefed.gamma`` set,
run by ``fedjax_sim.launch.experiment.train_and_evaluate`` (which logs accuracy,
D_Cosine, D_Manhattan, ... to ``<workdir>/<point>/metrics.jsonl``).

  python launch/experiments/corefed_grid.py --dataset digits --rounds 300 --seeds 0,1,2
  python launch/experiments/corefed_grid.py --dataset cifar10 \\
      --data-dir ~/tensorflow_datasets --rounds 1000

Prints one line per (k, gamma) with the final metrics (mean of the last 5
evaluations, then mean +- std over seeds); with ``--out DIR`` also writes
``DIR/corefed_<dataset>_grid.md`` (the table) and ``..._grid.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import ml_collections
import numpy as np

from fedjax_sim.launch import experiment
from fedjax_sim.metrics import sample_std
from fedjax_sim.launch.configs import corefed_ablation

KEYS = ("test_accuracy", "d_cosine", "d_manhattan", "client_acc_worst10", "jain_index")


def final_row(workdir: str, last: int = 5) -> dict:
  """Mean of the last ``last`` evaluation rows of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "test_accuracy" in r]
  return {k: float(np.mean([r[k] for r in evals[-last:]])) for k in KEYS}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", default="digits", choices=sorted(corefed_ablation.DATASETS))
  ap.add_argument("--rounds", type=int, default=0, help="0 = the config's")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--workdir", default="runs/corefed_grid")
  ap.add_argument("--out", default="", help="folder for the Markdown table and JSON")
  args = ap.parse_args()
  table = []
  for k, gamma in corefed_ablation.GRID:
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
      c = corefed_ablation.get_config(f"{args.dataset}:corefed")
      c.corefed = ml_collections.ConfigDict({"k": k, "gamma": gamma})
      c.seed, c.progress = seed, False
      if args.rounds:
        c.rounds = args.rounds
      if args.data_dir:
        c.data.data_dir = os.path.expanduser(args.data_dir)
      wd = os.path.join(args.workdir, args.dataset, f"k{k}_gamma{gamma}_seed{seed}")
      experiment.train_and_evaluate(c, wd)
      rows.append(final_row(wd))
    stats = {key: (float(np.mean([r[key] for r in rows])), float(sample_std([r[key] for r in rows])))
             for key in KEYS}
    table.append({"k": k, "gamma": gamma, "runs": rows, "stats": stats})
    print(f"k={k} gamma={gamma}: " + ", ".join(
        f"{key} {m:.4f} +- {sd:.4f}" for key, (m, sd) in stats.items()), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"corefed_{args.dataset}_grid")
    with open(base + ".json", "w") as f:
      json.dump({"seeds": args.seeds, "rounds": args.rounds, "grid": table}, f, indent=1)
    lines = [f"CoRe-Fed k, gamma grid on {args.dataset} (seeds {args.seeds}; mean of the last 5 "
             "evaluations, mean +- std over seeds).", "",
             "| k | gamma | " + " | ".join(KEYS) + " |", "|" + " --- |" * (len(KEYS) + 2)]
    for t in table:
      lines.append(f"| {t['k']} | {t['gamma']} | " + " | ".join(
          f"{t['stats'][key][0]:.4f} +- {t['stats'][key][1]:.4f}" for key in KEYS) + " |")
    with open(base + ".md", "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
