"""MNIST-1D baseline: the paper's centralized accuracies through our pipeline, and FedAvg curves.

Reproduces ``docs/results/mnist1d.md`` (Greydanus and Kobak, arXiv 2011.14439;
dataset ``mnist1d``, ``fedjax_sim/data/mnist1d.py``)::

  python launch/experiments/mnist1d_baseline.py --out docs/results
  python launch/experiments/mnist1d_baseline.py --central-steps 250 --fed-rounds 20 --seeds 0 \\
      --out /tmp/m1d                                                              # smoke

Every run is ``launch/configs/fedavg_mnist1d.py`` built by
``launch.experiment.build_experiment`` and run by ``simulation.simulate``:

* ``centralized`` (option ``centralized,<model>``): ONE client holding the
  4,000 training examples, full participation, the paper's optimizer (Adam,
  lr 1e-2, minibatches of 100, 6,000 steps; FedAdam with one client taking one
  local step of lr 1), for logistic regression, the MLP, the CNN (``cnn1d``)
  and the GRU (``gru``); the global test set is the paper's 1,000 test
  examples. The paper's table (arXiv 2011.14439, as in the mnist1d README):
  32%, 68%, 94%, 91%. One compiled program per model serves every seed
  (``make_round(seed=None)``).
* ``fedavg``: FedAvg with 100 clients at Dir(0.5) over the 4,000 training
  examples, 20 per round, B = 10, E = 1, client lr 0.1, 500 rounds, for the
  CNN and the MLP.

A seed changes the model init and the batch order (and, federated, the
partition, the clients' train/test splits and the cohorts), each from its own
stream of the run seed (:mod:`fedjax_sim.seeding`); the dataset itself is fixed
(``data.mnist1d_seed`` = 42). Spreads are sample standard deviations over seeds
(ddof = 1). Writes ``<out>/mnist1d.json`` (every curve, settings, wall times)
and ``<out>/mnist1d.png``, and prints the Markdown tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from fedjax_sim.launch import configs
from fedjax_sim.launch.experiment import build_experiment
from fedjax_sim.metrics import sample_std
from fedjax_sim.round import make_round
from fedjax_sim.simulation import simulate

# arXiv 2011.14439 (the table of the mnist1d README): centralized test accuracy.
PAPER = {"logreg": 0.32, "mlp": 0.68, "cnn1d": 0.94, "gru": 0.91}
LABELS = {"logreg": "logistic regression", "mlp": "MLP", "cnn1d": "CNN (cnn1d)",
          "gru": "GRU (gru)"}


def _config_module():
  spec = importlib.util.spec_from_file_location("fedavg_mnist1d", configs.path("fedavg_mnist1d"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _curve(history, key="test_accuracy"):
  return [(int(r["round"]), float(r[key])) for r in history if key in r]


def run_model(options: str, seeds, rounds: int, eval_every: int, share_program: bool):
  """Runs config ``fedavg_mnist1d:<options>`` for every seed; a dict of curves and times."""
  mod = _config_module()
  runs = []
  round_fn = None
  for seed in seeds:
    cfg = mod.get_config(options)
    cfg.seed, cfg.rounds, cfg.eval_every, cfg.progress = seed, rounds, eval_every, False
    cfg.rounds_per_call = min(cfg.rounds_per_call, eval_every)
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    if share_program and round_fn is None:  # the data is the same for every seed
      round_fn = make_round(exp.algorithm, exp.sampler, seed=None, mesh=exp.mesh,
                            chunk_size=cfg.chunk_size or None,
                            rounds_per_call=cfg.rounds_per_call)
    result = simulate(exp.algorithm, exp.sampler, exp.data, seed=seed, rounds=rounds,
                      rounds_per_call=cfg.rounds_per_call, eval_every=eval_every,
                      chunk_size=cfg.chunk_size or None, mesh=exp.mesh,
                      round_fn=round_fn if share_program else None,
                      diverged_hint=f" ({options} seed {seed}).")
    wall = time.perf_counter() - t0
    acc = _curve(result.history)
    runs.append({"seed": seed, "test_accuracy": acc,
                 "client_acc_mean": _curve(result.history, "client_acc_mean"),
                 "train_loss": _curve(result.history, "train_loss"),
                 "final": acc[-1][1], "best": max(a for _, a in acc),
                 "wall_s": wall, "train_s": float(sum(result.call_s))})
    print(f"  {options} seed {seed}: final {acc[-1][1]:.3f} best {runs[-1]['best']:.3f} "
          f"({wall:.1f} s)", flush=True)
  finals = [r["final"] for r in runs]
  return {"config": f"launch/configs/fedavg_mnist1d.py:{options}",
          "settings": {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)},
          "data": cfg.data.to_dict(), "model_kwargs": cfg.model_kwargs.to_dict(),
          "runs": runs, "final_mean": float(np.mean(finals)),
          "final_std": sample_std(finals) if len(finals) > 1 else 0.0,
          "best_mean": float(np.mean([r["best"] for r in runs])),
          "wall_s": float(sum(r["wall_s"] for r in runs))}


def _pct(x):
  return f"{100 * x:.1f}"


def tables(results) -> str:
  lines = ["| model | paper (arXiv 2011.14439; mnist1d README) | ours: final test accuracy, "
           "mean ± std | ours: best evaluation | seeds | wall (s, all seeds) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for m, r in results["centralized"].items():
    lines.append(f"| {LABELS[m]} | {_pct(PAPER[m])}% | {_pct(r['final_mean'])} ± "
                 f"{_pct(r['final_std'])}% | {_pct(r['best_mean'])}% | {len(r['runs'])} | "
                 f"{r['wall_s']:.0f} |")
  lines += ["", "| FedAvg, 100 clients, Dir(0.5), K = 20 | final global test accuracy, "
            "mean ± std | best evaluation | mean per-client accuracy (final) | seeds | "
            "wall (s, all seeds) |", "| --- | --- | --- | --- | --- | --- |"]
  for m, r in results["fedavg"].items():
    client = np.mean([c["client_acc_mean"][-1][1] for c in r["runs"] if c["client_acc_mean"]])
    lines.append(f"| {LABELS[m]} | {_pct(r['final_mean'])} ± {_pct(r['final_std'])}% | "
                 f"{_pct(r['best_mean'])}% | {_pct(client)}% | {len(r['runs'])} | "
                 f"{r['wall_s']:.0f} |")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = dict(zip(PAPER, ("tab:gray", "tab:blue", "tab:red", "tab:green")))

  def band(ax, r, color, label):
    steps = np.array([s for s, _ in r["runs"][0]["test_accuracy"]])
    accs = np.array([[a for _, a in run["test_accuracy"]] for run in r["runs"]])
    ax.plot(steps, accs.mean(0), color=color, label=label)
    if len(accs) > 1:
      ax.fill_between(steps, accs.min(0), accs.max(0), color=color, alpha=0.2)

  ax = axes[0]
  for m, r in results["centralized"].items():
    band(ax, r, colors[m], LABELS[m])
    ax.axhline(PAPER[m], color=colors[m], ls="--", lw=1)
  ax.set(title="Centralized (one client, Adam 1e-2, B = 100); dashed: paper",
         xlabel="step", ylabel="global test accuracy", ylim=(0, 1))
  ax.legend(loc="lower right", fontsize=8)
  ax = axes[1]
  for m, r in results["fedavg"].items():
    band(ax, r, colors[m], f"FedAvg {LABELS[m]}")
    if m in results["centralized"]:
      ax.axhline(results["centralized"][m]["final_mean"], color=colors[m], ls=":", lw=1)
  ax.set(title="FedAvg, 100 clients, Dir(0.5), K = 20; dotted: centralized",
         xlabel="round", ylabel="global test accuracy", ylim=(0, 1))
  ax.legend(loc="lower right", fontsize=8)
  fig.suptitle("MNIST-1D (5,000 examples: 4,000 train, 1,000 test); band: min-max over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="docs/results")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--central-models", default="logreg,mlp,cnn1d,gru")
  p.add_argument("--central-steps", type=int, default=6000)
  p.add_argument("--fed-models", default="cnn1d,mlp")
  p.add_argument("--fed-rounds", type=int, default=500)
  a = p.parse_args(argv)
  seeds = [int(s) for s in a.seeds.split(",")]
  t0 = time.perf_counter()
  results = {"paper": PAPER, "seeds": seeds, "centralized": {}, "fedavg": {}}
  for m in [m for m in a.central_models.split(",") if m]:
    results["centralized"][m] = run_model(f"centralized,{m}", seeds, a.central_steps,
                                          min(250, a.central_steps), share_program=True)
  for m in [m for m in a.fed_models.split(",") if m]:
    results["fedavg"][m] = run_model(m, seeds, a.fed_rounds, min(10, a.fed_rounds),
                                     share_program=False)
  results["total_wall_s"] = time.perf_counter() - t0
  results["tables_md"] = tables(results)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "mnist1d.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(a.out, "mnist1d.png"))
  print(results["tables_md"])
  print(f"total {results['total_wall_s']:.0f} s; wrote {a.out}/mnist1d.json, mnist1d.png")


if __name__ == "__main__":
  main()
