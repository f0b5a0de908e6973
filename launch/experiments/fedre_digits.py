"""FedRE report on digits: FedRE vs FedProto vs FedGH vs local vs FedAllRep,
PRA and PAT, several seeds; communication per round; representation inversion.

Every run is ``launch/configs/fedre_digits.py`` (10 clients, all join, 5
architectures round-robin, RM avg pooling to D = 32) with ``algorithm``,
``data.partition`` and ``seed`` set. The algorithm is built by the
algorithm registry (``launch.experiment.build_algorithm``), trained with ``round.make_round`` and
evaluated with ``evaluation.make_evaluate`` + ``summarize`` (pooled
algorithms: accuracy over the clients' own test splits, example-weighted).

One compiled round per METHOD serves every partition and seed: the client
arrays of all runs are padded to one common N (padding rows are masked and
inert) and the seed is the round function's traced argument
(``make_round(seed=None)``). A run's seed changes the partition, the client train/test split, the
model initialization and the per-round keys (shuffles, RAP weight draws),
each from its own stream of the seed (:mod:`fedjax_sim.seeding`). Spreads
are sample standard deviations over seeds (ddof = 1).

  python launch/experiments/fedre_digits.py --out docs/results               # the report
  python launch/experiments/fedre_digits.py --rounds 4 --seeds 0 --methods fedre --out /tmp/x

Writes ``<out>/fedre_digits_results.json``, ``fedre_digits_*.png`` and
``fedre_digits_tables.md``. ``--dataset mnist1d`` runs the config's ``mnist1d``
variant (100 clients, 20 per round, partition ``dir05`` = Dir(0.5), 1-D
architectures) and writes ``fedre_mnist1d_*`` (``docs/results/fedre_mnist1d.md``).

A method may carry knob overrides, ``name@knob=value[@knob=value...]`` (values
parsed as the knob's default's type), so one call runs an ablation grid::

  python launch/experiments/fedre_digits.py --dataset mnist1d --name fedre_mnist1d_ablation \
      --methods fedre,fedre@variant=RSR,fedre@weights=gaussian,fedre@resample=false ...

``--config c100k10`` adds the config's variant options (comma list) and the
suffix to the output names; ``--name`` replaces the output prefix;
``--merge`` keeps the runs of the other methods already in the results JSON
(same seeds, partitions and rounds; refused otherwise) and rewrites the tables
and plots over all of them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from fedjax_sim.client_data import pad_examples
from fedjax_sim import comm, evaluation
from fedjax_sim.algorithms import inversion
from fedjax_sim.metrics import sample_std
from fedjax_sim.algorithms.registry import DataSpec
from fedjax_sim.launch import experiment
from fedjax_sim.data import build_federated_data
from fedjax_sim.launch.configs import fedre_digits
from fedjax_sim.round import make_mesh, make_round, replicate
from fedjax_sim.simulation import simulate

METHODS = ("fedre", "fedproto", "fedgh", "local_pools", "fedallrep")
LABELS = {"fedre": "FedRE (RAP)", "fedproto": "FedProto", "fedgh": "FedGH",
          "local_pools": "Local", "fedallrep": "FedAllRep", "lg_fedavg": "LG-FedAvg",
          "fedtgp": "FedTGP", "fedmrl": "FedMRL", "fedkd": "FedKD", "fedgen": "FedGen"}


def parse_method(spec: str):
  """``'fedre@variant=RSR@resample=false'`` -> ``('fedre', {'variant': 'RSR', 'resample': 'false'})``."""
  name, *pairs = spec.split("@")
  knobs = {}
  for p in pairs:
    if "=" not in p:
      raise ValueError(f"method '{spec}': '{p}' is not knob=value; write e.g. fedre@variant=RSR.")
    k, v = p.split("=", 1)
    knobs[k] = v
  return name, knobs


def label(spec: str) -> str:
  """Table label of a method spec: ``FedRE (RAP) [variant=RSR]``."""
  name, knobs = parse_method(spec)
  base = LABELS.get(name, name)
  if name == "fedre" and "variant" in knobs:  # FedRE (RAP) -> FedRE (RSR)
    base = f"FedRE ({knobs.pop('variant')})"
  return base + (" [" + ", ".join(f"{k}={v}" for k, v in knobs.items()) + "]" if knobs else "")


def _typed(default, value: str, where: str):
  """``value`` (a string) as the type of the knob's ``default``."""
  if isinstance(default, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{where}: '{value}' is not a boolean; write true or false.")
    return value.lower() in ("true", "1")
  return type(default)(value) if default is not None else value


def load_all(partitions, seeds, arg_extra=""):
  """Builds every (partition, seed) dataset, padded to common train/test N."""
  out = {}
  for part in partitions:
    for seed in seeds:
      cfg = fedre_digits.get_config(",".join(a for a in (part, arg_extra) if a))
      out[(part, seed)] = build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=seed)
  b = fedre_digits.get_config(arg_extra).batch_size
  n_tr = max(d.train.y.shape[1] for d in out.values())
  n_tr = -(-n_tr // b) * b
  n_te = max(d.test.y.shape[1] for d in out.values())
  for d in out.values():
    d.train, d.test = pad_examples(d.train, n_tr), pad_examples(d.test, n_te)
  return out


def run_method(method, datasets, rounds, eval_every, mesh, keep_states=(), archs=None,
               arg_extra=""):
  """Trains ``method`` on every dataset with ONE compiled round; returns histories."""
  cfg = fedre_digits.get_config(arg_extra)
  cfg.algorithm, knobs = parse_method(method)
  experiment.complete_config(cfg)  # cfg.<algorithm>: every knob, at its default
  for k, v in knobs.items():
    if k not in cfg[cfg.algorithm]:
      raise ValueError(f"method '{method}': {cfg.algorithm} has no knob '{k}'; its knobs are "
                       f"{sorted(cfg[cfg.algorithm])}.")
    cfg[cfg.algorithm][k] = _typed(cfg[cfg.algorithm][k], v, f"method '{method}'")
  cfg.rounds = rounds  # schedules over the run's rounds (FedKD's energy threshold T(t))
  if archs:
    cfg.archs = tuple(archs)
  any_data = next(iter(datasets.values()))
  spec = DataSpec(any_data.input_shape, any_data.num_classes, any_data.num_clients)
  alg, _ = experiment.build_algorithm(cfg, spec)
  rpc = math.gcd(eval_every, rounds)  # calls end on the last round
  round_fn = make_round(alg, seed=None, mesh=mesh, chunk_size=cfg.chunk_size or None,
                        rounds_per_call=rpc)
  evaluate = evaluation.make_evaluate(alg)
  shapes = comm.round_comm(alg, any_data.train)
  runs, states = [], {}
  for (part, seed), data in datasets.items():
    t0 = time.perf_counter()

    def evaluate_row(r, state, train_metrics):
      raw = evaluate(state.server, state.clients, data.test, data.test_x, data.test_y)
      row = {"round": r, **evaluation.summarize(raw, int(data.test_y.shape[0]))}
      row.update({k: float(np.mean(v)) for k, v in train_metrics.items()})
      return row

    state, hist, _ = simulate(alg, None, data, seed=seed, rounds=rounds, rounds_per_call=rpc,
                              eval_every=eval_every, mesh=mesh, round_fn=round_fn,
                              train=replicate(data.train, mesh), evaluate=evaluate_row,
                              eval_initial=False, diverged_hint=f" ({method} {part} seed {seed}).")
    wall = time.perf_counter() - t0
    print(f"{method:12s} {part} seed {seed}: acc {hist[-1]['test_accuracy']:.4f} "
          f"(best {max(r['test_accuracy'] for r in hist):.4f}) {wall:.1f}s", flush=True)
    runs.append({"method": method, "partition": part, "seed": seed, "history": hist,
                 "wall_s": wall})
    if (part, seed) in keep_states:
      states[(part, seed)] = (alg, state)
  shapes = {k: v for k, v in shapes.items() if k != "pools"}
  return runs, shapes, states


def _fedre_dim() -> int:
  """D of the report's split models (``--config.fedre.dim``, the constructor's default)."""
  cfg = fedre_digits.get_config()
  experiment.complete_config(cfg)
  return int(cfg.fedre.dim)


def inversion_eval(states_by_method, datasets, key, decoder_steps):
  """Attacks every client of run ``key`` = (partition, seed); returns mean scores per form.

  ``fedre_extractor``: all forms decoded with the FedRE-trained extractors (only
  the uploaded form differs). ``own_extractor``: each method's own trained
  extractors for the form it uploads (FedAllRep: representations, FedGH:
  prototypes, FedProto: prototypes, FedRE: entangled).
  """
  data = datasets[key]
  x_pub = np.asarray(data.test_x)  # public set: the global test split (unused by pooled runs)
  tr = jax.device_get(data.train)
  out = {}

  def attack(method, forms):
    alg, state = states_by_method[method][key]
    scores = {}
    for p, pool in enumerate(alg.pools):
      from fedjax_sim.algorithms import rm as rm_lib
      model = rm_lib.split_model(pool.name, data.input_shape, data.num_classes,
                                 _fedre_dim())
      for j, cid in enumerate(np.asarray(pool.client_ids)):
        params = jax.tree.map(lambda a: a[j], state.clients[p])
        m = tr.mask[cid]
        res = inversion.attack_client(
            model.features, params, tr.x[cid][m], tr.y[cid][m], x_pub,
            jax.random.fold_in(jax.random.PRNGKey(7), int(cid)), num_classes=data.num_classes,
            forms=forms, decoder_steps=decoder_steps)
        for f, s in res.items():
          scores.setdefault(f, []).append(s)
    return {f: {k: float(np.mean([s[k] for s in v])) for k in v[0]} for f, v in scores.items()}

  if "fedre" in states_by_method:
    out["fedre_extractor"] = attack("fedre", ("representations", "prototypes", "entangled",
                                              "prior"))
  own = {}
  for method, form in (("fedallrep", "representations"), ("fedgh", "prototypes"),
                       ("fedproto", "prototypes"), ("fedre", "entangled")):
    if method in states_by_method:
      own[method] = attack(method, (form,))[form]
  out["own_extractor"] = own
  return out


def summarize_runs(runs):
  table = {}
  for r in runs:
    h = r["history"]
    t = table.setdefault((r["method"], r["partition"]), {"final": [], "best": [], "upload": [],
                                                         "broadcast": []})
    t["final"].append(h[-1]["test_accuracy"])
    t["best"].append(max(x["test_accuracy"] for x in h))
    t["upload"].append(np.mean([x.get("server/comm/upload_scalars", 0.0) for x in h]))
    t["broadcast"].append(np.mean([x.get("server/comm/broadcast_scalars", 0.0) for x in h]))
  return table


def write_tables(table, shapes, inv, path, methods, partitions):
  lines = ["| method | " + " | ".join(f"{p.upper()} final | {p.upper()} best" for p in partitions)
           + " |", "|---" * (1 + 2 * len(partitions)) + "|"]
  for m in methods:
    cells = []
    for p in partitions:
      t = table[(m, p)]
      cells += [f"{100 * np.mean(t['final']):.2f} ± {100 * sample_std(t['final']):.2f}",
                f"{100 * np.mean(t['best']):.2f} ± {100 * sample_std(t['best']):.2f}"]
    lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
  p0, p1 = partitions[0].upper(), partitions[-1].upper()
  lines += ["", f"| method | upload / round ({p0}, actual) | upload / round ({p1}, actual) | "
            f"upload / round (dense shapes) | broadcast / round (actual, {p0}) | "
            f"upload vs FedProto ({p0}) |", "|---|---|---|---|---|---|"]
  ref = np.mean(table[("fedproto", partitions[0])]["upload"]) if ("fedproto", partitions[0]) \
      in table else None
  for m in methods:
    up = [np.mean(table[(m, p)]["upload"]) for p in partitions]
    rel = f"{100 * up[0] / ref:.1f}%" if ref else "-"
    lines.append(f"| {label(m)} | {up[0]:.0f} | {up[-1]:.0f} | "
                 f"{shapes[m]['upload_scalars']} | "
                 f"{np.mean(table[(m, partitions[0])]['broadcast']):.0f} | {rel} |")
  for key, res in inv.items():
    lines += ["", f"Inversion ({key}):", "",
              "| uploaded form | PSNR (dB) | MSE | best-match PSNR | best-match MSE |",
              "|---|---|---|---|---|"]
    for form, s in res.get("fedre_extractor", {}).items():
      lines.append(f"| {form} (FedRE extractors) | {s['psnr']:.2f} | {s['mse']:.4f} | "
                   f"{s['best_psnr']:.2f} | {s['best_mse']:.4f} |")
    for m, s in res.get("own_extractor", {}).items():
      lines.append(f"| {m}'s upload ({m} extractors) | {s['psnr']:.2f} | {s['mse']:.4f} | "
                   f"{s['best_psnr']:.2f} | {s['best_mse']:.4f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def plot(runs, table, shapes, inv, out, methods, partitions, dataset="digits", clients=10,
         name=None):
  name = name or f"fedre_{dataset}"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4), squeeze=False)
  for ax, p in zip(axes[0], partitions):
    for m in methods:
      hs = [r["history"] for r in runs if r["method"] == m and r["partition"] == p]
      rounds = [x["round"] for x in hs[0]]
      acc = np.array([[x["test_accuracy"] for x in h] for h in hs])
      ax.plot(rounds, acc.mean(0), label=label(m))
      ax.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.15)
    ax.set(xlabel="round", ylabel="test accuracy (clients' own splits)",
           title=f"{dataset}, {p.upper()}, {clients} clients, {len(hs)} seeds (band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}_accuracy.png"), dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4))
  ms = [m for m in methods if m != "local_pools"]
  up = [np.mean(table[(m, partitions[0])]["upload"]) for m in ms]
  dense = [shapes[m]["upload_scalars"] for m in ms]
  xs = np.arange(len(ms))
  ax.bar(xs - 0.2, up, 0.4, label="actual (PRA, mean over rounds and seeds)")
  ax.bar(xs + 0.2, dense, 0.4, label="dense array shapes (comm.round_comm)")
  ax.set_yscale("log")
  ax.set_xticks(xs, [label(m) for m in ms], rotation=30 if len(ms) > 8 else 0, ha="right"
                if len(ms) > 8 else "center", fontsize=8 if len(ms) > 8 else 10)
  ax.set(ylabel=f"scalars uploaded per round ({clients} clients)" if dataset == "digits" else
         "scalars uploaded per round (one cohort)", title="upload per round (Local: 0)")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(os.path.join(out, f"{name}_comm.png"), dpi=100)
  plt.close(fig)

  if inv:
    fig, axes = plt.subplots(1, len(inv), figsize=(6 * len(inv), 4), squeeze=False)
    for ax, (key, res) in zip(axes[0], inv.items()):
      forms = list(res["fedre_extractor"])
      ax.bar(np.arange(len(forms)) - 0.2, [res["fedre_extractor"][f]["psnr"] for f in forms], 0.4,
             label="PSNR (weighted over contributing samples)")
      ax.bar(np.arange(len(forms)) + 0.2,
             [res["fedre_extractor"][f]["best_psnr"] for f in forms], 0.4,
             label="best-match PSNR")
      ax.set_xticks(np.arange(len(forms)), forms)
      ax.set(ylabel="PSNR (dB), lower = more private", title=f"inversion, {key}")
      ax.legend()
      ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}_inversion.png"), dpi=100)
    plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--rounds", type=int, default=50)
  ap.add_argument("--eval-every", type=int, default=10)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"))
  ap.add_argument("--partitions", default="", help="default: pra,pat (digits), dir05 (mnist1d)")
  ap.add_argument("--methods", default=",".join(METHODS),
                  help="comma list of registry names, each optionally with knob overrides "
                       "name@knob=value[@knob=value]")
  ap.add_argument("--config", default="", help="extra get_config options, e.g. c100k10 (also "
                  "appended to the output names)")
  ap.add_argument("--name", default="", help="output prefix (default fedre_<dataset>[_<config>])")
  ap.add_argument("--merge", action="store_true", help="keep the other methods' runs already in "
                  "<out>/<name>_results.json and write the tables over all of them")
  ap.add_argument("--decoder-steps", type=int, default=1500)
  ap.add_argument("--archs", default="", help="comma-separated MODEL_ZOO names (default: the "
                  "config's 5)")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  args.partitions = args.partitions or ("pra,pat" if args.dataset == "digits" else "dir05")
  partitions = args.partitions.split(",")
  extra = ",".join(a for a in ("" if args.dataset == "digits" else args.dataset, args.config)
                   if a)  # the config's variant options
  name = args.name or "_".join(a for a in ("fedre", args.dataset, args.config.replace(",", "_"))
                               if a)
  methods = args.methods.split(",")
  for m in methods:
    parse_method(m)  # a malformed spec fails before any data is built
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, f"{name}_results.json")
  old = {"runs": [], "comm_shapes": {}, "methods": []}
  if args.merge and os.path.exists(results_path):
    with open(results_path) as f:
      old = json.load(f)
    for k in ("rounds", "eval_every", "seeds", "partitions", "dataset", "config", "archs"):
      if str(old["args"].get(k, "")) != str(vars(args)[k]):
        raise ValueError(f"--merge: {results_path} was made with --{k.replace('_', '-')}="
                         f"{old['args'].get(k)!r}, this call has {vars(args)[k]!r}; use the same "
                         "value or another --name.")
    old["methods"] = old.get("methods") or old["args"]["methods"].split(",")
    old["runs"] = [r for r in old["runs"] if r["method"] not in methods]
  mesh = make_mesh()
  datasets = load_all(partitions, seeds, extra)
  inv_keys = [(p, seeds[0]) for p in partitions]
  all_runs, shapes, states = [], {}, {}
  t0 = time.perf_counter()
  for m in methods:
    tm = time.perf_counter()
    runs, shapes[m], st = run_method(m, datasets, args.rounds, args.eval_every, mesh,
                                     keep_states=inv_keys,
                                     archs=args.archs.split(",") if args.archs else None,
                                     arg_extra=extra)
    for r in runs:
      r["total_s"] = time.perf_counter() - tm  # the method's time, compilation included
    states[m] = st
    all_runs += runs
    print(f"{m}: {time.perf_counter() - tm:.0f}s", flush=True)
  inv = {}
  if args.decoder_steps > 0 and args.dataset == "digits":  # the decoder outputs pixels in [0, 1]
    for key in inv_keys:
      inv[f"{key[0].upper()} seed {key[1]}"] = inversion_eval(states, datasets, key,
                                                             args.decoder_steps)
  total = time.perf_counter() - t0
  all_methods = [m for m in old["methods"] if m not in methods] + methods
  all_runs = old["runs"] + all_runs
  shapes = {**{k: v for k, v in old["comm_shapes"].items() if k not in methods}, **shapes}
  table = summarize_runs(all_runs)
  md = write_tables(table, shapes, inv, os.path.join(args.out, f"{name}_tables.md"),
                    all_methods, partitions)
  print(md)
  plot(all_runs, table, shapes, inv, args.out, all_methods, partitions, args.dataset,
       next(iter(datasets.values())).num_clients, name=name)
  with open(results_path, "w") as f:
    json.dump({"args": vars(args), "methods": all_methods, "total_s": total,
               "total_s_before_merge": old.get("total_s"), "runs": all_runs,
               "comm_shapes": shapes, "inversion": inv or old.get("inversion", {})}, f)
  print(f"total {total:.0f}s")


if __name__ == "__main__":
  main()
