"""Vectorized sweep vs one run per point: a 16-point client_lr x seed grid on digits.

  .venv/bin/python bench/sweep_bench.py --rounds=200 --out=bench/sweep_bench.json

FedAvg on the embedded scikit-learn digits data with the default config
(launch/configs/fedavg_digits.py: 100 clients, Dir(0.5), 20 per round, B = 10,
E = 1, MLP 64-200-200-10) except ``--rounds`` (default 20 instead of 200).
Grid: client_lr in {0.02, 0.05, 0.1, 0.2} x seeds {0, 1, 2, 3}. Both modes go
through ``fedjax_sim.launch.sweep.run_sweep`` (in this process, local back end):
``vectorize=True`` runs the 16 points as ONE program vmapped over the points,
``vectorize=False`` calls ``train_and_evaluate`` once per point. The vectorized mode runs once
per ``--schedules`` entry (``chunked``: size-sorted chunks; ``stream``: continuous client
batching, the streamed round vmapped over the points); one run per point uses the config's
schedule (chunked), i.e. today's default engine. Wall time and
CPU time (user + sys of this process) include compilation, evaluation,
checkpoints and plots, i.e. what a user waits for. The per-point final
metrics of the two modes are checked to be allclose.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from fedjax_sim.launch import configs, sweep as sw  # noqa: E402


def cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--lrs", default="0.02,0.05,0.1,0.2")
  ap.add_argument("--seeds", default="0,1,2,3")
  ap.add_argument("--out", default=None)
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--schedules", default="chunked,stream",
                  help="schedules of the vectorized mode (comma-separated)")
  args = ap.parse_args()

  cfg = sw.load_config(configs.path("fedavg_digits"))
  cfg.rounds = args.rounds
  cfg.eval_every = min(cfg.eval_every, args.rounds)
  cfg.checkpoint_every = args.rounds
  cfg.progress = False
  points = sw.make_points(cfg, {"client_lr": args.lrs.split(",")}, seeds=args.seeds.split(","))
  root = args.workdir or tempfile.mkdtemp(prefix="sweep_bench_")
  res = {"points": len(points), "rounds": cfg.rounds, "num_clients": cfg.data.num_clients,
         "clients_per_round": cfg.clients_per_round, "load_avg_1m_before": os.getloadavg()[0]}
  rows = {}
  modes = [(f"vectorized_{s}" if s != "chunked" else "vectorized", True, s)
           for s in args.schedules.split(",")] + [("per_point", False, cfg.schedule)]
  for mode, vec, schedule in modes:
    d = os.path.join(root, mode)
    shutil.rmtree(d, ignore_errors=True)
    mcfg = sw.apply_overrides(cfg, {"schedule": schedule})
    t, c = time.perf_counter(), cpu_s()
    rows[mode] = sw.run_sweep(mcfg, points, d, vectorize=vec,
                              log=lambda m: print(m, flush=True))
    res[f"{mode}_wall_s"] = time.perf_counter() - t
    res[f"{mode}_cpu_s"] = cpu_s() - c
    res[f"{mode}_point_rounds_per_s"] = len(points) * cfg.rounds / res[f"{mode}_wall_s"]
    print(f"{mode}: wall {res[f'{mode}_wall_s']:.1f} s, cpu {res[f'{mode}_cpu_s']:.1f} s",
          flush=True)
  for mode, _, _ in modes[:-1]:
    sfx = mode[len("vectorized"):]
    res[f"wall_ratio{sfx}"] = res["per_point_wall_s"] / res[f"{mode}_wall_s"]
    res[f"cpu_ratio{sfx}"] = res["per_point_cpu_s"] / res[f"{mode}_cpu_s"]
    diffs = [abs(a["test_accuracy"] - b["test_accuracy"])
             for a, b in zip(rows[mode], rows["per_point"])]
    res[f"max_abs_test_accuracy_diff{sfx}"] = float(np.max(diffs))
  res["load_avg_1m_after"] = os.getloadavg()[0]
  res["test_accuracy_by_point"] = {r["point"]: r["test_accuracy"] for r in rows["per_point"]}
  print(json.dumps(res, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
