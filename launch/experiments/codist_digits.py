"""CODIST on digits: FedAvg vs PERIODIC vs MERGED for both models, and domain shift.

Reproduces ``docs/results/codist_digits.md`` (arXiv 2310.02549;
``docs/decisions.md#knowledge-codistillation``; [ours] rules: ``algorithms/codist.py``)::

  python -m fedjax_sim.launch.experiments.codist_digits --out=docs/results

``--dataset=mnist1d`` runs the same settings on MNIST-1D (arXiv 2011.14439) with
100 clients, K = 20 for the small pool and 10 for the large one (the digits
run's fractions), into ``codist_mnist1d_*``.

Settings (knobs from ``launch/configs/codist_digits.py``):

* ``capacity``: 50 clients, Dir(0.5) over the digits train split minus 250
  held-out unlabeled server examples; small ``mlp_s`` on all clients (K = 10),
  large ``mlp_l`` on clients 0-14 (30%, K = 5).
* ``domain``: clients 0-14 (large pool) hold only digits 0-3, clients 15-49
  (small pool, disjoint) only digits 4-7; digits 8-9 are held by no client.
  Server sets: ``in`` = 250 unlabeled examples of digits 0-7, ``ood`` = 250 of
  digits 8-9. Accuracy is reported on the global test set's digits 0-3 and 4-7.

Methods: FedAvg (FedAdam, no distillation), PERIODIC (s = 50 every p = 10
rounds), MERGED (s = 5 every round, alpha in {0.1, 0.3, 0.5}); seeds 0, 1, 2.
A seed changes the client partition, the model init, the cohort draws, the
clients' batch order and the distillation batches (every draw has its own
stream of the run seed, :mod:`fedjax_sim.seeding`); the server sets and the
pools are fixed across seeds (``codist.server_seed``, fixed ids). One round
program serves every method and seed (mode and knobs live in the server state,
the seed is the round function's traced argument, ``make_round(seed=None)``). Spreads are sample standard deviations over seeds (ddof = 1). Outputs under ``--out``: ``codist_digits_results.json`` (every curve),
``codist_digits_table.md`` and the PNG plots.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from fedjax_sim.metrics import sample_std
from fedjax_sim.client_data import pad_examples
from fedjax_sim.algorithms import server_optimizer
from fedjax_sim.algorithms.codist import codist, make_knobs, make_predict
from fedjax_sim.algorithms.pooled import DataSpec
from fedjax_sim.data import build_codist_data
from fedjax_sim.launch.configs.codist_digits import get_config
from fedjax_sim.launch.experiment import complete_config
from fedjax_sim.round import make_mesh, make_round, replicate
from fedjax_sim.simulation import simulate

CAPACITY_METHODS = {  # name -> (mode, knob overrides)
    "FedAvg": ("fedavg", {}),
    "PERIODIC": ("periodic", {"steps": 50}),
    "MERGED a=0.1": ("merged", {"alpha": 0.1}),
    "MERGED a=0.3": ("merged", {"alpha": 0.3}),
    "MERGED a=0.5": ("merged", {"alpha": 0.5}),
}
DOMAIN_METHODS = {  # name -> (mode, knob overrides, server set)
    "FedAvg": ("fedavg", {}, "in"),
    "PERIODIC (in-domain data)": ("periodic", {"steps": 50}, "in"),
    "MERGED (in-domain data)": ("merged", {}, "in"),
    "PERIODIC (OOD data 8-9)": ("periodic", {"steps": 50}, "ood"),
    "MERGED (OOD data 8-9)": ("merged", {}, "ood"),
    # Ten times the distillation lr (stronger teachers; not tuned further).
    "PERIODIC (in-domain, lr 1e-3)": ("periodic", {"steps": 50, "lr": 1e-3}, "in"),
    "MERGED (in-domain, lr 1e-3)": ("merged", {"lr": 1e-3}, "in"),
}


def run_setting(setting: str, seeds, rounds: int, methods: dict, dataset: str = "digits") -> dict:
  cfg = get_config("domain_shift" if setting == "domain" else "merged")
  if dataset != "digits":  # 100 clients, the digits run's fractions per round (20%, 1/3 of 30)
    cfg.data.dataset, cfg.data.num_clients, cfg.clients_per_round = dataset, 100, 20
    cfg.codist.k_large = 10
  complete_config(cfg)  # cfg.codist: every knob (codist(...)'s defaults where the file sets none)
  c = cfg.codist
  domain = setting == "domain"
  datas = {s: build_codist_data(
      dataset=cfg.data.dataset, num_clients=cfg.data.num_clients, large_fraction=c.large_fraction,
      server_size=cfg.data.server_size, partition=cfg.data.partition, alpha=cfg.data.alpha,
      domain_classes=cfg.data.domain_classes if domain else None,
      ood_classes=cfg.data.ood_classes if domain else None, batch_size=cfg.batch_size, seed=s,
      server_seed=cfg.data.server_seed) for s in seeds}
  d0 = datas[seeds[0]]
  spec = DataSpec(d0.fed.input_shape, d0.fed.num_classes, d0.fed.num_clients)
  mesh = make_mesh(1)
  n_max = max(d.fed.train.y.shape[1] for d in datas.values())
  trains = {s: replicate(pad_examples(d.fed.train, n_max), mesh) for s, d in datas.items()}
  alg = codist(*cfg.archs, spec, large_ids=d0.large_ids,
               small_ids=d0.small_ids, server_x=d0.server_sets["in"], mode="fedavg",
               distill_batch=c.distill_batch, k_small=cfg.clients_per_round, k_large=c.k_large,
               server_opt=server_optimizer("adam", cfg.server_lr, cfg.server_b1, cfg.server_b2,
                                           cfg.server_tau),
               client_lr=cfg.client_lr, batch_size=cfg.batch_size, epochs=cfg.local_epochs)
  for d in datas.values():  # pools are fixed ids: every seed must agree
    assert np.array_equal(d.large_ids, d0.large_ids) and np.array_equal(d.small_ids, d0.small_ids)
  every = 1  # evaluate every round (cheap), so PERIODIC's post-distillation spikes show
  round_fn = make_round(alg, seed=None, mesh=mesh, rounds_per_call=every, donate=True)
  predict = make_predict(alg)
  test_x, test_y = d0.fed.test_x, np.asarray(d0.fed.test_y)
  subsets = {"all": np.ones_like(test_y, bool)}
  if domain:
    subsets = {"A(0-3)": np.isin(test_y, cfg.data.domain_classes[0]),
               "B(4-7)": np.isin(test_y, cfg.data.domain_classes[1])}
  out = {"setting": setting, "rounds": rounds, "seeds": list(seeds), "runs": {},
         "server_idx": {k: v.tolist() for k, v in d0.server_idx.items()},
         "large_ids": d0.large_ids.tolist(), "small_ids": d0.small_ids.tolist()}
  for name, spec_m in methods.items():
    mode, over, server = (spec_m + ("in",))[:3]
    for s in seeds:
      t0 = time.time()
      knobs = dict(alpha=c.alpha, period=c.period, steps=c.distill_steps, lr=c.distill_lr,
                   temperature=c.temperature, salt=s)
      knobs.update(over)
      server_x = jnp.asarray(datas[s].server_sets[server])
      last = {}  # the training metrics of the last call

      def init(state):  # the method and its server set live in the server state
        return state._replace(server=state.server._replace(knobs=make_knobs(mode, **knobs),
                                                           server_x=server_x))

      def evaluate(r, state, train_metrics):
        ps, pl = (np.asarray(p) for p in predict(state.server, test_x))
        row = {"round": r}
        for model, pred in (("small", ps), ("large", pl)):
          for sub, m in subsets.items():
            row[f"{model}/{sub}"] = float(np.mean(pred[m] == test_y[m]))
        last.update(train_metrics)
        return row

      run = simulate(alg, None, datas[s].fed, seed=s, rounds=rounds, rounds_per_call=every,
                     eval_every=every, mesh=mesh, round_fn=round_fn, train=trains[s], init=init,
                     evaluate=evaluate, diverged_hint=f" ({setting} {name}, seed {s}).")
      curve = run.history
      kl = {k: float(np.mean(v)) for k, v in last.items() if "distill/kl" in k}
      out["runs"].setdefault(name, {})[str(s)] = {"curve": curve, "last_kl": kl}
      print(f"{setting} {name} seed {s}: {curve[-1]} ({time.time() - t0:.1f}s)", flush=True)
  return out


def _final(run, key, last=1):
  """Mean over the last ``last`` evaluations of one run."""
  return float(np.mean([row[key] for row in run["curve"][-last:]]))


def table(res: dict, keys, peak_keys=()) -> list[str]:
  """Final-round accuracy (%) mean ± std over seeds; ``peak_keys`` also get the
  best accuracy over rounds 1..R (mean over seeds of each run's maximum)."""
  seeds = res["seeds"]
  cols = list(keys) + [f"peak {k}" for k in peak_keys]
  lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, runs in res["runs"].items():
    cells = []
    for k in keys:
      v = np.array([_final(runs[str(s)], k) for s in seeds]) * 100
      cells.append(f"{v.mean():.1f} ± {sample_std(v):.1f}")
    for k in peak_keys:
      v = np.array([max(r[k] for r in runs[str(s)]["curve"] if r["round"] > 0)
                    for s in seeds]) * 100
      cells.append(f"{v.mean():.1f} ± {sample_std(v):.1f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def plot(res: dict, keys, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
  for ax, k in zip(axes[0], keys):
    for name, runs in res["runs"].items():
      curves = np.array([[row[k] for row in runs[str(s)]["curve"]] for s in res["seeds"]])
      rounds = [row["round"] for row in runs[str(res["seeds"][0])]["curve"]]
      m, sd = curves.mean(0) * 100, sample_std(curves) * 100
      ax.plot(rounds, m, label=name)
      ax.fill_between(rounds, m - sd, m + sd, alpha=0.15)
    ax.set_title(k)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--rounds", type=int, default=100)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--settings", default="capacity,domain")
  ap.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"),
                  help="mnist1d: 100 clients, K = 20 and 10 (outputs codist_mnist1d_*)")
  args = ap.parse_args()
  name = f"codist_{args.dataset}"
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  results, lines = {}, []
  t0 = time.time()
  for setting in args.settings.split(","):
    methods = CAPACITY_METHODS if setting == "capacity" else DOMAIN_METHODS
    res = run_setting(setting, seeds, args.rounds, methods, args.dataset)
    results[setting] = res
    if setting == "capacity":
      keys = ["small/all", "large/all"]
      plot(res, keys, os.path.join(args.out, f"{name}_capacity.png"),
           f"CODIST on {args.dataset}, capacity pools (mean ± std over seeds)")
    else:
      keys = ["small/B(4-7)", "small/A(0-3)", "large/A(0-3)", "large/B(4-7)"]
      plot(res, keys, os.path.join(args.out, f"{name}_domain.png"),
           f"CODIST on {args.dataset}, domain shift: small pool 4-7, large pool 0-3")
    lines += [f"### {setting} (final round {args.rounds}, mean ± std over seeds {seeds})", ""]
    peak = [k for k in keys if k in ("small/A(0-3)", "large/B(4-7)")]
    lines += table(res, keys, peak) + [""]
  lines.append(f"total wall time {time.time() - t0:.0f} s")
  with open(os.path.join(args.out, f"{name}_results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(args.out, f"{name}_table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
