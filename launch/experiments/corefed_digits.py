"""CoRe-Fed report on digits: FedAvg, q-FFL, FedMDFG, Re-Fed, Co-Fed, CoRe-Fed over seeds.

Every run is ``launch/configs/corefed_digits.py`` (100 clients, Dir(0.5), 20
per round, power-law availability) with ``algorithm`` and ``seed`` set, built
by ``fedjax_sim.launch.experiment.build_experiment`` and trained by
``simulation.simulate`` (the engine's loop; no files) with this report's
evaluation: ``evaluation.make_evaluate`` + ``summarize`` (global test
accuracy, per-client accuracy on each client's own test split, D_Cosine,
D_Manhattan, ...) plus ``repr_metrics.make_repr_eval(..., metrics=("disparity",))``
(representation disparity of the global model over all 100 clients' training splits).

  python launch/experiments/corefed_digits.py                      # the report (~15 min)
  python launch/experiments/corefed_digits.py --rounds 20 --seeds 0 --out /tmp/x  # smoke
  python launch/experiments/corefed_digits.py --throughput-only    # time/round ratio only
  python launch/experiments/corefed_digits.py --throughput-only --throughput-set local_epochs=5
      # -> corefed_digits_throughput_local_epochs5.json (--tag NAME to choose the suffix)
  python launch/experiments/corefed_digits.py --report-only        # tables/plots from the JSON
  python launch/experiments/corefed_digits.py --methods fedmdfg --merge  # add/redo one method
  python launch/experiments/corefed_digits.py --methods fedmdfg_strict --merge --no-throughput
  python launch/experiments/corefed_digits.py --dataset mnist1d --no-throughput \
      --out /tmp/cf  # the same runs on MNIST-1D -> corefed_mnist1d_* (--alpha 0.1: Dir(0.1))

Writes ``<out>/corefed_digits_results.json`` (all histories), PNG plots and
``corefed_digits_table.md`` (the tables the report quotes). ``--throughput-only``
writes ``<out>/corefed_digits_throughput[_TAG].json`` instead, TAG from ``--tag``
or, by default, from the ``--throughput-set`` overrides and a non-default
``--throughput-methods`` list, so runs of different setups never overwrite
each other.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time

import ml_collections
import numpy as np

from fedjax_sim import evaluation, repr_metrics, sampling, simulation
from fedjax_sim.launch import experiment
from fedjax_sim.launch.configs import corefed_digits
from fedjax_sim.metrics import sample_std

METHODS = ("fedavg", "qffl", "fedmdfg", "refed", "cofed", "corefed")
LABELS = {"fedavg": "FedAvg", "qffl": "q-FFL (q=1)", "fedmdfg": "FedMDFG",
          "fedmdfg_strict": "FedMDFG (strict line search)", "refed": "Re-Fed",
          "cofed": "Co-Fed",
          "corefed": "CoRe-Fed", "reference": "CoRe-Fed (reference code)"}
PLOT_SKIP = ("fedmdfg_strict",)
KEYS = ("test_accuracy", "client_acc_mean", "client_acc_worst10", "client_acc_std", "d_cosine",
        "d_manhattan", "jain_index", "repr_disparity")


def method_config(method: str, seed: int, rounds: int, eval_every: int,
                  dataset: str = "digits", alpha: float | None = None):
  c = corefed_digits.get_config()
  if dataset != "digits":  # e.g. mnist1d: the same clients, model and knobs on other data
    c.data.dataset = dataset
  if alpha is not None:  # Dirichlet concentration of the label partition (config: 0.5)
    c.data.alpha = alpha
  if method == "reference":
    c.algorithm, c.corefed = "corefed", ml_collections.ConfigDict({"reference_code": True})
  elif method == "fedmdfg_strict":  # textbook Armijo and cosine tests in the line search
    c.algorithm, c.fedmdfg = "fedmdfg", ml_collections.ConfigDict({"strict": True})
  else:
    c.algorithm = method
  c.seed, c.rounds, c.eval_every, c.progress = seed, rounds, eval_every, False
  c.rounds_per_call = eval_every
  return c


def run_one(method: str, seed: int, rounds: int, eval_every: int,
            dataset: str = "digits", alpha: float | None = None) -> dict:
  """Trains one method/seed; returns its evaluation history and timings."""
  cfg = method_config(method, seed, rounds, eval_every, dataset, alpha)
  exp = experiment.build_experiment(cfg)
  evaluate = evaluation.make_evaluate(exp.algorithm)
  embed_fn, _ = experiment.build_context(cfg, exp.data).embedding_fn()
  data = exp.data
  repr_eval = repr_metrics.make_repr_eval(embed_fn, data.train, metrics=("disparity",))

  def evaluate_row(r, state, train_metrics):  # after every call
    params = exp.algorithm.eval_params(state.server, None)
    raw = evaluate(state.server, state.clients, data.test, data.test_x, data.test_y)
    row = {"round": r, **evaluation.summarize(raw, int(data.test_y.shape[0]))}
    row["repr_disparity"] = repr_eval(params)["repr_disparity"]
    row.update({k: float(np.mean(v)) for k, v in train_metrics.items()})
    return row

  run = simulation.simulate(exp.algorithm, exp.sampler, data, seed=cfg.seed, rounds=rounds,
                            rounds_per_call=eval_every, eval_every=eval_every,
                            chunk_size=cfg.chunk_size or None, mesh=exp.mesh,
                            evaluate=evaluate_row, eval_initial=False)
  timed_rounds = rounds - eval_every
  return {"method": method, "seed": seed, "history": run.history,
          "ms_per_round": 1e3 * sum(run.call_s[1:]) / max(timed_rounds, 1),
          "first_call_s": run.call_s[0] if run.call_s else None}


ROUNDS_PER_CALL = 10  # rounds fused per jitted call in the timing harness


def build_round(method: str, overrides: dict | None = None,
                rounds_per_call: int = ROUNDS_PER_CALL) -> list:
  """[round_fn, compiled-once state, train data] of one method in the timing setup."""
  cfg = method_config(method, 0, 50, 10)
  if overrides:
    cfg.update_from_flattened_dict(overrides)
  return simulation.compiled_round(experiment.build_experiment(cfg), rounds_per_call)


def throughput(repeats: int = 5, rounds: int = 50,
               methods: tuple = ("fedavg", "corefed"), overrides: dict | None = None) -> dict:
  """Median ms/round of FedAvg and CoRe-Fed (same model, cohort, sampler), interleaved.

  ``methods`` may add the ablations (refed, cofed, reference) for a per-mechanism
  breakdown; every configuration runs ``rounds`` rounds per repeat, in turn.
  ``overrides`` (flattened config keys, e.g. ``{"model": "cnn", "local_epochs":
  5}``) change the setup for every method alike.
  """
  fns = {m: build_round(m, overrides) for m in methods}
  out, cpu = simulation.time_interleaved(fns, repeats, rounds, ROUNDS_PER_CALL)
  res = {m: float(np.median(v)) for m, v in out.items()}
  # CPU time of this process (all threads) per round: less sensitive than wall
  # time to other jobs on a shared machine.
  res["cpu_ms"] = {m: float(np.median(v)) for m, v in cpu.items()}
  res["cpu_ratio"] = res["cpu_ms"]["corefed"] / res["cpu_ms"]["fedavg"]
  res["min_ms"] = {m: float(np.min(v)) for m, v in out.items()}
  res["ratio"] = res["corefed"] / res["fedavg"]
  res["ratio_of_minima"] = float(np.min(out["corefed"]) / np.min(out["fedavg"]))
  res["samples_ms"] = out
  res["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  res["repeats"], res["rounds"] = repeats, rounds
  return res


def participation_skew(rounds: int) -> dict:
  cfg = corefed_digits.get_config()
  s = sampling.build_sampler(cfg, cfg.data.num_clients)
  f = np.sort(sampling.participation_frequencies(s, rounds, seed=0))
  return {"top10_mean": float(f[-10:].mean()), "bottom10_mean": float(f[:10].mean()),
          "ratio_top10_bottom10": float(f[-10:].mean() / f[:10].mean()),
          "p90_over_p10": float(np.percentile(f, 90) / np.percentile(f, 10)),
          "min": float(f[0]), "max": float(f[-1])}


def final_stats(runs: list[dict], last: int) -> dict:
  """Per method: mean and sample std (ddof=1) over seeds of each metric averaged over the last evaluations."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in runs):
    per_seed = [{k: np.mean([h[k] for h in r["history"][-last:]]) for k in KEYS}
                for r in runs if r["method"] == method]
    out[method] = {k: (float(np.mean([p[k] for p in per_seed])),
                       float(sample_std([p[k] for p in per_seed]))) for k in KEYS}
  return out


def plot(runs: list[dict], out_dir: str, dataset: str = "digits") -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  # Variants identical to a plotted method (FedMDFG's strict line search, see
  # the report) would only hide its line and crowd the bar labels.
  runs = [r for r in runs if r["method"] not in PLOT_SKIP]
  panels = [("test_accuracy", "global test accuracy"), ("d_cosine", "D_Cosine (rad)"),
            ("d_manhattan", "D_Manhattan (pp)"), ("repr_disparity", "representation disparity")]
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  for method in dict.fromkeys(r["method"] for r in runs):
    hs = [r["history"] for r in runs if r["method"] == method]
    x = [h["round"] for h in hs[0]]
    for ax, (k, title) in zip(axes, panels):
      y = np.array([[h[k] for h in hist] for hist in hs])
      ax.plot(x, y.mean(0), label=LABELS[method])
      sd = sample_std(y)
      ax.fill_between(x, y.mean(0) - sd, y.mean(0) + sd, alpha=0.15)
      ax.set(title=title, xlabel="round")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{dataset}, 100 clients, Dir(0.5), 20/round, power-law availability "
               f"(mean +- std over {len({r['seed'] for r in runs})} seeds)")
  fig.tight_layout()
  p1 = os.path.join(out_dir, f"corefed_{dataset}_curves.png")
  fig.savefig(p1, dpi=90)
  plt.close(fig)

  stats = final_stats(runs, 5)
  methods = list(stats)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, k, title in zip(axes, ("test_accuracy", "d_cosine", "d_manhattan"),
                          ("global test accuracy", "D_Cosine (rad, lower fairer)",
                           "D_Manhattan (pp, lower fairer)")):
    ax.bar(range(len(methods)), [stats[m][k][0] for m in methods],
           yerr=[stats[m][k][1] for m in methods], capsize=4)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=20, ha="right")
    if k == "test_accuracy":  # all within a few points: zoom in instead of starting at 0
      lo = min(stats[m][k][0] - stats[m][k][1] for m in methods)
      ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.set(title=title)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle("final (mean of the last 5 evaluations), mean +- std over seeds")
  fig.tight_layout()
  p2 = os.path.join(out_dir, f"corefed_{dataset}_final.png")
  fig.savefig(p2, dpi=90)
  plt.close(fig)
  return [p1, p2]


def table(runs, tp, skew, out_dir, rounds, dataset: str = "digits") -> str:
  stats = final_stats(runs, 5)
  lines = [f"Final metrics (mean of the evaluations at the last 5 x {runs[0]['history'][1]['round'] - runs[0]['history'][0]['round']} rounds up to round {rounds}; "
           f"mean +- std over seeds {sorted({r['seed'] for r in runs})}).", "",
           "| method | test acc | client acc mean | worst-10% | acc std | D_Cosine (rad) | "
           "D_Manhattan (pp) | Jain | repr. disparity |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for m, s in stats.items():
    cells = [f"{s[k][0]:.4f} +- {s[k][1]:.4f}" if k not in ("d_manhattan",) else
             f"{s[k][0]:.1f} +- {s[k][1]:.1f}" for k in KEYS]
    lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
  # No time column: the runs' wall times (ms_per_round in the JSON, evaluation
  # included) come from different sessions and machine loads; time is compared
  # only in the interleaved throughput measurement.
  if skew:
    lines += ["", f"Participation skew over {rounds} rounds (sampler frequencies): most available "
              f"10% of clients join {skew['top10_mean']:.3f} of rounds, least available 10% "
              f"{skew['bottom10_mean']:.3f} (ratio {skew['ratio_top10_bottom10']:.1f}x; "
              f"p90/p10 {skew['p90_over_p10']:.1f}x; min {skew['min']:.3f}, max {skew['max']:.3f})."]
  if tp:
    when = (f"measured {tp['measured_at']}" if "measured_at" in tp else
            "measured with an earlier run of this driver, date not recorded")
    lines += ["", f"Throughput stored with these runs ({when}; median of "
              f"{len(tp['samples_ms']['fedavg'])} interleaved repeats of 50 rounds, 10 fused per "
              f"call): FedAvg {tp['fedavg']:.2f} ms/round, CoRe-Fed {tp['corefed']:.2f} ms/round, "
              f"ratio {tp['ratio']:.2f}x. The report quotes the dedicated --throughput-only "
              "runs (corefed_digits_throughput*.json)."]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, f"corefed_{dataset}_table.md"), "w") as f:
    f.write(text)
  return text


def throughput_filename(tag, overrides: dict, methods: list) -> str:
  """corefed_digits_throughput[_TAG].json; TAG defaults to the overrides and methods.

  >>> throughput_filename(None, {"local_epochs": 5}, ["fedavg", "corefed"])
  'corefed_digits_throughput_local_epochs5.json'
  """
  if tag is None:
    parts = [f"{k.split('.')[-1]}{v}" for k, v in sorted(overrides.items())]
    if list(methods) != ["fedavg", "corefed"]:
      parts.append("-".join(methods))
    tag = "_".join(parts)
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in tag)
  return f"corefed_digits_throughput{'_' + safe if safe else ''}.json"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=300)
  ap.add_argument("--eval-every", type=int, default=10)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"),
                  help="data of the report runs (outputs corefed_<dataset>_*); the throughput "
                       "runs always use digits")
  ap.add_argument("--alpha", type=float, default=None,
                  help="Dirichlet alpha of the report runs (default: the config's, 0.5)")
  ap.add_argument("--throughput-only", action="store_true")
  ap.add_argument("--no-throughput", action="store_true")
  ap.add_argument("--repeats", type=int, default=5, help="throughput repeats")
  ap.add_argument("--throughput-methods", default="fedavg,corefed")
  ap.add_argument("--throughput-set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override for every throughput configuration (repeatable), "
                       "e.g. --throughput-set local_epochs=5 --throughput-set model=cnn")
  ap.add_argument("--tag", default=None,
                  help="suffix of the throughput JSON (default: from --throughput-set and a "
                       "non-default --throughput-methods)")
  ap.add_argument("--report-only", action="store_true",
                  help="rewrite the table and plots from <out>'s results JSON, running nothing")
  ap.add_argument("--merge", action="store_true",
                  help="keep the other methods' runs (and throughput) from <out>'s results JSON "
                       "and replace only the runs of --methods x --seeds")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.throughput_only:
    overrides = {}
    for kv in args.throughput_set:
      key, _, val = kv.partition("=")
      try:
        overrides[key] = ast.literal_eval(val)
      except (ValueError, SyntaxError):
        overrides[key] = val
    res = throughput(args.repeats, methods=tuple(args.throughput_methods.split(",")),
                     overrides=overrides)
    res["overrides"] = overrides
    res["methods"] = args.throughput_methods.split(",")
    print(json.dumps(res, indent=1))
    path = os.path.join(args.out, throughput_filename(args.tag, overrides, res["methods"]))
    with open(path, "w") as f:
      json.dump(res, f, indent=1)
    print(f"wrote {path}")
    return
  if args.report_only:
    path = os.path.join(args.out, f"corefed_{args.dataset}_results.json")
    if not os.path.exists(path):
      ap.error(f"--report-only: no results at {path}; run the driver without --report-only "
               f"first (or point --out at the folder that holds them, e.g. docs/results)")
    with open(path) as f:
      old = json.load(f)
    plot(old["runs"], args.out, args.dataset)
    print(table(old["runs"], old.get("throughput"), old.get("participation_skew"), args.out,
                old["runs"][0]["history"][-1]["round"], args.dataset))
    return
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = []
  for seed in seeds:
    for method in args.methods.split(","):
      t = time.time()
      r = run_one(method, seed, args.rounds, args.eval_every, args.dataset, args.alpha)
      last = r["history"][-1]
      print(f"{method:8s} seed {seed}: acc {last['test_accuracy']:.4f} d_cos "
            f"{last['d_cosine']:.4f} d_man {last['d_manhattan']:.1f} repr "
            f"{last['repr_disparity']:.4f} ({r['ms_per_round']:.1f} ms/round, "
            f"{time.time() - t:.0f}s)", flush=True)
      runs.append(r)
  old_tp = None
  if args.merge:
    with open(os.path.join(args.out, f"corefed_{args.dataset}_results.json")) as f:
      old = json.load(f)
    redo = {(m, s) for m in args.methods.split(",") for s in seeds}
    kept = [r for r in old["runs"] if (r["method"], r["seed"]) not in redo]
    runs = sorted(kept + runs, key=lambda r: (r["seed"], list(LABELS).index(r["method"])))
    old_tp = old.get("throughput")
  tp = old_tp if args.no_throughput else throughput(args.repeats)
  skew = participation_skew(args.rounds)
  with open(os.path.join(args.out, f"corefed_{args.dataset}_results.json"), "w") as f:
    json.dump({"runs": runs, "throughput": tp, "participation_skew": skew}, f)
  plot(runs, args.out, args.dataset)
  print(table(runs, tp, skew, args.out, args.rounds, args.dataset))


if __name__ == "__main__":
  main()
