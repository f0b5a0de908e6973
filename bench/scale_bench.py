"""Client scale: LEAF Synthetic(1, 1) with C = 20,000 clients and up to K = 10,000 per round.

    python bench/scale_bench.py              # full run, writes bench/SCALE.md
    python bench/scale_bench.py --quick      # C = 2,000, K up to 1,000; prints only

What it measures (FedAvg, MLP 60-200-200-10, B = 10, E = 1, client lr 0.1, one device):

1. **Storage.** The training set packed flat (:class:`fedjax_sim.client_data.FlatClientData`,
   one [T, 60] array plus offsets) against the padded [C, N_max, 60] layout it replaces:
   bytes stored, bytes per example stored, and the padded layout's size (computed from the
   shapes, not allocated).
2. **Round time against K** for K in {1,000, 2,500, 5,000, 10,000} under the streaming
   schedule (W slots, running weighted mean: no [K, ...] upload buffer): median seconds per
   round over a few rounds after the compile, seconds per 1,000 clients, and the deviation
   from a line through the origin fitted to the points (linear in K within 25% is the issue's
   target).
3. **Peak RSS** of the process (``VmHWM``, reset before each K) while that K ran.

Every number comes from one run; the load average before and after is recorded (shared
machine: absolute seconds are noisy, the ratios between K less so).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_notes import write_keeping_notes  # noqa: E402
from throughput import _peak_rss_mib, _reset_peak_rss, _rss_mib  # noqa: E402

from fedjax_sim import models, sampling  # noqa: E402
from fedjax_sim.algorithms import fedavg  # noqa: E402
from fedjax_sim.client_data import stored_bytes  # noqa: E402
from fedjax_sim.round import init_state, make_mesh, make_round, replicate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--clients", type=int, default=20_000)
  ap.add_argument("--cohorts", default="1000,2500,5000,10000")
  ap.add_argument("--slots", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=3, help="timed rounds per K (after the compile)")
  ap.add_argument("--out", default=os.path.join(HERE, "SCALE.md"))
  args = ap.parse_args(argv)
  if args.quick:
    args.clients, args.cohorts, args.rounds = 2000, "250,500,1000", 2
  log = lambda s: print(s, file=sys.stderr, flush=True)
  t0, load0, rss0 = time.perf_counter(), os.getloadavg()[0], _rss_mib()

  from fedjax_sim.data import build_federated_data
  _reset_peak_rss()
  fd = build_federated_data({"dataset": "synthetic", "num_clients": args.clients,
                             "storage": "flat"}, batch_size=10, seed=0)
  train = fd.train
  num_classes, input_shape = fd.num_classes, fd.input_shape
  data_s, data_peak = time.perf_counter() - t0, _peak_rss_mib()
  test_b = stored_bytes(fd.test)  # flat too: the clients' test rows, not C x N_test_max
  # The benchmark times training only: drop the test splits so that the RSS columns show the
  # round's own footprint.
  del fd
  gc.collect()
  rss_train = _rss_mib()
  n = np.asarray(train.num_examples)
  total = int(n.sum())
  flat_b = stored_bytes(train)
  n_max = train.max_examples
  row_b = int(np.prod(input_shape)) * 4 + 4  # x float32 + y int32
  padded_b = args.clients * n_max * (row_b + 1) + args.clients * 4  # + mask bool, sizes
  log(f"data: C={args.clients} T={total} N_max={n_max} flat {flat_b / 2**20:.1f} MiB, padded "
      f"would be {padded_b / 2**20:.1f} MiB ({data_s:.1f}s, peak RSS {data_peak:.0f} MiB)")

  model = models.build_model("mlp", num_classes, hidden=(200, 200))
  apply_fn = lambda params, x: model.apply({"params": params}, x)
  init_params = lambda rng: models.init_params(model, rng, input_shape)
  alg = fedavg(apply_fn, init_params, client_lr=0.1, batch_size=10, epochs=1)
  mesh = make_mesh(1)
  data = replicate(train, mesh)
  rows = []
  for k in [int(v) for v in args.cohorts.split(",")]:
    sampler = sampling.uniform(args.clients, k)
    fn = make_round(alg, sampler, seed=0, mesh=mesh, schedule="stream", slots=args.slots)
    state = init_state(alg, sampler, args.clients, seed=0, mesh=mesh)
    _reset_peak_rss()
    t = time.perf_counter()
    state, m = fn(state, data)
    jax.block_until_ready(state)
    first = time.perf_counter() - t
    times, effs = [], []
    for _ in range(args.rounds):
      t = time.perf_counter()
      state, m = fn(state, data)
      m = jax.device_get(m)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
      effs.append(float(m["padding_efficiency"][0]))
    sec = statistics.median(times)
    rows.append(dict(k=k, sec=sec, first=first, rss=_peak_rss_mib(), eff=float(np.mean(effs)),
                     loss=float(m["loss"][0])))
    log(f"K={k}: {sec:.2f} s/round (first {first:.1f}s), peak RSS {rows[-1]['rss']:.0f} MiB, "
        f"padding efficiency {rows[-1]['eff']:.3f}")
  ks, secs = np.array([r["k"] for r in rows], float), np.array([r["sec"] for r in rows])
  slope = float(np.sum(ks * secs) / np.sum(ks * ks))  # least squares through the origin
  for r in rows:
    r["dev"] = r["sec"] / (slope * r["k"]) - 1.0
  wall = time.perf_counter() - t0
  cmd = "python bench/scale_bench.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
  lines = [
      "# Client scale: 20,000 clients, up to 10,000 per round (issue 16)", "",
      f"Command: `{cmd}` (repository root); wall time {wall:.0f} s.",
      f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
      f"JAX {jax.__version__} ({jax.default_backend()}, 1 device), {os.cpu_count()} CPUs "
      f"visible. 1-min load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} "
      "(shared machine).", "",
      f"Workload: FedAvg, LEAF Synthetic(1, 1), C = {args.clients:,} clients (lognormal sizes, "
      f"{int(n.min())}..{int(n.max())} training examples, T = {total:,} in all), MLP "
      f"60-200-200-10, B = 10, E = 1, lr 0.1, schedule='stream', W = {args.slots}, running "
      "weighted mean (no [K, ...] upload buffer).", "",
      "## Storage", "",
      "| layout | bytes | MiB | bytes per example stored |", "|---|---|---|---|",
      f"| flat (`--config.data.storage=flat`) | {flat_b:,} | {flat_b / 2**20:.1f} | "
      f"{flat_b / total:.1f} |",
      f"| padded [C, N_max = {n_max}, 60] (from the shapes) | {padded_b:,} | "
      f"{padded_b / 2**20:.1f} | {padded_b / total:.1f} |", "",
      f"Process RSS before loading: {rss0:.0f} MiB; peak while building the flat data: "
      f"{data_peak:.0f} MiB (this includes the per-client test splits, flat as well: "
      f"{test_b / 2**20:.1f} MiB); after dropping the test splits: {rss_train:.0f} MiB. The flat "
      "array holds T + N_max rows (a tail of N_max zero rows lets every client's window be a "
      "fixed-size slice).", "",
      "## Round time against K", "",
      "| K | s / round (median) | s per 1,000 clients | vs line through origin | first call s "
      "| peak RSS MiB | padding efficiency |", "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['k']:,} | {r['sec']:.3f} | {1000 * r['sec'] / r['k']:.3f} | "
                 f"{100 * r['dev']:+.1f}% | {r['first']:.1f} | {r['rss']:.0f} | {r['eff']:.3f} |")
  worst = max(abs(r["dev"]) for r in rows)
  lines += ["", f"Largest deviation from linear: {100 * worst:.1f}% (target: within 25%: "
            f"**{'met' if worst <= 0.25 else 'NOT met'}**). Peak RSS at the largest K: "
            f"{rows[-1]['rss']:.0f} MiB (target 8 GiB = 8192 MiB: "
            f"**{'met' if rows[-1]['rss'] <= 8192 else 'NOT met'}**).", ""]
  text = "\n".join(lines)
  print(text)
  if not args.quick:
    write_keeping_notes(args.out, text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
