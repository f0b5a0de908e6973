"""Where CoRe-Fed's time per round goes, against FedAvg (digits, the throughput setup).

    .venv/bin/python bench/corefed_profile.py                       # presets, interleaved
    .venv/bin/python bench/corefed_profile.py --methods fedavg,corefed --repeats 10
    .venv/bin/python bench/corefed_profile.py --hlo /tmp/hlo        # also dump optimized HLO
    .venv/bin/python bench/corefed_profile.py --trace corefed        # per-part time (profiler)

Same setup as ``throughput()`` in ``launch/experiments/corefed_digits.py``
(``launch/configs/corefed_digits.py``: 100 clients, 20 per round, MLP
64-200-200-10, E=1, B=10; 10 rounds fused per call, 50 rounds per repeat,
configurations interleaved by ``fedjax_sim.simulation.time_interleaved``). Methods: fedavg,
reference (CoRe-Fed's reference_code), refed, cofed, corefed. Prints the
median and minimum wall ms/round, the median process CPU ms/round and the
ratios to FedAvg; with ``--hlo`` writes each configuration's optimized HLO
(count of while loops, fusions, copies in the round's text) for inspection.
``--trace METHOD`` instead runs 10 calls (100 rounds) of one configuration
under ``jax.profiler`` and sums the leaf thunks' times per round by the named
scopes of ``algorithms/corefed.py`` (corefed_loss, corefed_embedding,
corefed_server, corefed_reuse); dots carry no scope in XLA's metadata, so
the [1, P] GEMVs (the reuse pass, and FedAvg's own average) are listed as
``gemv [1, P]``. The profiler inflates small thunks (about 1.5x in total):
read it for where the time goes, not for the ratio.
"""
from __future__ import annotations

import argparse
import os
import re

import jax
import numpy as np

from fedjax_sim import simulation
from fedjax_sim.launch.configs import corefed_ablation
from fedjax_sim.launch.experiment import build_experiment

ROUNDS_PER_CALL = 10  # as the driver's throughput(): 10 rounds fused per call


def build(method: str) -> list:
  """[round_fn, compiled state, train data] of one configuration in the timing setup.

  ``method``: a variant of ``launch/configs/corefed_ablation.py`` on digits (corefed, refed,
  cofed, reference, fedavg, qffl, fedmdfg), seed 0.
  """
  cfg = corefed_ablation.get_config(f"digits:{method}")
  cfg.seed, cfg.progress = 0, False
  return simulation.compiled_round(build_experiment(cfg), ROUNDS_PER_CALL)


def hlo_summary(rf, st, data, path: str) -> dict:
  text = rf.lower(st, data).compile().as_text()
  with open(path, "w") as f:
    f.write(text)
  return {"fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M)),
          "copies": len(re.findall(r" copy\(", text)),
          "whiles": len(re.findall(r" while\(", text)),
          "chars": len(text)}


def trace(method: str, calls: int = 10, top: int = 20) -> None:
  import collections
  import glob
  import gzip
  import json
  import tempfile
  rf, st, d = build(method)
  text = rf.lower(st, d).compile().as_text()
  info = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) (\S+?)\(", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      info[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
  st, _ = rf(st, d)
  jax.block_until_ready(st)
  out = tempfile.mkdtemp(prefix="corefed_trace_")
  with jax.profiler.trace(out, create_perfetto_trace=True):
    for _ in range(calls):
      st, _ = rf(st, d)
    jax.block_until_ready(st)
  path = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)[-1]
  events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
  scopes = ("corefed_reuse", "corefed_server", "corefed_loss", "corefed_embedding")
  parts, ops = collections.Counter(), collections.Counter()
  for e in events:
    if e["name"] not in info:
      continue
    shape, kind, op = info[e["name"]]
    if kind in ("while", "call", "conditional"):  # containers: their leaves are counted
      continue
    part = next((s for s in scopes if s in op), "other (engine, FedAvg's training)")
    if kind == "dot" and shape.startswith("f32[1,"):
      part = "gemv [1, P]"
    parts[part] += e["dur"]
    ops[(part, e["name"], shape.split("{")[0])] += e["dur"]
  rounds = calls * ROUNDS_PER_CALL
  print(f"{method}: leaf thunks {sum(parts.values()) / rounds / 1e3:.3f} ms/round (profiled)")
  for k, t in parts.most_common():
    print(f"  {k:36s} {t / rounds / 1e3:7.3f} ms/round")
  for (part, name, shape), t in ops.most_common(top):
    print(f"    {t / rounds / 1e3:7.3f}  {part:24s} {name:40s} {shape}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--methods", default="fedavg,reference,refed,cofed,corefed")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--rounds", type=int, default=50,
                  help=f"timed rounds per repeat (a multiple of {ROUNDS_PER_CALL})")
  ap.add_argument("--hlo", default="", help="folder for the optimized HLO texts")
  ap.add_argument("--trace", default="", help="profile one method's round by part")
  args = ap.parse_args()
  if args.trace:
    trace(args.trace)
    return
  if args.rounds <= 0 or args.rounds % ROUNDS_PER_CALL:
    ap.error(f"--rounds={args.rounds}: must be a positive multiple of {ROUNDS_PER_CALL} "
             f"(each call runs {ROUNDS_PER_CALL} rounds); e.g. --rounds=50")
  methods = args.methods.split(",")
  fns = {}
  for m in methods:
    fns[m] = build(m)
    if args.hlo:
      os.makedirs(args.hlo, exist_ok=True)
      print(m, hlo_summary(*fns[m], os.path.join(args.hlo, f"{m}.hlo.txt")))
  wall, cpu = simulation.time_interleaved(fns, args.repeats, args.rounds, ROUNDS_PER_CALL)
  base = methods[0]
  print(f"{'method':10s} {'wall med':>9s} {'wall min':>9s} {'cpu med':>8s}  x{base} (med / min / cpu)")
  for m in methods:
    print(f"{m:10s} {np.median(wall[m]):9.2f} {np.min(wall[m]):9.2f} {np.median(cpu[m]):8.2f}  "
          f"{np.median(wall[m]) / np.median(wall[base]):.3f} / "
          f"{np.min(wall[m]) / np.min(wall[base]):.3f} / "
          f"{np.median(cpu[m]) / np.median(cpu[base]):.3f}")


if __name__ == "__main__":
  main()
