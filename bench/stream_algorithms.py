"""The streaming schedule against the chunked one for each algorithm that streams.

    python bench/stream_algorithms.py            # writes bench/STREAM_ALGORITHMS.md
    python bench/stream_algorithms.py --quick    # fewer rounds; prints only

Workload: bench/stream_bench.py's (digits, 100 clients Dir(0.5), MLP 64-200-200-10, B = 10,
E = 1, client lr 0.1, seed 0, one device) for FedAvg, FedProx (mu 0.01), SCAFFOLD (per-client
control variates, stacked uploads) and q-FFL (q 1; its loss at the global model is a
``LocalSpec.prepare`` step). For K = 20 and K = 100, in ONE process with interleaved sweeps
(``stream_bench.time_case``): ``chunked chunk=5`` (the default schedule) against ``stream``
with the default W (``stream.default_slots``: ceil(K/4), at most 20). It reports rounds/s
(rounds per sweep / median sweep time) and the stream's ratio to chunked, per algorithm.
Every number comes from one run on a shared machine; the load average is recorded.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from fedjax_sim.algorithms import fedavg, scaffold  # noqa: E402
from fedjax_sim.algorithms.qffl import qffl  # noqa: E402
from fedjax_sim.algorithms.fedprox import fedprox  # noqa: E402
from fedjax_sim.stream import default_slots  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report_notes import write_keeping_notes  # noqa: E402
from stream_bench import (BATCH, EPOCHS, LR, NUM_CLIENTS, digits_mlp, time_case,  # noqa: E402
                          uptime)


def algorithms():
  """{name: algorithm} on stream_bench's MLP(200, 200), and the digits client data."""
  apply_fn, init, train = digits_mlp()
  kw = dict(client_lr=LR, batch_size=BATCH, epochs=EPOCHS)
  return {"fedavg": fedavg(apply_fn, init, **kw),
          "fedprox": fedprox(apply_fn, init, mu=0.01, **kw),
          "scaffold": scaffold(apply_fn, init, num_clients=NUM_CLIENTS, **kw),
          "qffl": qffl(apply_fn, init, q=1.0, **kw)}, train


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--rounds", type=int, default=20, help="rounds per sweep")
  ap.add_argument("--sweeps", type=int, default=5)
  ap.add_argument("--out", default=os.path.join(HERE, "STREAM_ALGORITHMS.md"))
  args = ap.parse_args()
  if args.quick:
    args.rounds, args.sweeps = 3, 2
  log = lambda s: print(s, file=sys.stderr, flush=True)
  up0 = uptime()
  algs, data = algorithms()
  rows = []
  for name, alg in algs.items():
    for k in (20, 100):
      variants = [("chunked chunk=5", dict(chunk_size=5)),
                  (f"stream W={default_slots(k)}", dict(schedule="stream"))]
      for r in time_case(alg, data, k, variants, args.rounds, args.sweeps,
                         lambda s, n=name: log(f"{n} {s}")):
        rows.append(dict(r, algorithm=name))
  up1 = uptime()
  lines = [
      "# The streaming schedule against the chunked one, per algorithm", "",
      f"Command: `python bench/stream_algorithms.py`. Date: "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. JAX "
      f"{jax.__version__} ({jax.default_backend()}, 1 device), {os.cpu_count()} CPUs visible.",
      f"Load: before `{up0}`; after `{up1}` (shared machine).", "",
      "Workload: digits, 100 clients Dir(0.5), MLP 64-200-200-10, B = 10, E = 1, client lr "
      f"0.1; {args.rounds} rounds per sweep, {args.sweeps} interleaved sweeps, median.", "",
      "| algorithm | K | schedule | rounds/s | vs chunked | padding efficiency | first call s "
      "| max abs param diff vs chunked |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['algorithm']} | {r['k']} | {r['label']} | {r['rps']:.1f} | "
                 f"{r['ratio']:.2f}x | {r['eff']:.3f} | {r['first']:.1f} | {r['diff']:.1e} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.quick:
    write_keeping_notes(args.out, text)


if __name__ == "__main__":
  main()
