"""Round throughput: the vectorized round against a per-client Python loop.

    python bench/throughput.py            # full run, writes bench/RESULTS.md
    python bench/throughput.py --quick    # smoke run (< 60 s), writes bench/RESULTS.md too
                                          # unless --out is given

What is compared (FedAvg, MLP 2NN, batch B=10, E=1 local epoch, client lr 0.1):

* **vectorized**: ``fedjax_sim.round.make_round`` -- cohort sampling, a
  ``vmap``-ed ``client_update`` (optionally in ``lax.map``-ed chunks of
  ``chunk_size`` clients), the server update and ``rounds_per_call`` rounds
  fused with ``lax.scan``, all in one jitted program.
* **reference**: ``fedjax_sim.reference.make_reference_round``, the same math
  as a Python loop: a jitted "plan" (round keys, cohort, broadcast), then ONE
  jitted single-client ``algorithm.client_update`` called once per cohort
  member (same client keys ``fold_in(k_clients, id)``, same ``ClientInfo``),
  then a jitted ``server_update`` on the stacked uploads. Calls are dispatched
  asynchronously, so the loop is not serialized on Python more than it must be.

Per configuration it reports steady-state rounds/s (every runner trains the
same rounds 1..M -- same cohorts -- in interleaved sweeps; median sweep time),
compile time (first call minus a steady call), peak RSS during the
configuration (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
XLA's own memory estimate of the compiled round (arguments + temporaries),
padding efficiency (useful / processed example slots) and useful FLOP/s
(analytic forward+backward matmul FLOPs of the MLP times real examples trained)
against a measured f32 matmul peak.

The machine is shared and noisy: the ratio columns compare numbers measured in
the same process, with vectorized and reference timings interleaved.

Other flags: ``--cases digits100,synth100`` runs a subset; ``--append`` adds
the tables as an extra section of the output file (e.g. a second run under
different ``XLA_FLAGS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_sim import models, sampling  # noqa: E402
from fedjax_sim.algorithms import fedavg  # noqa: E402
from fedjax_sim.reference import make_reference_round  # noqa: E402
from fedjax_sim.round import (SimState, init_state, make_mesh, make_round,  # noqa: E402
                              replicate)

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
  """One benchmark problem: data, algorithm, sampler."""
  name: str
  data: Any  # ClientData [C, N, ...], on device
  algorithm: Any
  sampler: Any
  layer_dims: tuple[int, ...]  # (d_in, h1, ..., num_classes)
  batch_size: int
  seed: int

  @property
  def clients_per_round(self) -> int:
    return self.sampler.clients_per_round


_DATA_CACHE: dict = {}


def make_setup(dataset: str, num_clients: int, clients_per_round: int,
               hidden: Sequence[int] = (200, 200), batch_size: int = 10, epochs: int = 1,
               client_lr: float = 0.1, seed: int = 0) -> Setup:
  """FedAvg + MLP on ``digits`` (Dir(0.5)) or ``synthetic`` (LEAF Synthetic(1, 1))."""
  from fedjax_sim.data import build_federated_data
  key = (dataset, num_clients, batch_size, seed)
  if key not in _DATA_CACHE:
    _DATA_CACHE[key] = build_federated_data(
        {"dataset": dataset, "num_clients": num_clients, "partition": "dirichlet",
         "alpha": 0.5}, batch_size=batch_size, seed=seed)
  fd = _DATA_CACHE[key]
  model = models.build_model("mlp", fd.num_classes, hidden=tuple(hidden))
  apply_fn = lambda params, x: model.apply({"params": params}, x)
  init_params = lambda rng: models.init_params(model, rng, fd.input_shape)
  alg = fedavg(apply_fn, init_params, client_lr=client_lr, batch_size=batch_size, epochs=epochs)
  sampler = sampling.uniform(fd.num_clients, clients_per_round)
  dims = (int(np.prod(fd.input_shape)), *hidden, fd.num_classes)
  return Setup(f"{dataset} C={fd.num_clients}", fd.train, alg, sampler, dims, batch_size, seed)


def train_flops_per_example(layer_dims: Sequence[int]) -> int:
  """Matmul FLOPs to train on one example: forward, weight gradients, input gradients.

  Forward 2*d_i*d_{i+1} per layer; backward the same for dW and for dX except
  the first layer (no gradient w.r.t. the input). Biases/activations ignored.
  """
  macs = [a * b for a, b in zip(layer_dims[:-1], layer_dims[1:])]
  return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


# ------------------------------------------------------------------------ measuring


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mib() -> float:
  """Peak resident set size since the last reset (VmHWM), else the process peak."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("nan")


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
  """Best observed f32 GFLOP/s of a jitted n x n @ n x n matmul."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def _params_np(state: SimState):
  return jax.tree.map(np.asarray, jax.device_get(state.server.params))


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@dataclasses.dataclass
class Runner:
  """A round function under test plus its running state and measurements."""
  label: str
  fn: Callable
  rounds_per_call: int
  state: Any
  chunk_size: Optional[int] = None
  first_call_s: float = float("nan")
  peak_rss_mib: float = float("nan")
  xla_mib: float = float("nan")
  params_after_first: Any = None

  sweep_times: list = dataclasses.field(default_factory=list)
  pad_effs: list = dataclasses.field(default_factory=list)
  usefuls: list = dataclasses.field(default_factory=list)
  mesh: Any = None

  def call(self, data, start_round: Optional[int] = None) -> float:
    """One call (R rounds); ``start_round`` rewinds the round counter first."""
    if start_round is not None:
      self.state = self.state._replace(round=replicate(jnp.int32(start_round), self.mesh))
    t = time.perf_counter()
    self.state, metrics = self.fn(self.state, data)
    metrics = jax.device_get(metrics)
    jax.block_until_ready(self.state)
    dt = time.perf_counter() - t
    self.pad_effs.append(float(np.mean(metrics["padding_efficiency"])))
    self.usefuls.append(float(np.mean(metrics["useful_examples"])))
    return dt

  @property
  def padding_efficiency(self) -> float:
    return float(np.mean(self.pad_effs[1:] or self.pad_effs))

  @property
  def useful_per_round(self) -> float:
    return float(np.mean(self.usefuls[1:] or self.usefuls))

  @property
  def rounds_per_s(self) -> float:
    """Rounds per sweep / median sweep time."""
    return self.sweep_rounds / statistics.median(self.sweep_times)

  @property
  def compile_s(self) -> float:
    """First call minus a steady call of the same length (R rounds)."""
    return self.first_call_s - self.rounds_per_call / self.rounds_per_s

  sweep_rounds: int = 1


def _xla_memory_mib(compiled) -> float:
  """XLA's estimate for the compiled program: arguments + outputs + temporaries - aliased."""
  try:
    ma = compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    return total / 2 ** 20
  except Exception:  # noqa: BLE001 - best effort, backend-dependent
    return float("nan")


def run_case(setup: Setup, variants: Sequence[tuple[Optional[int], int]], *,
             rounds_per_sweep: int, sweeps: int = 3, xla_memory: bool = True,
             log=print) -> dict:
  """Benchmarks the reference and each ``(chunk_size, rounds_per_call)`` variant.

  1. First call of each runner from a fresh state (trace + compile + run
     rounds 0..R-1), with the RSS peak reset per runner.
  2. Equivalence: each variant's server params after that call are compared
     with the reference's after R rounds.
  3. Timing: ``sweeps`` sweeps; in a sweep every runner in turn runs rounds
     1..``rounds_per_sweep`` (the round counter is rewound, so every runner
     trains exactly the same cohorts: identical work). Interleaving spreads
     the load of other processes over all runners. rounds/s = rounds per
     sweep / median sweep time.

  ``rounds_per_sweep`` must be a multiple of every variant's R.

  Returns a dict with ``setup``, ``runners`` (reference first; a variant's
  ``params_after_first`` holds its server params after R rounds),
  ``max_param_diff`` (variant label -> max |params - reference params|) and
  ``ref_params`` (reference server params after rounds 1, 2, ...).
  """
  alg, sampler, data, seed = setup.algorithm, setup.sampler, setup.data, setup.seed
  num_clients = int(data.num_examples.shape[0])
  for _, rpc in variants:
    if rounds_per_sweep % rpc:
      raise ValueError(f"rounds_per_sweep={rounds_per_sweep} is not a multiple of R={rpc}")
  # Placed on the mesh like simulation.py does; an uncommitted initial state
  # makes the jitted round compile a second time on its second call.
  mesh = make_mesh()
  fresh = lambda: replicate(init_state(alg, sampler, num_clients, seed), mesh)

  ref = Runner("reference loop", make_reference_round(alg, sampler, seed=seed), 1, fresh(),
               mesh=mesh, sweep_rounds=rounds_per_sweep)
  runners = [ref]
  for chunk, rpc in variants:
    if isinstance(chunk, str):  # "stream:W", the streaming schedule with W slots
      slots = int(chunk.split(":")[1])
      label = f"stream W={slots} R={rpc}"
      fn = make_round(alg, sampler, seed=seed, schedule="stream", slots=slots,
                      rounds_per_call=rpc)
      chunk = None
    else:
      label = f"vmap chunk={chunk or 'all'} R={rpc}"
      fn = make_round(alg, sampler, seed=seed, chunk_size=chunk, rounds_per_call=rpc)
    runners.append(Runner(label, fn, rpc, fresh(), chunk_size=chunk, mesh=mesh,
                          sweep_rounds=rounds_per_sweep))

  # First calls. The vectorized rounds are compiled ahead of time so that
  # XLA's memory analysis comes from the very executable that is timed.
  ref_params = []
  for r in runners:
    _reset_peak_rss()
    t = time.perf_counter()
    if r is not ref:
      r.fn = r.fn.lower(r.state, data).compile()
      if xla_memory:
        r.xla_mib = _xla_memory_mib(r.fn)
    r.first_call_s = r.call(data) + (time.perf_counter() - t)
    if r is ref:
      ref_params.append(_params_np(r.state))
    else:
      r.params_after_first = _params_np(r.state)
    r.peak_rss_mib = _peak_rss_mib()
    log(f"  {r.label}: first call {r.first_call_s:.2f}s")

  need = max((rpc for _, rpc in variants), default=1)
  while len(ref_params) < need:
    ref.call(data)
    ref_params.append(_params_np(ref.state))
  diffs = {r.label: _max_abs_diff(r.params_after_first, ref_params[r.rounds_per_call - 1])
           for r in runners[1:]}

  for sweep in range(sweeps):
    for r in runners:
      _reset_peak_rss()
      total = 0.0
      for start in range(1, rounds_per_sweep + 1, r.rounds_per_call):
        total += r.call(data, start_round=start)
      r.sweep_times.append(total)
      r.peak_rss_mib = max(r.peak_rss_mib, _peak_rss_mib())
    log(f"  sweep {sweep + 1}/{sweeps}: " + ", ".join(
        f"{r.label} {rounds_per_sweep / r.sweep_times[-1]:.2f}" for r in runners) + " rounds/s")
  return {"setup": setup, "runners": runners, "max_param_diff": diffs,
          "ref_params": ref_params}


# --------------------------------------------------------------------------- report


def _fmt(x: float, nd: int = 2) -> str:
  if x != x:  # nan
    return "n/a"
  return f"{x:,.{nd}f}"


def case_rows(result: dict, peak_gflops: float) -> list[dict]:
  setup: Setup = result["setup"]
  runners = result["runners"]
  ref = runners[0]
  fpe = train_flops_per_example(setup.layer_dims)
  rows = []
  for r in runners:
    useful_gflops = r.useful_per_round * fpe * r.rounds_per_s / 1e9
    rows.append({
        "problem": setup.name, "K": setup.clients_per_round, "variant": r.label,
        "rounds_per_s": r.rounds_per_s, "speedup": r.rounds_per_s / ref.rounds_per_s,
        "compile_s": r.compile_s, "peak_rss_mib": r.peak_rss_mib, "xla_mib": r.xla_mib,
        "padding_eff": r.padding_efficiency, "useful_gflops": useful_gflops,
        "pct_peak": 100 * useful_gflops / peak_gflops,
        "timed_rounds": len(r.sweep_times) * r.sweep_rounds,
        "max_param_diff": result["max_param_diff"].get(r.label, float("nan")),
    })
  return rows


def _diff(r: dict) -> str:
  if r["variant"] == "reference loop":
    return "-"
  d = r["max_param_diff"]
  return "n/a" if d != d else f"{d:.1e}"


def markdown_table(rows: list[dict]) -> str:
  head = ("| problem | K | variant | rounds/s | x ref | compile s | peak RSS MiB | XLA MiB | "
          "pad. eff. | useful GFLOP/s | % peak | timed rounds | max abs dparams vs ref |")
  sep = "|" + "---|" * 14
  lines = [head, sep]
  for r in rows:
    lines.append(
        f"| {r['problem']} | {r['K']} | {r['variant']} | {_fmt(r['rounds_per_s'])} | "
        f"{_fmt(r['speedup'])} | {_fmt(r['compile_s'])} | {_fmt(r['peak_rss_mib'], 0)} | "
        f"{_fmt(r['xla_mib'], 0)} | {_fmt(r['padding_eff'], 3)} | {_fmt(r['useful_gflops'], 3)} | "
        f"{_fmt(r['pct_peak'], 2)} | {r['timed_rounds']} | "
        f"{_diff(r)} |")
  return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
  """Best vectorized and plain vmap vs reference, one line per (problem, K)."""
  out = ["| problem | K | reference rounds/s | plain vmap rounds/s (x ref) | "
         "best vectorized rounds/s (x ref) | best variant |", "|---|---|---|---|---|---|"]
  keys = []
  for r in rows:
    if (r["problem"], r["K"]) not in keys:
      keys.append((r["problem"], r["K"]))
  for p, k in keys:
    group = [r for r in rows if (r["problem"], r["K"]) == (p, k)]
    ref = group[0]
    vec = group[1:]
    plain = next((r for r in vec if r["variant"] == "vmap chunk=all R=1"), None)
    best = max(vec, key=lambda r: r["rounds_per_s"])
    plain_s = (f"{_fmt(plain['rounds_per_s'])} ({_fmt(plain['speedup'])}x)" if plain else "-")
    out.append(f"| {p} | {k} | {_fmt(ref['rounds_per_s'])} | {plain_s} | "
               f"{_fmt(best['rounds_per_s'])} ({_fmt(best['speedup'])}x) | {best['variant']} |")
  return "\n".join(out)


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
          "backend": jax.default_backend(), "devices": len(jax.devices()),
          "python": platform.python_version(),
          "memory_stats": jax.devices()[0].memory_stats()}


# ---------------------------------------------------------------------------- plans


# name -> (setup kwargs, variants [(chunk_size or None = all, rounds_per_call)],
#          rounds per sweep, sweeps)
CASES = {
    "digits20": (dict(dataset="digits", num_clients=100, clients_per_round=20),
                 [(None, 1), (5, 1), (5, 10), ("stream:2", 10), ("stream:5", 10),
                  ("stream:10", 10), ("stream:20", 10)], 20, 3),
    "digits100": (dict(dataset="digits", num_clients=100, clients_per_round=100),
                  [(None, 1), (5, 1), (5, 10), ("stream:1", 10), ("stream:2", 10),
                   ("stream:5", 10), ("stream:10", 10), ("stream:20", 10)], 10, 3),
    "synth100": (dict(dataset="synthetic", num_clients=2000, clients_per_round=100),
                 [(None, 1), (5, 1), (5, 5), ("stream:5", 5), ("stream:10", 5)], 10, 3),
    # Plain vmap at K=1000 runs every client for the largest client's ~50 steps: slow, so
    # few timed rounds here (and no fused variant: fusion is measured at K=10/100).
    "synth1000": (dict(dataset="synthetic", num_clients=2000, clients_per_round=1000),
                  [(None, 1), (1, 1), (10, 1), ("stream:5", 1), ("stream:10", 1),
                   ("stream:20", 1)], 1, 2),
}
QUICK_CASES = {
    "digits100": (CASES["digits100"][0], [(None, 1), (5, 1), ("stream:5", 1)], 3, 2),
}


def run_benchmark(cases: dict, *, log=print) -> tuple[list, float]:
  """Runs every case; returns (table rows, measured matmul peak GFLOP/s)."""
  peak = matmul_peak_gflops()
  log(f"f32 matmul peak (2048^3, best of 8): {peak:.1f} GFLOP/s")
  rows = []
  for name, (kwargs, variants, rounds_per_sweep, sweeps) in cases.items():
    t = time.perf_counter()
    setup = make_setup(**kwargs)
    log(f"[{name}] {setup.name} K={setup.clients_per_round} "
        f"(data {time.perf_counter() - t:.1f}s)")
    res = run_case(setup, variants, rounds_per_sweep=rounds_per_sweep, sweeps=sweeps, log=log)
    rows.extend(case_rows(res, peak))
  return rows, peak


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
  p.add_argument("--cases", default=None,
                 help=f"comma-separated subset of {','.join(CASES)} (default: all)")
  p.add_argument("--out", default=None,
                 help="markdown output path (default bench/RESULTS.md; '-' = stdout only)")
  p.add_argument("--append", action="store_true",
                 help="append the tables to --out as an extra section instead of overwriting")
  args = p.parse_args(argv)
  out_path = args.out or os.path.join(HERE, "RESULTS.md")
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  cases = QUICK_CASES if args.quick else CASES
  if args.cases:
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
      p.error(f"unknown cases {sorted(unknown)}; choose from {','.join(cases)}")
    cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}

  t_start = time.perf_counter()
  load0 = os.getloadavg()[0]
  info = machine_info()
  rss0 = _rss_mib()
  rows, peak = run_benchmark(cases, log=log)
  elapsed = time.perf_counter() - t_start

  cmd = " ".join(["python bench/throughput.py", *(argv if argv is not None else sys.argv[1:])])
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if xla_flags:
    cmd = f"XLA_FLAGS='{xla_flags}' {cmd}"
  goal_lines = []
  # Issue 16's targets: digits K=100 >= 4x the reference loop, synthetic K=1000 >= 3x;
  # padding efficiency >= 0.95.
  for prob_start, k, goal in (("digits", 100, 4.0), ("synthetic", 1000, 3.0)):
    vec = [r for r in rows if r["K"] == k and r["problem"].startswith(prob_start)
           and r["variant"] != "reference loop"]
    if not vec:
      continue
    best = max(vec, key=lambda r: r["rounds_per_s"])
    verdict = "met" if best["speedup"] >= goal else "NOT met"
    goal_lines.append(f"- {best['problem']}, K={k}: best vectorized is {best['speedup']:.2f}x "
                      f"the reference ({best['variant']}); goal {goal:g}x: **{verdict}**.")
  for r in rows:
    if r["variant"] == "reference loop":
      best_eff = max(x["padding_eff"] for x in rows
                     if x["problem"] == r["problem"] and x["K"] == r["K"] and x is not r)
      goal_lines.append(f"- {r['problem']}, K={r['K']}: padding efficiency of the reference "
                        f"loop (only partial last batches) {r['padding_eff']:.3f}; best "
                        f"schedule {best_eff:.3f}; goal 0.95.")
  mem = info["memory_stats"]
  header = [
      f"Command: `{cmd}` (repository root, `.venv` active); wall time {elapsed:.0f} s.",
      f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}.  "
      f"JAX {info['jax']} ({info['backend']}, {info['devices']} device), Python "
      f"{info['python']}, XLA_FLAGS={xla_flags or '(unset)'}.",
      f"CPU: {info['cpu']}, {info['cores']} cores visible, shared with other jobs (timings are "
      "noisy; compare ratios within one table). 1-min load average at start / end: "
      f"{load0:.1f} / {os.getloadavg()[0]:.1f}.",
      f"Measured f32 matmul peak (jitted 2048x2048 @ 2048x2048, best of 8): "
      f"**{peak:.1f} GFLOP/s**.",
      "Device memory_stats(): " + ("None on this backend, so peak memory is process RSS"
                                   if mem is None else str(mem)) +
      f" (RSS before the benchmark: {rss0:.0f} MiB).",
  ]
  body = [
      "### Summary", "", summary_table(rows), "", *goal_lines, "",
      "### All configurations", "", markdown_table(rows), "",
  ]
  if args.append:
    text = "\n".join([f"## Extra run: `{cmd}`", "", *header, "", *body])
  else:
    text = "\n".join([
        "# Round throughput: vectorized round vs per-client loop", "", *header, "",
        "Workload: FedAvg, MLP (input-200-200-10), B=10, E=1, client lr 0.1, seed 0. "
        "digits: 100 clients, Dir(0.5) (K=100 is every client). synthetic: LEAF "
        "Synthetic(1,1), 2000 clients, 60 features, lognormal sizes (3..520 train examples).",
        "", "## Results", "", *body, COLUMN_NOTES, "",
        "(quick smoke run: few calls, rough numbers.)" if args.quick else ANALYSIS, ""])
  print(text)
  if out_path != "-":
    mode = "a" if args.append else "w"
    with open(out_path, mode) as f:
      f.write(("\n" if args.append else "") + text)
    log(f"wrote {out_path}")
  return 0


COLUMN_NOTES = """Columns: **rounds/s** = M / median time of a sweep in which the runner trains rounds
1..M (round counter rewound each sweep, so all runners train identical cohorts; state donated,
metrics fetched, results ready after every call). **x ref** = rounds/s over the reference
loop's, same process, sweeps interleaved. **compile s** = first call minus a steady call of
the same length (tracing + XLA compile).
**peak RSS MiB** = process VmHWM while that runner ran (includes the resident dataset and
everything else in the process; `/proc/self/clear_refs` reset before each call). **XLA MiB**
= compiled program's arguments + outputs + temporaries - donated aliases (XLA
`memory_analysis`). **pad. eff.** = useful examples / example slots processed (vectorized:
each chunk runs max-steps-in-chunk x B slots per client; reference: only the last partial
batch is padding). **useful GFLOP/s** = analytic training matmul FLOPs per example
(forward + dW + dX, no dX for the first layer) x real examples trained per round x rounds/s;
**% peak** against the matmul peak above. **timed rounds** = sweeps x M. **max abs dparams
vs ref** = largest absolute
difference between the server params after the variant's first call (R rounds) and the
reference after R rounds."""

ANALYSIS = """## What this shows / what limits it

* **The vectorized round equals the loop.** Every variant's server params after
  its first call agree with the per-client reference to float32 rounding (last
  column; only the summation order of the aggregate differs).
* **Plain vmap (one vmap over the whole cohort) is not a speedup on this CPU
  when client sizes differ.** A vmapped ``fori_loop`` with per-client trip
  counts runs every client for the cohort's largest step count (``pad. eff.``
  column), and the per-client weights make every matmul a *batched* matmul
  [K, B, h] x [K, h, h], which XLA:CPU runs far below its plain-matmul rate
  (the backward dX product in particular). Size-sorted chunks of a few clients
  (``chunk_size`` 1-10) fix the padding and keep each chunk's weights in cache;
  they are the fast setting here.
* **Continuous client batching** (``stream W=...``, ``schedule="stream"``):
  W slots per device each train one client one step at a time and take the
  queue's next client when theirs is done, so the only padding left is each
  client's last partial batch: its padding efficiency equals the reference
  loop's (the bound for any per-client schedule: about 0.73 on digits at B=10,
  0.91 on synthetic), so issue 16's 0.95 is out of reach on these workloads.
  On a quiet machine (2026-12-01 01:29, load 0.7) it is 1.16x chunk=5 on
  digits at K=100 (W=10-20), level with chunk=10 on synthetic at K=1000
  (1.05x; 1.8x in a run under load 10-16, where the chunked program suffered
  more), and 0.90-0.92x chunk=5 at digits K=20 and synthetic K=100, where
  chunks of similar clients already pad little. So the default schedule stays
  chunked (the default run is K=20) and ``--config.schedule=stream`` or
  ``auto`` is the choice for large cohorts. Its working set is smaller (XLA MiB
  column): FedAvg's server reads only the mean, so the stream keeps a running
  weighted sum instead of [K, params] uploads. A W-wide step is a batched
  matmul too, so on this CPU a client-step in a slot costs about as much as
  one alone (bench/STREAM.md); the stream's gain is the padding and dispatch it
  removes, not faster steps.
* **Why the gain is small in absolute terms.** One client step of the 2NN at
  B=10 is ~3 MFLOP; at that size XLA:CPU per-op/loop overhead, not FLOPs,
  sets the time, for the reference and for the vectorized round alike (useful
  FLOP/s stay at a few % of the matmul peak). The vectorized round removes the
  Python dispatch per client and amortizes per-op overhead over a chunk, which
  is where its speedup comes from; the loop's cost per client is only a few
  hundred microseconds, so there is little left to remove. Fusing rounds
  (``R`` > 1, ``lax.scan``) removes one host round trip per round: visible at
  K=10 where rounds are short, in the noise at larger K.
* **Noise and load.** The 2 cores are shared with other jobs, so absolute
  rounds/s move by 2x or more between runs; ratios in one table are measured
  interleaved (same rounds, alternating sweeps) and are the figures to quote.
  The ratio itself depends on load: the reference makes one host dispatch per
  client and waits for a core at each, so it degrades more than one fused
  program when the machine is oversubscribed (see the load average in the
  header). The peak matmul rate is measured under the same load, so under
  heavy load it understates the machine and ``% peak`` overstates utilisation.
* **Memory.** RSS is dominated by the resident dataset, the Python/JAX process
  and compiled programs; the XLA column shows the round's own working set,
  which grows with the cohort through the per-client outputs ([K, params] uploads)
  and the cohort's state; each chunk gathers its own clients' data inside the
  chunk loop, so the data part scales with the chunk, not the cohort. The
  stream keeps [K] uploads only for servers that need them
  (``reads_weighted_mean`` servers get a running sum), and flat storage
  (``--config.data.storage=flat``) makes the dataset itself follow the
  examples (bench/SCALE.md)."""


if __name__ == "__main__":
  sys.exit(main())
