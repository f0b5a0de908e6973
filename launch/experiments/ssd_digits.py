"""SSD vs its bases on digits: global uniformity, k-NN and linear-probe accuracy.

Reproduces ``docs/results/ssd_digits.md`` (SSD: arXiv 2508.01251;
``docs/decisions.md#ssd``)::

  python -m fedjax_sim.launch.experiments.ssd_digits --out=docs/results

``--dataset=mnist1d`` runs the same grid on MNIST-1D (arXiv 2011.14439; views of
1-D signals from ``fedjax_sim.augment.augment_signal``) into ``ssd_mnist1d_*``.

Grid: methods {FedAlignUniform, FedSimCLR, SSD, SSD w/o PD, SSD w/o DSR} x
settings {cross-silo (10 clients, all join), cross-device (100 clients, 10 per
round)} x Dir(alpha) for alpha in {0.1, 0.5} x seeds {0, 1, 2}; configs from
``launch/configs/ssd_digits.py``. Each run trains with ``make_round`` and is
evaluated with :mod:`fedjax_sim.repr_metrics` every ``eval_every`` rounds
(round 0 is the random-init encoder). Raw pixels are evaluated as a reference.

Compile sharing (this machine has 2 CPU cores, and one round program compiles
in ~20 s): FedAlignUniform and the SSD ablations are one program (SSD's loss
with the weights (beta, gamma, delta) in the server state), and the seed is
the round function's traced argument (``make_round(seed=None)``); the data
arrays of all seeds are re-padded to a common N. A seed changes the
partition, the split, the init and every round key, each from its own stream
(:mod:`fedjax_sim.seeding`). So a (setting, alpha) cell compiles two round programs (the
AlignUniform family and FedSimCLR) and one evaluation.

Outputs under ``--out``: ``ssd_digits_results.json`` (every curve; rewritten
after each cell), ``ssd_digits_table.md`` (final-round mean +- std over seeds,
and per-seed differences to FedAlignUniform) and the PNG plots. The report's
grid ran as two processes (``--settings=silo`` and ``--settings=device``, each
to its own ``--out``) merged with ``--from_json=a.json,b.json``; cells are
independent, so this equals one ``--settings=silo,device`` run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.client_data import pad_examples
from fedjax_sim.algorithms.registry import BuildContext, DataSpec, build
from fedjax_sim.algorithms.ssl import SSLModel
from fedjax_sim.launch.experiment import complete_config
from fedjax_sim.augment import AugmentConfig, augment_batch
from fedjax_sim.data import build_federated_data
from fedjax_sim.launch.configs.ssd_digits import get_config
from fedjax_sim.repr_metrics import make_repr_eval
from fedjax_sim.round import make_mesh, make_round, replicate
from fedjax_sim.simulation import simulate
from fedjax_sim import sampling
from fedjax_sim.metrics import sample_std

# name -> (program, loss weights (beta, gamma, delta))
METHODS: dict[str, tuple[str, dict]] = {
    "FedAlignUniform": ("alignuniform", dict(beta=1.0, gamma=0.0, delta=0.0)),
    "SSD": ("alignuniform", dict(beta=1.0, gamma=1.0, delta=0.1)),
    "SSD w/o PD": ("alignuniform", dict(beta=1.0, gamma=1.0, delta=0.0)),
    "SSD w/o DSR": ("alignuniform", dict(beta=1.0, gamma=0.0, delta=0.1)),
    "FedSimCLR": ("simclr", {}),
}
METRICS = ("uniformity_global_enc", "uniformity_global_proj", "uniformity_local_enc",
           "uniformity_local_proj", "uniformity_test_enc", "alignment_test_enc",
           "alignment_test_proj", "knn_accuracy", "linear_probe_accuracy")


def run_cell(setting: str, alpha: float, seeds: list[int], methods: list[str],
             rounds: int | None, dataset: str = "digits") -> dict[str, Any]:
  """All methods and seeds of one (setting, alpha) cell; returns curves per method/seed."""
  cfg = get_config(setting)
  cfg.data.alpha = alpha
  if dataset != "digits":  # e.g. mnist1d: the same methods and knobs on other data
    cfg.data.dataset = dataset
  if rounds:
    cfg.rounds = rounds
    cfg.eval_every = cfg.rounds_per_call = min(cfg.eval_every, rounds)
  c, k, b = cfg.data.num_clients, cfg.clients_per_round, cfg.batch_size
  mesh = make_mesh(1)
  datas = {s: build_federated_data(cfg.data, batch_size=b, seed=s) for s in seeds}
  n_max = max(d.train.y.shape[1] for d in datas.values())
  trains = {s: replicate(pad_examples(d.train, n_max), mesh) for s, d in datas.items()}
  pool = max(int(np.sum(d.train.num_examples)) for d in datas.values())
  test_x, test_y = datas[seeds[0]].test_x, datas[seeds[0]].test_y  # same for every seed

  d0 = datas[seeds[0]]
  ctx = BuildContext.from_config(cfg, DataSpec(d0.input_shape, d0.num_classes, c))
  knobs = {}
  for name in ("ssd", "fedsimclr"):  # each method's knob sub-dict, completed from its defaults
    cfg.algorithm = name
    complete_config(cfg)
    knobs[name] = cfg[name].to_dict()
  s, ev = cfg.ssd, cfg.ssl_eval
  model = SSLModel(dim=s.dim, encoder_kind=s.encoder_kind,
                   encoder_hidden=tuple(s.encoder_hidden), projector_hidden=s.projector_hidden)
  aug = AugmentConfig.from_dict(s.augment.to_dict())
  programs = {"alignuniform": build("ssd", ctx, knobs["ssd"]),
              "simclr": build("fedsimclr", ctx, knobs["fedsimclr"])}
  features = lambda p, x: model.apply({"params": p}, x)
  aug_fn = lambda key, x: augment_batch(key, x, aug)
  evals = {sd: make_repr_eval(features, trains[sd], test_x, test_y, num_classes=10,
                              augment_fn=aug_fn, t=s.t, knn_k=ev.knn_k, knn_t=ev.knn_t,
                              probe_steps=ev.probe_steps, pool_size=pool) for sd in seeds}
  eval_key = jax.random.PRNGKey(1234)
  out: dict[str, Any] = {"setting": setting, "alpha": alpha, "clients": c,
                         "clients_per_round": k, "rounds": cfg.rounds,
                         "local_epochs": cfg.local_epochs, "batch_size": b, "runs": {}}
  # Reference: raw pixels as features (the same metrics on x itself).
  raw = lambda p, x: (x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1))
  out["raw_pixels"] = {sd: make_repr_eval(
      raw, trains[sd], test_x, test_y, num_classes=10, augment_fn=aug_fn, t=s.t,
      knn_k=ev.knn_k, knn_t=ev.knn_t, probe_steps=ev.probe_steps, pool_size=pool)(None, eval_key)
      for sd in seeds}

  round_fns = {}
  sampler = sampling.uniform(c, k)
  rpc = math.gcd(cfg.rounds_per_call, cfg.rounds)  # calls end on the last round
  for name in methods:
    prog, coef = METHODS[name]
    alg = programs[prog]
    if prog not in round_fns:
      round_fns[prog] = make_round(alg, sampler, seed=None, mesh=mesh,
                                   chunk_size=cfg.chunk_size or None, rounds_per_call=rpc)
    out["runs"][name] = {}
    for sd in seeds:
      t0 = time.time()
      losses = []

      def evaluate(r, state, train_metrics):  # every call; round 0 is the random-init encoder
        losses.extend(float(v) for v in np.asarray(train_metrics.get("loss", [])))
        return {"round": r, **evals[sd](state.server.params, eval_key)}

      init = None
      if coef:  # the loss weights live in the server state (one program for the family)
        init = lambda st: st._replace(server=st.server._replace(
            coef={kk: jnp.float32(v) for kk, v in coef.items()}))
      run = simulate(alg, sampler, datas[sd], seed=sd, rounds=cfg.rounds, rounds_per_call=rpc,
                     eval_every=rpc, mesh=mesh, round_fn=round_fns[prog], train=trains[sd],
                     init=init, evaluate=evaluate,
                     diverged_hint=f" ({name}, seed {sd}, {setting} Dir({alpha})).")
      curve = run.history
      out["runs"][name][str(sd)] = {"curve": curve, "loss": losses, "wall_s": time.time() - t0}
      last = curve[-1]
      print(f"[{setting} a={alpha}] {name:16s} seed {sd}: unif_g_enc "
            f"{last['uniformity_global_enc']:.3f} unif_g_proj {last['uniformity_global_proj']:.3f}"
            f" knn {last['knn_accuracy']:.3f} lp {last['linear_probe_accuracy']:.3f} "
            f"({time.time() - t0:.1f}s)", flush=True)
  return out


def summarize(cells: list[dict]) -> str:
  """Markdown table: final-round mean +- std over seeds (-L_uniform: higher = more uniform)."""
  cols = [("uniformity_global_enc", "-L_unif global (enc)", -1),
          ("uniformity_global_proj", "-L_unif global (proj)", -1),
          ("uniformity_local_enc", "-L_unif local (enc)", -1),
          ("alignment_test_enc", "L_align test (enc)", 1),
          ("knn_accuracy", "k-NN acc", 1), ("linear_probe_accuracy", "linear-probe acc", 1)]
  lines = []
  for cell in cells:
    lines += [f"\n**{cell['setting']}**, {cell['clients']} clients, {cell['clients_per_round']} "
              f"per round, Dir({cell['alpha']}), {cell['rounds']} rounds, E = "
              f"{cell['local_epochs']}, B = {cell['batch_size']}\n",
              "| method | " + " | ".join(c[1] for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    rows = {n: [r["curve"][-1] for r in runs.values()] for n, runs in cell["runs"].items()}
    rows["raw pixels (reference)"] = list(cell["raw_pixels"].values())
    rows["random-init encoder"] = [r["curve"][0] for r in
                                   next(iter(cell["runs"].values())).values()]
    for n, finals in rows.items():
      cells_txt = []
      for key, _, sign in cols:
        v = sign * np.array([f[key] for f in finals])
        cells_txt.append(f"{v.mean():.3f} ± {sample_std(v):.3f}")
      lines.append(f"| {n} | " + " | ".join(cells_txt) + " |")
  lines.append(_paired(cells))
  return "\n".join(lines) + "\n"


def _paired(cells: list[dict]) -> str:
  """Per-seed differences to FedAlignUniform (same seed = same partition and init)."""
  cols = [("uniformity_global_enc", "Δ -L_unif global (enc)", -1),
          ("uniformity_global_proj", "Δ -L_unif global (proj)", -1),
          ("knn_accuracy", "Δ k-NN acc", 1), ("linear_probe_accuracy", "Δ linear-probe acc", 1)]
  lines = ["\n**Paired differences to FedAlignUniform** (final round, per seed; mean ± std, "
           "and how many seeds are > 0)\n",
           "| setting | method | " + " | ".join(c[1] for c in cols) + " |",
           "|---" * (len(cols) + 2) + "|"]
  for cell in cells:
    base = cell["runs"].get("FedAlignUniform")
    if base is None:
      continue
    for name, runs in cell["runs"].items():
      if name == "FedAlignUniform":
        continue
      txt = []
      for key, _, sign in cols:
        d = np.array([sign * (runs[sd]["curve"][-1][key] - base[sd]["curve"][-1][key])
                      for sd in runs])
        txt.append(f"{d.mean():+.3f} ± {sample_std(d):.3f} ({int(np.sum(d > 0))}/{d.size})")
      lines.append(f"| {cell['setting']} Dir({cell['alpha']}) | {name} | " + " | ".join(txt)
                   + " |")
  return "\n".join(lines)


def plot(cells: list[dict], out_dir: str, dataset: str = "digits") -> list[str]:
  """One figure per metric: rows = settings, cols = alphas; mean +- std bands over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  specs = [("uniformity_global_enc", "-L_uniform, global, encoder features", -1,
            "ssd_digits_global_uniformity.png"),
           ("uniformity_global_proj", "-L_uniform, global, projector output", -1,
            "ssd_digits_global_uniformity_proj.png"),
           ("knn_accuracy", "k-NN accuracy (test)", 1, "ssd_digits_knn.png"),
           ("linear_probe_accuracy", "linear-probe accuracy (test)", 1,
            "ssd_digits_linear_probe.png")]
  settings = sorted({c["setting"] for c in cells}, key=["silo", "device"].index)
  alphas = sorted({c["alpha"] for c in cells})
  for key, label, sign, fname in specs:
    fig, axes = plt.subplots(len(settings), len(alphas), figsize=(5 * len(alphas),
                                                                   3.6 * len(settings)),
                             squeeze=False)
    for cell in cells:
      ax = axes[settings.index(cell["setting"])][alphas.index(cell["alpha"])]
      for name, runs in cell["runs"].items():
        curves = [r["curve"] for r in runs.values()]
        x = [p["round"] for p in curves[0]]
        y = sign * np.array([[p[key] for p in cv] for cv in curves])
        ax.plot(x, y.mean(0), label=name, marker="o", ms=3)
        sd = sample_std(y)
        ax.fill_between(x, y.mean(0) - sd, y.mean(0) + sd, alpha=0.15)
      rawv = sign * np.mean([r[key] for r in cell["raw_pixels"].values()])
      ax.axhline(rawv, color="gray", ls="--", lw=1, label="raw pixels")
      ax.set_title(f"{cell['setting']} ({cell['clients']} clients, {cell['clients_per_round']}"
                   f"/round), Dir({cell['alpha']})", fontsize=9)
      ax.set_xlabel("round")
      ax.set_ylabel(label, fontsize=8)
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{dataset}: {label} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, fname.replace("digits", dataset))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="docs/results")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--settings", default="silo,device")
  p.add_argument("--alphas", default="0.1,0.5")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--rounds", type=int, default=0, help="override the config's rounds (0 = keep)")
  p.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"),
                 help="data of every cell (outputs ssd_<dataset>_*)")
  p.add_argument("--from_json", default="", help="only re-make the table and plots from "
                 "results JSONs (comma-separated, cells concatenated) of earlier runs")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  name = f"ssd_{a.dataset}"
  if a.from_json:
    cells = []
    for path in a.from_json.split(","):
      with open(path) as f:
        cells += json.load(f)["cells"]
    table = summarize(cells)
    with open(os.path.join(a.out, f"{name}_table.md"), "w") as f:
      f.write(table)
    plot(cells, a.out, a.dataset)
    print(table)
    return
  seeds = [int(x) for x in a.seeds.split(",")]
  methods = [m.strip() for m in a.methods.split(",")]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method '{m}'; choose from {', '.join(METHODS)}.")
  t0 = time.time()
  command = "python -m fedjax_sim.launch.experiments.ssd_digits " + " ".join(
      argv if argv is not None else sys.argv[1:])
  cells = []
  for st in a.settings.split(","):
    for al in a.alphas.split(","):
      cells.append(run_cell(st, float(al), seeds, methods, a.rounds or None, a.dataset))
      res = {"command": command, "wall_s": time.time() - t0, "device": str(jax.devices()[0]),
             "cells": cells}
      with open(os.path.join(a.out, f"{name}_results.json"), "w") as f:
        json.dump(res, f)  # after every cell, so an interrupted grid keeps what it finished
  table = summarize(cells)
  with open(os.path.join(a.out, f"{name}_table.md"), "w") as f:
    f.write(table)
  paths = plot(cells, a.out, a.dataset)
  print(table)
  print(f"wrote {a.out}/{name}_results.json, {name}_table.md, " + ", ".join(
      os.path.basename(x) for x in paths) + f" in {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
