"""Cost of the multi-model losses as M (other users per anchor) grows.

For M in 1..4, one anchor matrix [B, D] and M others [M, B, D] (random unit
rows), jitted ``value_and_grad`` w.r.t. the anchor of:
muscle (factorized contraction, ``losses.muscle_loss``), muscle_dense (the
[B, B^M] logits materialized, ``losses.muscle_loss_dense``), pairwise InfoNCE
and the GRAM volume loss. Reports the median wall time of ``--repeats`` calls
and XLA's compiled temporary-buffer size (``memory_analysis().temp_size_in_bytes``,
which does not depend on machine load), plus the analytic float counts.

  python bench/muscle_cost.py --out=docs/results/fedmuscle_cost.json
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from fedjax_sim.algorithms import losses
from fedjax_sim.metrics import l2_normalize

LOSSES = {
    "muscle": lambda a, o: losses.muscle_loss(a, o, 0.2, 0.15),
    "muscle_dense": lambda a, o: losses.muscle_loss_dense(a, o, 0.2, 0.15),
    "pairwise": lambda a, o: losses.pairwise_info_nce(a, o, 0.2),
    "gram": lambda a, o: losses.gram_volume_loss(a, o, 0.2),
}


def measure(name: str, m: int, b: int, d: int, repeats: int) -> dict:
  key = jax.random.PRNGKey(m)
  a = l2_normalize(jax.random.normal(key, (b, d)))
  o = l2_normalize(jax.random.normal(jax.random.fold_in(key, 1), (m, b, d)))
  fn = jax.jit(jax.value_and_grad(LOSSES[name]))
  compiled = fn.lower(a, o).compile()
  mem = compiled.memory_analysis()
  temp = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
  jax.block_until_ready(fn(a, o))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(a, o))
    times.append(time.perf_counter() - t)
  val = float(fn(a, o)[0])
  return {"loss": name, "M": m, "B": b, "D": d, "median_ms": 1e3 * float(np.median(times)),
          "min_ms": 1e3 * float(np.min(times)), "xla_temp_bytes": temp, "value": val}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--B", type=int, default=32)
  ap.add_argument("--D", type=int, default=32)
  ap.add_argument("--max_m", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  rows = []
  print(f"B={args.B} D={args.D}; value_and_grad w.r.t. the anchor; devices {jax.devices()}")
  print(f"{'loss':13s} {'M':>2s} {'median ms':>10s} {'min ms':>8s} {'XLA temp MiB':>13s} "
        f"{'B^M':>9s} {'value':>8s}")
  for m in range(1, args.max_m + 1):
    for name in LOSSES:
      r = measure(name, m, args.B, args.D, args.repeats)
      rows.append(r)
      print(f"{name:13s} {m:2d} {r['median_ms']:10.3f} {r['min_ms']:8.3f} "
            f"{r['xla_temp_bytes'] / 2**20:13.3f} {args.B ** m:9d} {r['value']:8.4f}")
    same = [r["value"] for r in rows[-4:-2]]
    assert np.isclose(same[0], same[1], rtol=1e-4), f"muscle != muscle_dense at M={m}: {same}"
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "devices": str(jax.devices())}, f, indent=1)


if __name__ == "__main__":
  main()
