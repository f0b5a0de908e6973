"""FedMuscle vs pairwise InfoNCE vs Gramian vs local training on multi-task, multi-model digits.

Reproduces ``docs/results/fedmuscle_digits.md`` (FedMuscle: arXiv 2602.01626;
``docs/decisions.md#fedmuscle``)::

  python -m fedjax_sim.launch.experiments.fedmuscle_digits --out=docs/results

Setup (``launch/configs/fedmuscle_digits.py``): 12 users, architecture
``archs[u % 3]`` (MODEL_ZOO mlp_s, mlp_m, cnn_s + a Dense(32) projection),
task ``tasks[u % 4]`` (digit10, parity, gt4, mod3), 40 labeled digits each
(IID), a 300-digit public split no user owns (dataset ``digits_multitask``,
``fedjax_sim.data.build_multitask_digits``), every user evaluated on the 450-digit
global test set under its own task. All methods and seeds run one compiled
round program (the method lives in the server state, the seed is the round
function's traced argument, ``make_round(seed=None)``); the run seed drives
the partition, init and round keys, each from its own stream
(:mod:`fedjax_sim.seeding`).

FedMuscle's baselines FedHeNN (``fedhenn``) and CoFED (``cofed_cotrain``)
run when listed in ``--methods`` (or ``cfg.methods``), each as its own program
on the same users, models, fine-tuning and public batches, Delta against the
same ``local`` runs (knobs ``cfg.fedhenn`` / ``cfg.cofed_cotrain``)::

  python -m fedjax_sim.launch.experiments.fedmuscle_digits --out=/tmp/fm \
      --methods=local,muscle,fedhenn,cofed_cotrain

Outputs under ``--out``: ``fedmuscle_digits_results.json`` (per-user
accuracies every ``rounds_per_call`` rounds, per method and seed) and
``fedmuscle_digits_table.md`` (Delta(%) vs local training, mean +- std over
seeds: the sample standard deviation, ddof = 1; and mean accuracy per task).
``--dataset=mnist1d`` runs the config's ``mnist1d`` variant (100 users, Dir(0.5),
MNIST-1D architectures; ``docs/results/fedmuscle_mnist1d.md``) into
``fedmuscle_mnist1d_results.json`` and ``fedmuscle_mnist1d_table.md``.

``--sweep-m=1,2,3,4`` runs local training, FedMuscle and pairwise InfoNCE once
per M (the number of other users' matrices per anchor; one program per M) into
``fedmuscle_<dataset>[_<config>]_msweep_results.json`` and ``..._msweep_table.md``:
Delta(%) against the same M's local runs, and the scalars a user receives per
round (ours: the M matrices, M B d; a server that builds the paper's B^M
tuple set S: B^M d).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_sim.algorithms import cofed, fedhenn, knob_defaults
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.data import TASK_NAMES, build_federated_data
from fedjax_sim.evaluation import make_evaluate
from fedjax_sim.metrics import sample_std
from fedjax_sim.launch.configs.fedmuscle_digits import get_config
from fedjax_sim.launch.experiment import complete_config
from fedjax_sim.round import make_mesh, make_round
from fedjax_sim.simulation import simulate


def user_accuracy(raw, algorithm) -> np.ndarray:
  """float [C] per-user accuracy in global user order from ``make_evaluate`` outputs."""
  num = sum(len(p.client_ids) for p in algorithm.pools)
  acc = np.zeros(num)
  for p in algorithm.pools:
    c = np.asarray(raw[f"{p.name}/client_correct"])
    n = np.asarray(raw[f"{p.name}/client_count"])
    acc[np.asarray(p.client_ids)] = c / n
  return acc


# FedMuscle's baselines with their own programs (knobs: cfg.<method>, their constructors'
# defaults where unset); the other methods are fm.METHODS, one shared program.
BASELINES = {"fedhenn": fedhenn.fedhenn, "cofed_cotrain": cofed.cofed_cotrain}


def baseline(method: str, cfg, data):
  """``method`` of :data:`BASELINES` on ``data``'s users, tasks and public set.

  Same users, models (archs, d), local fine-tuning and public batches as FedMuscle.
  """
  extra = {"task_label_map": data.aux["task_label_map"]} if method == "cofed_cotrain" else {}
  return BASELINES[method](cfg.archs, data.aux["tasks"], data.aux["public_x"],
                           input_shape=data.input_shape, task_classes=data.aux["task_classes"],
                           **extra, **dict(cfg.get(method) or {}), client_lr=cfg.client_lr,
                           client_momentum=cfg.client_momentum, batch_size=cfg.batch_size,
                           epochs=cfg.local_epochs)


def run(cfg, log=print) -> dict:
  """Every (seed, method) run of ``cfg``; returns the results dict."""
  mesh = make_mesh(1)
  complete_config(cfg)  # cfg.fedmuscle: every knob (fedmuscle(...)'s defaults where unset)
  datas = {s: build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=s)
           for s in cfg.seeds}
  d0 = datas[cfg.seeds[0]]
  tasks = d0.aux["tasks"]
  shapes = {tuple(d.train.y.shape) for d in datas.values()}
  if len(shapes) != 1:
    raise ValueError(f"seeds give different padded shapes {shapes}; they cannot share a program.")
  alg = fm.fedmuscle(cfg.archs, tasks, d0.aux["public_x"], input_shape=d0.input_shape,
                     task_classes=d0.aux["task_classes"], **cfg.fedmuscle,
                     client_lr=cfg.client_lr, client_momentum=cfg.client_momentum,
                     batch_size=cfg.batch_size, epochs=cfg.local_epochs)
  rpc = math.gcd(cfg.rounds_per_call, cfg.rounds)  # calls end on the last round
  round_fn = make_round(alg, seed=None, mesh=mesh, rounds_per_call=rpc)
  evaluate = make_evaluate(alg)
  programs = {m: (alg, round_fn, evaluate) for m in fm.METHODS}
  for m in cfg.methods:
    if m not in programs and m not in BASELINES:
      raise ValueError(f"method '{m}' unknown; use {fm.METHODS + tuple(BASELINES)}.")
    if m in BASELINES:
      cfg[m] = ml_collections.ConfigDict({**knob_defaults(m), **dict(cfg.get(m) or {})})
      b = baseline(m, cfg, d0)
      programs[m] = (b, make_round(b, seed=None, mesh=mesh, rounds_per_call=rpc),
                     make_evaluate(b))
  num_users = cfg.data.num_clients
  out = {"config": cfg.to_dict(), "public_idx": d0.aux["public_idx"].tolist(),
         "tasks": [TASK_NAMES[t] for t in tasks],
         "archs": [cfg.archs[u % len(cfg.archs)] for u in range(num_users)], "runs": {}}
  for seed in cfg.seeds:
    data = datas[seed]
    for method in cfg.methods:
      t0 = time.time()
      alg, round_fn, evaluate = programs[method]

      def evaluate_row(r, state, train_metrics):  # after every call
        acc = user_accuracy(evaluate(state.server, state.clients, data.test, None, None), alg)
        # Loss means by XLA (jnp), as the report's numbers were computed.
        return {"round": r, "acc": acc.tolist(),
                "train_loss": float(jnp.mean(train_metrics["loss"])),
                "align_loss": float(jnp.mean(train_metrics["align_loss"]))}

      # The method and every user's task live in the state: one program for all runs.
      init = lambda st: fm.with_tasks(st, alg, data.aux["tasks"])
      if method in fm.METHODS:
        init = lambda st: fm.set_method(fm.with_tasks(st, alg, data.aux["tasks"]), method)
      curve = simulate(alg, None, data, seed=seed, rounds=cfg.rounds, rounds_per_call=rpc,
                       eval_every=rpc, mesh=mesh, round_fn=round_fn, init=init,
                       evaluate=evaluate_row, eval_initial=False,
                       diverged_hint=f" ({method}, seed {seed}).").history
      wall = time.time() - t0
      out["runs"][f"{method}/{seed}"] = {"curve": curve, "wall_s": wall}
      log(f"seed {seed} {method:9s} acc {np.mean(curve[-1]['acc']):.4f} "
          f"align_loss {curve[-1]['align_loss']:.3f} ({wall:.0f} s)")
  return out


def table(res: dict) -> str:
  """Markdown: Delta(%) vs local (mean +- std over seeds), mean accuracy per task."""
  cfg = res["config"]
  tasks, methods, seeds = res["tasks"], cfg["methods"], cfg["seeds"]
  final = {k: np.array(v["curve"][-1]["acc"]) for k, v in res["runs"].items()}
  names = sorted(set(tasks), key=tasks.index)
  lines = ["| method | Delta(%) mean +- std over seeds | per-seed Delta(%) | mean acc | "
           + " | ".join(f"{t} acc" for t in names) + " |",
           "|---" * (4 + len(names)) + "|"]
  for m in methods:
    deltas = [fm.delta_percent(final[f"{m}/{s}"], final[f"local/{s}"]) for s in seeds]
    accs = np.stack([final[f"{m}/{s}"] for s in seeds])  # [S, C]
    per_task = [np.mean(accs[:, [u for u, t in enumerate(tasks) if t == n]]) for n in names]
    lines.append(f"| {m} | {np.mean(deltas):+.2f} +- {sample_std(deltas):.2f} | "
                 + ", ".join(f"{x:+.2f}" for x in deltas) + f" | {np.mean(accs):.4f} | "
                 + " | ".join(f"{x:.4f}" for x in per_task) + " |")
  return "\n".join(lines) + "\n"


def sweep_m(cfg, ms, log=print) -> dict:
  """:func:`run` of local, muscle and pairwise once per M in ``ms``; results by M."""
  out = {}
  for m in ms:
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.fedmuscle = ml_collections.ConfigDict({**dict(cfg.get("fedmuscle") or {}), "M": m})
    c.methods = ("local", "muscle", "pairwise")
    t0 = time.time()
    out[str(m)] = run(c, log=lambda line, m=m: log(f"M={m} {line}"))
    out[str(m)]["wall_s"] = time.time() - t0
  return out


def sweep_table(res: dict) -> str:
  """Markdown: per M, Delta(%) of muscle and pairwise vs that M's local runs, and downlink size."""
  lines = ["| M (N = M + 1) | method | Delta(%) mean +- std over seeds | per-seed Delta(%) | "
           "mean acc | received per user per round, ours (M B d) | the paper's S (B^M d) | "
           "wall s (3 methods, all seeds) |", "|---" * 8 + "|"]
  for m, r in res.items():
    cfg = r["config"]
    b, d = cfg["fedmuscle"]["public_batch"], cfg["fedmuscle"]["proj_dim"]
    final = {k: np.array(v["curve"][-1]["acc"]) for k, v in r["runs"].items()}
    for meth in ("muscle", "pairwise"):
      deltas = [fm.delta_percent(final[f"{meth}/{s}"], final[f"local/{s}"])
                for s in cfg["seeds"]]
      acc = np.mean([final[f"{meth}/{s}"] for s in cfg["seeds"]])
      lines.append(f"| {m} | {meth} | {np.mean(deltas):+.2f} +- {sample_std(deltas):.2f} | "
                   + ", ".join(f"{x:+.2f}" for x in deltas) + f" | {acc:.4f} | "
                   f"{int(m) * b * d:,} | {b ** int(m) * d:,} | {r['wall_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--config", default="", help="get_config argument ('smoke' for a quick run)")
  ap.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"))
  ap.add_argument("--rounds", type=int, default=0, help="override cfg.rounds")
  ap.add_argument("--methods", default="", help="override cfg.methods (comma list; also "
                  + ", ".join(BASELINES) + ")")
  ap.add_argument("--sweep-m", default="", help="comma list of M: run local, muscle and "
                  "pairwise once per M (writes ..._msweep_*)")
  args = ap.parse_args(argv)
  cfg = get_config(",".join(a for a in ("" if args.dataset == "digits" else args.dataset,
                                         args.config) if a))
  if args.rounds:
    cfg.rounds = args.rounds
  if args.methods:
    cfg.methods = tuple(args.methods.split(","))
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  suffix = f"_{args.config}" if args.config else ""
  if args.sweep_m:
    ms = [int(m) for m in args.sweep_m.split(",")]
    if min(ms) < 1:
      raise ValueError(f"--sweep-m={args.sweep_m}: M counts other users, so M >= 1.")
    res = {"by_m": sweep_m(cfg, ms), "total_wall_s": time.time() - t0,
           "devices": str(jax.devices())}
    stem = os.path.join(args.out, f"fedmuscle_{args.dataset}{suffix}_msweep")
    with open(stem + "_results.json", "w") as f:
      json.dump(res, f)
    md = sweep_table(res["by_m"])
    with open(stem + "_table.md", "w") as f:
      f.write(md)
    print(md)
    print(f"total {res['total_wall_s']:.0f} s")
    return
  res = run(cfg)
  res["total_wall_s"] = time.time() - t0
  res["devices"] = str(jax.devices())
  with open(os.path.join(args.out, f"fedmuscle_{args.dataset}{suffix}_results.json"), "w") as f:
    json.dump(res, f)
  md = table(res)
  with open(os.path.join(args.out, f"fedmuscle_{args.dataset}{suffix}_table.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"total {res['total_wall_s']:.0f} s")


if __name__ == "__main__":
  main()
