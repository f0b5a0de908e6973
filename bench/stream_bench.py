"""Streaming schedule vs chunked schedule (issue 16, first step): rounds/s and padding.

    python bench/stream_bench.py                 # full run, writes bench/STREAM.md
    python bench/stream_bench.py --quick         # smoke run (fewer rounds), prints only

Workload: FedAvg on digits, 100 clients Dir(0.5), MLP 64-200-200-10, B=10, E=1, client lr 0.1,
seed 0, one device. For K = 20 and K = 100 it times, in ONE process with interleaved sweeps
(every runner trains the same rounds 1..M: the round counter is rewound each sweep):

* ``chunked chunk=5``: ``make_round(chunk_size=5)`` (the default schedule);
* ``stream W=10|20|40``: ``make_round(schedule="stream", slots=W)`` (W is capped at K).

and reports rounds/s (rounds per sweep / median sweep time), the ratio to chunked, and the
padding efficiency each schedule logs (chunked: useful / (sum over chunks of the largest
client's steps x chunk x B); stream: useful / (loop iterations x W x B)).

Then it profiles ONE streamed round (K=100, W=10 and W=20):

* a time split: the round's wall time against the same number of W-wide local steps alone
  (a ``fori_loop`` of ``vmap(local_step)`` over W fixed clients, with the same active-mask
  select), the loop's iteration count taken from a host replay of the queue;
* a ``jax.profiler`` trace of 10 rounds: the XLA ops with the most time, with the source
  (HLO ``op_name``) each comes from;
* the optimized HLO's op counts (whole program, and in ``while`` body computations).

Every number comes from one run; ``uptime``'s load average is recorded before and after
(the machine is shared).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_sim import models, sampling  # noqa: E402
from fedjax_sim.algorithms import fedavg  # noqa: E402
from fedjax_sim.protocol import (ClientInfo, LocalCarry, local_batch, local_metrics,  # noqa: E402
                                 local_plan, local_step, num_local_steps)
from fedjax_sim.round import init_state, make_mesh, make_round, replicate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from report_notes import write_keeping_notes  # noqa: E402
BATCH, EPOCHS, LR, SEED, NUM_CLIENTS = 10, 1, 0.1, 0, 100


def digits_mlp():
  """(apply_fn, init_params, train ClientData [C, N, ...]): MLP(200, 200) on digits, 100
  clients Dir(0.5) (also ``bench/stream_algorithms.py``'s workload)."""
  from fedjax_sim.data import build_federated_data
  fd = build_federated_data({"dataset": "digits", "num_clients": NUM_CLIENTS,
                             "partition": "dirichlet", "alpha": 0.5},
                            batch_size=BATCH, seed=SEED)
  model = models.build_model("mlp", fd.num_classes, hidden=(200, 200))
  apply_fn = lambda params, x: model.apply({"params": params}, x)
  init_params = lambda rng: models.init_params(model, rng, fd.input_shape)
  return apply_fn, init_params, fd.train


def setup():
  """(algorithm, data ClientData [C, N, ...]): FedAvg + MLP(200, 200) on digits."""
  apply_fn, init_params, train = digits_mlp()
  return fedavg(apply_fn, init_params, client_lr=LR, batch_size=BATCH, epochs=EPOCHS), train


def uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  except OSError:
    return "n/a"


class Runner:
  def __init__(self, label, fn, state, mesh):
    self.label, self.fn, self.state, self.mesh = label, fn, state, mesh
    self.sweeps, self.effs, self.first_s = [], [], float("nan")

  def call(self, data, start=None):
    if start is not None:
      self.state = self.state._replace(round=replicate(jnp.int32(start), self.mesh))
    t = time.perf_counter()
    self.state, m = self.fn(self.state, data)
    m = jax.device_get(m)
    jax.block_until_ready(self.state)
    self.effs.append(float(np.mean(m["padding_efficiency"])))
    return time.perf_counter() - t


def time_case(alg, data, k, variants, rounds, sweeps, log):
  """Rounds/s and padding efficiency of each (label, make_round kwargs) at cohort size k."""
  mesh = make_mesh(1)
  sampler = sampling.uniform(NUM_CLIENTS, k)
  data = replicate(data, mesh)
  runners = []
  for label, kw in variants:
    fn = make_round(alg, sampler, seed=SEED, mesh=mesh, **kw)
    r = Runner(label, fn, init_state(alg, sampler, NUM_CLIENTS, SEED, mesh), mesh)
    r.first_s = r.call(data)
    log(f"  K={k} {label}: first call (compile + 1 round) {r.first_s:.2f}s")
    runners.append(r)
  params = {r.label: jax.device_get(getattr(r.state.server, "params", r.state.server))
            for r in runners}  # q-FFL's server state is the params pytree
  for s in range(sweeps):
    for r in runners:
      r.sweeps.append(sum(r.call(data, start) for start in range(1, rounds + 1)))
    log(f"  K={k} sweep {s + 1}/{sweeps}: " + ", ".join(
        f"{r.label} {rounds / r.sweeps[-1]:.1f}" for r in runners) + " rounds/s")
  base = params[runners[0].label]
  rows = []
  for r in runners:
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params[r.label]), jax.tree.leaves(base)))
    rows.append(dict(k=k, label=r.label, rps=rounds / statistics.median(r.sweeps),
                     eff=float(np.mean(r.effs[1:])), first=r.first_s, diff=diff))
  for row in rows:
    row["ratio"] = row["rps"] / rows[0]["rps"]
  return rows


def replay_queue(steps_sorted, w):
  """Host replay of the stream loop: (iterations, refills after the initial one)."""
  queue = list(steps_sorted)
  slots = [None] * w  # remaining steps or None (idle)
  nxt, iters, refills = 0, 0, 0
  for i in range(w):
    if nxt < len(queue):
      slots[i], nxt = queue[nxt], nxt + 1
  while any(s is not None for s in slots):
    slots = [None if s is None else s - 1 if s > 0 else s for s in slots]
    iters += 1
    if any(s is not None and s <= 0 for s in slots):
      refills += 1
      for i, s in enumerate(slots):
        if s is not None and s <= 0:
          slots[i] = None
          if nxt < len(queue):
            slots[i], nxt = queue[nxt], nxt + 1
  return iters, refills


def hlo_op_counts(compiled_text: str):
  """Opcode counts of optimized HLO: (whole program, inside while bodies)."""
  total, in_while = collections.Counter(), collections.Counter()
  bodies = set(re.findall(r"body=%?([\w.\-]+)", compiled_text))
  comp = None
  for line in compiled_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line.strip()) if line and not \
        line.startswith(" ") else None
    if m:
      comp = m.group(1)
      continue
    op = re.search(r"= [\w\[\]{},:\d\s/()]*?\b([a-z][a-z\-]*)\(", line)
    if op:
      total[op.group(1)] += 1
      if comp in bodies:
        in_while[op.group(1)] += 1
  return total, in_while


def profile(alg, data, k, w, log):
  """Time split of one streamed round (K=k, W=w) and its HLO op counts."""
  mesh = make_mesh(1)
  sampler = sampling.uniform(NUM_CLIENTS, k)
  data = replicate(data, mesh)
  fn = make_round(alg, sampler, seed=SEED, mesh=mesh, schedule="stream", slots=w, donate=False)
  state = init_state(alg, sampler, NUM_CLIENTS, SEED, mesh)
  state = jax.block_until_ready(fn(state, data)[0])  # round 0 done; profile round 1
  lowered = fn.lower(state, data)
  text = lowered.compile().as_text()
  total, in_while = hlo_op_counts(text)

  def med(f, *a, n=15):
    f(*a)
    ts = []
    for _ in range(n):
      t = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t)
    return statistics.median(ts)

  round_s = med(fn, state, data)
  # The cohort of round 1 (same sampler and key as the round), its step counts, the replay.
  from fedjax_sim import seeding
  k_sample, k_clients, _ = seeding.round_subkeys(SEED, jnp.int32(1))
  ids, _ = sampler.sample(k_sample, jnp.int32(1), state.sampler)
  n = np.asarray(data.num_examples)[np.asarray(ids)]
  steps = np.asarray(num_local_steps(jnp.asarray(n), epochs=EPOCHS, batch_size=BATCH))
  order = np.argsort(-n, kind="stable")
  ids, steps = np.asarray(ids)[order], steps[order]
  iters, refills = replay_queue(steps.tolist(), w)

  spec = alg.local
  bcast = state.server
  slot_ids = jnp.asarray(ids[:w])
  rngs = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(slot_ids)
  infos = ClientInfo(slot_ids, jnp.full((w,), 1, jnp.int32), jnp.ones((w,), bool))

  def load(gid, rng, info):
    cdata = jax.tree.map(lambda a: a[gid], data)
    p0, aux = spec.begin(bcast, (), cdata, rng, info)
    plan = local_plan(cdata, rng, epochs=EPOCHS, batch_size=BATCH)
    return plan, aux, LocalCarry(p0, spec.optimizer(info).init(p0), jnp.float32(0), jnp.int32(0))

  @jax.jit
  def steps_only(num_iters):
    plan, aux, carry = jax.vmap(load)(slot_ids, rngs, infos)

    def one(plan, aux, carry, s, info):
      idx, bmask = local_batch(plan, s, BATCH)
      gid = info.client_id
      loss = lambda p, x, y, m, r: spec.loss(p, aux, x, y, m, r)
      return local_step(loss, spec.optimizer(info), carry, data.x[gid, idx], data.y[gid, idx],
                        bmask, jax.random.fold_in(plan.loss_key, s))

    def body(i, c):
      s = jnp.full((w,), i, jnp.int32) % jnp.maximum(plan.steps, 1)
      new = jax.vmap(one)(plan, aux, c, s, infos)
      active = s >= 0
      return jax.tree.map(lambda a, b: jnp.where(
          active.reshape(active.shape + (1,) * (a.ndim - 1)), a, b), new, c)
    return jax.lax.fori_loop(0, num_iters, body, carry)

  step_s = med(steps_only, iters)
  ops = trace_ops(fn, state, data, text)
  log(f"  profile K={k} W={w}: round {1e3 * round_s:.2f} ms, {iters} iterations, "
      f"{refills + 1} refills; steps alone {1e3 * step_s:.2f} ms")
  return dict(k=k, w=w, round_ms=1e3 * round_s, iters=iters, refills=refills + 1,
              steps_ms=1e3 * step_s, useful=int(np.sum(n)), slot_steps=iters * w, total=total,
              in_while=in_while, ops=ops)


def trace_ops(fn, state, data, hlo_text, rounds=10, top=12):
  """XLA ops by time in a jax.profiler trace of ``rounds`` rounds: [(op, ms/round, calls/round,
  source op_name)], the ops' own (exclusive of ThunkExecutor) durations summed over threads."""
  import glob
  import tempfile
  from jax.profiler import ProfileData
  source = dict(re.findall(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(rounds):
      jax.block_until_ready(fn(state, data))
    jax.profiler.stop_trace()
    pd = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    dur, calls = collections.Counter(), collections.Counter()
    for plane in pd.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_XLAEigen"):
          continue
        for ev in line.events:
          if not ev.name.startswith("ThunkExecutor"):
            dur[ev.name] += ev.duration_ns
            calls[ev.name] += 1
  return [(op, ns / 1e6 / rounds, calls[op] / rounds, source.get(op, "")[-90:])
          for op, ns in dur.most_common(top)]


def report(rows, prof, cmd, load_before, load_after, wall_s) -> str:
  lines = [
      "# Streaming schedule vs chunked schedule (issue 16, first step)", "",
      f"Command: `{cmd}` (repository root); wall time {wall_s:.0f} s.",
      f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.  "
      f"JAX {jax.__version__} ({jax.default_backend()}, 1 device), Python "
      f"{platform.python_version()}, {os.cpu_count()} CPUs visible.",
      f"Machine load (`uptime`) at start: `{load_before}`; at end: `{load_after}`. The machine "
      "is shared with other jobs: absolute rounds/s are noisy, ratios (same process, "
      "interleaved sweeps) less so.", "",
      "Workload: FedAvg, digits, 100 clients Dir(0.5), MLP 64-200-200-10, B=10, E=1, client "
      "lr 0.1, seed 0, `rounds_per_call=1`.", "",
      "| K | schedule | rounds/s | x chunked | padding efficiency | first call s "
      "| max abs dparams vs chunked (after round 0) |",
      "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['k']} | {r['label']} | {r['rps']:.1f} | {r['ratio']:.2f} | "
                 f"{r['eff']:.3f} | {r['first']:.2f} | {r['diff']:.1e} |")
  lines += ["", "W is capped at K (W=40 at K=20 runs 20 slots).", ""]
  for p in prof:
    lines += profile_lines(p)
  return "\n".join(lines) + "\n"


def profile_lines(p) -> list:
  lines = [
      f"## Where a streamed round's time goes (K={p['k']}, W={p['w']}, round 1)", "",
      f"* Queue replay: {p['iters']} loop iterations ({p['slot_steps']} slot-steps, "
      f"{p['useful']} useful examples, so {p['useful'] / (p['slot_steps'] * BATCH):.3f} "
      f"padding efficiency), {p['refills']} refills (the initial load included).",
      f"* Round wall time (median of 15): **{p['round_ms']:.2f} ms**.",
      f"* The same {p['iters']} W-wide local steps alone (fori_loop of vmap(local_step), "
      f"masked select): {p['steps_ms']:.2f} ms ({100 * p['steps_ms'] / p['round_ms']:.0f}%).",
      f"* Everything else (refills: W x (finish + begin + batch plan), the uploads written "
      f"into [K, ...] buffers, sampling, the server update): "
      f"{p['round_ms'] - p['steps_ms']:.2f} ms "
      f"({100 * (p['round_ms'] - p['steps_ms']) / p['round_ms']:.0f}%).", "",
      "jax.profiler trace (10 rounds; XLA ops' own time summed over the runtime's threads, so "
      "the profiler's overhead included), top 12:", "",
      "| XLA op | ms/round | calls/round | source (HLO op_name, tail) |", "|---|---|---|---|"]
  for op, ms, c, src in p["ops"]:
    lines.append(f"| {op} | {ms:.2f} | {c:.1f} | `{src}` |")
  lines += ["",
      "Optimized HLO op counts (whole round program / in computations that are `while` "
      "bodies, not counting ops inside their fusions), top 10:", "",
      "| op | program | in while bodies |", "|---|---|---|"]
  for op, c in p["total"].most_common(10):
    lines.append(f"| {op} | {c} | {p['in_while'].get(op, 0)} |")
  return lines + [""]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer rounds; print only")
  ap.add_argument("--out", default=os.path.join(HERE, "STREAM.md"))
  ap.add_argument("--rounds", type=int, default=20, help="rounds per sweep")
  ap.add_argument("--sweeps", type=int, default=5)
  args = ap.parse_args(argv)
  if args.quick:
    args.rounds, args.sweeps = 4, 2
  t0, load_before = time.perf_counter(), uptime()
  log = lambda s: print(s, flush=True)
  alg, data = setup()
  variants = [("chunked chunk=5", dict(chunk_size=5))] + [
      (f"stream W={w}", dict(schedule="stream", slots=w)) for w in (10, 20, 40)]
  rows = []
  for k in (20, 100):
    rows += time_case(alg, data, k, variants, args.rounds, args.sweeps, log)
  prof = [profile(alg, data, 100, w, log) for w in (10, 20)]
  wall = time.perf_counter() - t0
  cmd = "python bench/stream_bench.py" + (" --quick" if args.quick else "")
  text = report(rows, prof, cmd, load_before, uptime(), wall)
  print(text)
  if not args.quick:  # keeps the hand-written notes section of an existing report
    write_keeping_notes(args.out, text)


if __name__ == "__main__":
  main(sys.argv[1:])
