"""Round throughput on the next-character task: the vectorized round against the per-client loop.

    python bench/text_bench.py                    # writes bench/TEXT.md
    python bench/text_bench.py --quick --out /tmp/text.md   # smoke run (< 1 min)
    python bench/text_bench.py --hidden 32 --append         # a smaller GRU, appended

The data are a LEAF Shakespeare folder that this script writes to a temporary directory (no
download): C speaking roles with log-normal sizes (median ``--median-size`` examples, capped at
``--max-client-size`` by the loader's ``data.max_client_size``), each example an 80-character
window of a fixed text and its next character, read through ``leaf:<dir>``
(``fedjax_sim/data/natural.py``) into the next-character task (T = ``--seq-len``, V = 90).

Model and training: FedAvg with ``char_gru`` (embedding 8, GRU layers ``--hidden``), B = 10,
E = 1, client lr 1.0, per-token loss (``fedjax_sim/text.py``).

What is compared, per cohort size K (every runner trains the same rounds, the same cohorts,
in interleaved sweeps; median sweep time):

* **chunked**: ``make_round`` (cohort sampling, a ``vmap``-ed client update in chunks of
  ``chunk_size`` size-sorted clients, the server update, one jitted program per round); a
  chunk costs its largest client's steps, so unequal clients leave padding;
* **stream**: ``make_round(schedule="stream", slots=W)`` (``fedjax_sim/stream.py``): the
  size-sorted cohort streams through W vmapped slots, a slot taking the next client when its
  client finishes, so little padding;
* **reference**: ``fedjax_sim.reference.make_reference_round``, the same math as a Python
  loop calling ONE jitted single-client update per cohort member (asynchronous dispatch).

Reports rounds/s of each, the ratios to the reference, compile times, padding efficiencies,
and the load average of the machine before and after (it is shared: the ratios compare
numbers measured in the same process, interleaved).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_sim.launch.configs.base import get_base_config  # noqa: E402
from fedjax_sim.launch.experiment import build_experiment  # noqa: E402
from fedjax_sim.reference import make_reference_round  # noqa: E402
from fedjax_sim.round import init_state, make_round  # noqa: E402
from fedjax_sim.simulation import time_interleaved  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNERS = ("chunked", "stream", "reference")
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all "
        "the clouds that lour'd upon our house in the deep bosom of the ocean buried. Now are our "
        "brows bound with victorious wreaths; our bruised arms hung up for monuments; ")


def write_leaf(root: str, num_clients: int, median: int, seed: int = 0) -> list[int]:
  """LEAF Shakespeare JSON (train and test) under ``root``; returns the train sizes."""
  rng = np.random.default_rng(seed)
  sizes = np.maximum(rng.lognormal(np.log(median), 1.0, num_clients), 2).astype(int)
  span = len(TEXT) - 81
  for split, frac in (("train", 1.0), ("test", 0.25)):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    users, data = [], {}
    for k, n in enumerate(sizes):
      n = max(1, int(n * frac))
      starts = rng.integers(0, span, n)
      u = f"PLAY_{k:04d}_ROLE"
      users.append(u)
      data[u] = {"x": [TEXT[s:s + 80] for s in starts], "y": [TEXT[s + 80] for s in starts]}
    with open(os.path.join(root, split, f"all_data_niid_0_keep_0_{split}_9.json"), "w") as f:
      json.dump({"users": users, "num_samples": [len(data[u]["y"]) for u in users],
                 "user_data": data}, f)
  return sizes.tolist()


def config(root: str, args, cohort: int):
  c = get_base_config()
  c.data.dataset = f"leaf:{root}"
  c.data.sequence_length = args.seq_len
  c.data.max_client_size = args.max_client_size
  c.model, c.model_kwargs.hidden = "char_gru", tuple(args.hidden)
  c.clients_per_round, c.batch_size, c.local_epochs, c.client_lr = cohort, 10, 1, 1.0
  c.chunk_size, c.progress = args.chunk_size, False
  return c


def bench(root: str, args, cohort: int) -> dict:
  exp = build_experiment(config(root, args, cohort))
  data = exp.data.train
  out = {"K": cohort, "C": exp.data.num_clients, "N": int(data.y.shape[1])}
  runners = {}
  for name in RUNNERS:
    t = time.perf_counter()
    if name == "chunked":
      fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh,
                      chunk_size=args.chunk_size or None, donate=False)
    elif name == "stream":
      fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, schedule="stream",
                      slots=min(args.slots, cohort), donate=False)
    else:
      fn = make_reference_round(exp.algorithm, exp.sampler, seed=0, sort_by_size=True)
    state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, 0, exp.mesh)
    state, metrics = fn(state, data)
    jax.block_until_ready(state)
    first = time.perf_counter() - t
    t = time.perf_counter()
    state, metrics = fn(state, data)
    jax.block_until_ready(state)
    out[f"{name}_compile_s"] = first - (time.perf_counter() - t)
    if name != "reference":
      out[f"{name}_padding"] = float(np.mean(np.asarray(metrics["padding_efficiency"])))
    runners[name] = [fn, state, data]
  wall, _ = time_interleaved(runners, args.repeats, args.rounds, 1)
  for name in runners:
    out[f"{name}_ms"] = statistics.median(wall[name])
    out[f"{name}_rounds_per_s"] = 1e3 / out[f"{name}_ms"]
  for name in ("chunked", "stream"):
    out[f"{name}_ratio"] = out["reference_ms"] / out[f"{name}_ms"]
  return out


def report(rows: list[dict], args, load: tuple, sizes: list[int], took: float) -> str:
  cmd = "python bench/text_bench.py " + " ".join(sys.argv[1:])
  lines = [
      "# Round throughput on the next-character task",
      "",
      f"Command: `{cmd.strip()}` ({datetime.date.today().isoformat()}, {took:.0f} s).",
      "",
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
      f"JAX {jax.__version__} on {jax.devices()[0].platform}; load average "
      f"{load[0]:.2f} before and {load[1]:.2f} after the run (1-minute; the machine is shared).",
      "",
      f"Data: LEAF Shakespeare written by the script, {args.clients} roles, log-normal sizes "
      f"(median {int(np.median(sizes))}, max {max(sizes)} examples), capped at "
      f"{args.max_client_size} (data.max_client_size); T = {args.seq_len}, V = 90. Model: "
      f"char_gru, embedding 8, GRU {tuple(args.hidden)}; FedAvg, B = 10, E = 1, chunk_size "
      f"{args.chunk_size}, stream slots W = min({args.slots}, K). Median of {args.repeats} "
      f"interleaved sweeps of {args.rounds} rounds.",
      "",
      "| K | chunked rounds/s | stream rounds/s | reference rounds/s | chunked / reference | "
      "stream / reference | padding efficiency chunked, stream | compile chunked / stream / "
      "reference (s) |",
      "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(f"| {r['K']} | {r['chunked_rounds_per_s']:.2f} | "
                 f"{r['stream_rounds_per_s']:.2f} | {r['reference_rounds_per_s']:.2f} | "
                 f"{r['chunked_ratio']:.2f}x | {r['stream_ratio']:.2f}x | "
                 f"{r['chunked_padding']:.2f}, {r['stream_padding']:.2f} | "
                 f"{r['chunked_compile_s']:.1f} / {r['stream_compile_s']:.1f} / "
                 f"{r['reference_compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--clients", type=int, default=100)
  ap.add_argument("--cohorts", type=int, nargs="+", default=[10, 50])
  ap.add_argument("--median-size", type=int, default=20)
  ap.add_argument("--max-client-size", type=int, default=64)
  ap.add_argument("--seq-len", type=int, default=80)
  ap.add_argument("--hidden", type=int, nargs="+", default=[128])
  ap.add_argument("--chunk-size", type=int, default=5)
  ap.add_argument("--slots", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  ap.add_argument("--out", default=os.path.join(HERE, "TEXT.md"))
  ap.add_argument("--append", action="store_true",
                  help="add the table as a further section of --out (another model size)")
  args = ap.parse_args(argv)
  if args.quick:
    args.clients, args.cohorts, args.max_client_size, args.seq_len = 12, [4], 12, 16
    args.hidden, args.repeats, args.rounds, args.chunk_size, args.slots = [8], 2, 1, 2, 2
  t0 = time.perf_counter()
  load0 = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as root:
    sizes = write_leaf(root, args.clients, args.median_size)
    rows = []
    for k in args.cohorts:
      rows.append(bench(root, args, k))
      print(json.dumps(rows[-1]), flush=True)
  text = report(rows, args, (load0, os.getloadavg()[0]), sizes, time.perf_counter() - t0)
  if args.append:
    text = "\n" + text.replace("# Round throughput", "## Round throughput", 1)
  with open(args.out, "a" if args.append else "w") as f:
    f.write(text)
  print(text)
  return rows


if __name__ == "__main__":
  main()
