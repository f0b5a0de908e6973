"""``fedjax-sim sweep``: grids over config keys and seeds, resumable, summarized.

  fedjax-sim sweep --config=launch/configs/fedavg_digits.py:smoke \\
      --grid=client_lr=0.05,0.1 --grid=server_lr=0.5,1.0 --seeds=0,1 --workdir=runs/lr_sweep

  fedjax-sim sweep --sweep_file=launch/sweeps/fedprox_mu.py --workdir=runs/mu_sweep

  fedjax-sim sweep ... --backend=slurm --slurm_partition=gpu --slurm_time=01:00:00 --slurm_gpus=1

Points and run directories: every point of the grid (the product of all
``--grid`` axes and ``--seeds``) is a set of config overrides; it runs in
``<workdir>/<key=value,...>/`` (a normal run directory: ``config.json``,
``metrics.jsonl``, ``plots.png``, ``checkpoints/``) and ends with
``result.json``. A point with a ``result.json`` is skipped when the same
command runs again; an interrupted single run resumes from its checkpoint.

Tasks: points that differ only in vectorizable keys (seed and float
hyperparameters; see :mod:`fedjax_sim.launch.vectorized`) form one task run
as ONE compiled program vmapped over the points (``--vectorize``); other
points are one task each.

Back ends: ``local`` runs tasks in this process (``--processes=1``) or in N
worker processes; ``slurm`` writes ``<workdir>/sweep/job.sh`` and submits
ONE ``sbatch --array`` job, one array index per task (per point unless
``--vectorize``), waits for it (polling ``squeue``) and collects.

At the end: ``<workdir>/summary.csv``, ``summary.md`` (one row per point, and
mean and sample std (ddof=1) over seeds) and ``summary_curves.png`` / ``summary_final.png``.

Workers (local processes and SLURM) run
``<venv python> -m fedjax_sim.launch.sweep <workdir> <task>`` and read the
frozen plan ``<workdir>/sweep/plan.pkl`` (the base ConfigDict and the points).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any, Optional, Sequence

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_multi_string(
    "grid", [], "A sweep axis KEY=V1,V2,... over a config key (dotted, e.g. client_lr=0.05,0.1 "
    "or corefed.beta=0.1,0.5); repeat for more axes (their product is swept).")
flags.DEFINE_list("seeds", None, "Seeds to run every grid point with (e.g. 0,1,2); default: the "
                  "config's seed.")
flags.DEFINE_string("sweep_file", None, "Python sweep file whose get_sweep() returns a dict: "
                    "grid {key: [values]}, seeds [..], points [{key: value}] (explicit list), "
                    "overrides {key: value} (applied to every point), config 'file[:arg]'.")
flags.DEFINE_enum("backend", "local", ["local", "slurm"], "Where tasks run.")
flags.DEFINE_integer("processes", 1, "Local back end: worker processes (1 = in this process).")
flags.DEFINE_bool("vectorize", None, "Run points that differ only in numeric hyperparameters "
                  "and seeds as one vmapped program. Default: on for --backend=local, off for "
                  "slurm (one array index per point).")
flags.DEFINE_bool("collect_only", False, "Run nothing: write the summary of the finished points.")
flags.DEFINE_string("metric", "test_accuracy", "Metric for the comparison plots.")
flags.DEFINE_string("slurm_partition", None, "SLURM partition (sbatch --partition).")
flags.DEFINE_string("slurm_time", "01:00:00", "SLURM time limit per array task.")
flags.DEFINE_integer("slurm_gpus", 0, "GPUs per array task (sbatch --gres=gpu:N).")
flags.DEFINE_integer("slurm_cpus", 1, "CPUs per array task (sbatch --cpus-per-task).")
flags.DEFINE_string("slurm_mem", None, "Memory per array task (sbatch --mem, e.g. 8G).")
flags.DEFINE_integer("slurm_max_parallel", 0, "At most this many array tasks at once (0 = no "
                     "limit; sbatch --array=...%N).")
flags.DEFINE_string("slurm_args", "", "Extra sbatch arguments, e.g. '--account=abc --qos=high'.")
flags.DEFINE_bool("slurm_wait", True, "Wait for the array job and collect the summary; "
                  "--noslurm_wait submits and returns (collect later with --collect_only).")

TIMING_KEYS = ("wall_s", "train_time_s")


# --------------------------------------------------------------------------- points


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: a name (its run directory) and its config overrides."""
  name: str
  overrides: dict


def _fmt(v: Any) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def point_name(overrides: dict) -> str:
  """``client_lr=0.05,mu=0.0,seed=1``: the run directory name of a point."""
  name = ",".join(f"{k}={_fmt(v)}" for k, v in overrides.items())
  return name.replace("/", "_").replace(" ", "") or "base"


def get_key(cfg, key: str):
  """Value of a dotted key; raises KeyError naming the key."""
  node = cfg
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise KeyError(f"unknown config key '{key}'") from None
  return node


def coerce(cfg, key: str, value: Any) -> Any:
  """Converts ``value`` (a string from the command line, or a Python value) to the type of
  the config field ``key``."""
  current = get_key(cfg, key)
  if isinstance(value, str) and not isinstance(current, str):
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{key}={value!r}: expected true or false")
      return value.lower() in ("true", "1")
    if isinstance(current, int):
      return int(value)
    if isinstance(current, float):
      return float(value)
    if isinstance(current, (tuple, list)):
      import ast
      return tuple(ast.literal_eval(value))
    if current is None:
      import ast
      try:
        return ast.literal_eval(value)
      except (ValueError, SyntaxError):
        return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def apply_overrides(cfg, overrides: dict):
  """A copy of ``cfg`` with the dotted keys set (types as the config's fields)."""
  out = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") \
      else pickle.loads(pickle.dumps(cfg))
  for key, value in overrides.items():
    parent = out
    *path, last = key.split(".")
    for part in path:
      parent = parent[part]
    parent[last] = coerce(out, key, value)
  return out


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
  """``["client_lr=0.05,0.1", "mu=0,0.01"]`` -> ``{"client_lr": ["0.05", "0.1"], ...}``.

  A value list may also be written with ``;`` or ``|`` separators (for tuple values
  such as ``model_kwargs.hidden=(32,)|(64,64)``).
  """
  axes: dict[str, list[str]] = {}
  for spec in specs:
    if "=" not in spec:
      raise ValueError(f"--grid={spec!r}: expected KEY=V1,V2,...")
    key, vals = spec.split("=", 1)
    sep = "|" if "|" in vals else ";" if ";" in vals else ","
    values = [v.strip() for v in vals.split(sep) if v.strip()]
    if not key.strip() or not values:
      raise ValueError(f"--grid={spec!r}: expected KEY=V1,V2,...")
    axes[key.strip()] = values
  return axes


def make_points(cfg, grid: Optional[dict] = None, seeds: Optional[Sequence] = None,
                points: Optional[Sequence[dict]] = None,
                overrides: Optional[dict] = None) -> list[Point]:
  """The sweep's points: ``points`` (explicit) or the product of ``grid``, each with every seed.

  Values are converted to the config fields' types, so ``mu=0`` is the float 0.0.

  Raises:
    KeyError: a key that is not in the config.  ValueError: a bad value.
  """
  base = dict(overrides or {})
  if points:
    combos = [dict(p) for p in points]
  else:
    grid = grid or {}
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*[grid[k] for k in keys])]
  out, seen = [], set()
  seed_list = [int(s) for s in seeds] if seeds else [None]
  for combo in combos:
    for s in seed_list:
      ov = {k: coerce(cfg, k, v) for k, v in combo.items()}
      if s is not None:
        ov["seed"] = s
      name = point_name(ov)
      if name in seen:
        raise ValueError(f"point {name} appears twice in the sweep")
      seen.add(name)
      out.append(Point(name, {**{k: coerce(cfg, k, v) for k, v in base.items()}, **ov}))
  return out


def load_sweep_file(path: str) -> dict:
  """Imports a sweep file and returns its ``get_sweep()`` dict."""
  spec = importlib.util.spec_from_file_location("fedjax_sim_sweep_file", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"sweep file {path} not found")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_sweep"):
    raise ValueError(f"sweep file {path} has no get_sweep()")
  sweep = mod.get_sweep()
  unknown = set(sweep) - {"grid", "seeds", "points", "overrides", "config"}
  if unknown:
    raise ValueError(f"sweep file {path}: unknown entries {sorted(unknown)} (expected grid, "
                     "seeds, points, overrides, config)")
  return sweep


def load_config(spec: str, relative_to: Optional[str] = None):
  """``file.py[:arg]`` (a path, or a shipped config name such as ``fedavg_digits``; a
  relative path is also looked up next to ``relative_to``) -> its ``get_config(arg)``."""
  from fedjax_sim.launch import configs
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    for cand in ([os.path.join(relative_to, path)] if relative_to else []) + [
        configs.path(path.removesuffix(".py"))]:
      if os.path.exists(cand):
        path = cand
        break
    else:
      shipped = sorted(f[:-3] for f in os.listdir(configs.CONFIG_DIR)
                       if f.endswith(".py") and f not in ("__init__.py", "base.py"))
      raise FileNotFoundError(f"config {spec!r} not found (a path, or one of "
                              f"{', '.join(shipped)})")
  modspec = importlib.util.spec_from_file_location("fedjax_sim_sweep_config", path)
  mod = importlib.util.module_from_spec(modspec)
  modspec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


# --------------------------------------------------------------------------- tasks


def plan_tasks(cfg, points: Sequence[Point], vectorize: bool) -> list[list[int]]:
  """Groups point indices into tasks: with ``vectorize``, points whose overrides differ
  only in vectorizable keys share a task."""
  from fedjax_sim.launch.vectorized import is_vectorizable_key
  if not vectorize:
    return [[i] for i in range(len(points))]
  groups: dict[Any, list[int]] = {}
  for i, p in enumerate(points):
    fixed = tuple(sorted((k, repr(v)) for k, v in p.overrides.items()
                         if not is_vectorizable_key(k, get_key(cfg, k))))
    groups.setdefault(fixed, []).append(i)
  return list(groups.values())


def _result_path(workdir: str, p: Point) -> str:
  return os.path.join(workdir, p.name, "result.json")


def load_result(workdir: str, p: Point) -> Optional[dict]:
  """A point's result if it finished (ok or diverged) with the same overrides."""
  path = _result_path(workdir, p)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    res = json.load(f)
  if res.get("status") not in ("ok", "diverged") or res.get("overrides") != _jsonable(p.overrides):
    return None
  return res


def _jsonable(x):
  return json.loads(json.dumps(x, default=list))


def _write_result(workdir: str, p: Point, res: dict) -> None:
  path = _result_path(workdir, p)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"point": p.name, "overrides": _jsonable(p.overrides), **res}, f, indent=2)
  os.replace(tmp, path)


def _run_single(cfg, workdir: str, p: Point) -> dict:
  from fedjax_sim.checkpoint import Checkpointer
  from fedjax_sim.data import DatasetError, PartitionError
  from fedjax_sim.errors import DivergedError, FedSimError
  from fedjax_sim.launch.experiment import train_and_evaluate
  run_dir = os.path.join(workdir, p.name)
  ck = os.path.join(run_dir, "checkpoints")
  resume = False
  if os.path.isdir(ck) and os.listdir(ck):
    c = Checkpointer(ck)
    resume = c.latest_round() is not None
    c.close()
  pcfg = apply_overrides(cfg, p.overrides)
  try:
    row = train_and_evaluate(pcfg, run_dir, resume=resume)
    return {"status": "ok", "mode": "single", "metrics": row, "error": None}
  except DivergedError as err:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return {"status": "diverged", "mode": "single", "metrics": rows[-1] if rows else {},
            "error": str(err)}
  except (FedSimError, DatasetError, PartitionError, ValueError) as err:
    return {"status": "failed", "mode": "single", "metrics": {}, "error": str(err)}


def run_task(cfg, workdir: str, points: Sequence[Point], indices: Sequence[int],
             log=print) -> list[dict]:
  """Runs one task (a vectorized group or a single point), skipping finished points.

  Writes each point's ``result.json``; returns the results in ``indices`` order.
  """
  todo = [i for i in indices if load_result(workdir, points[i]) is None]
  results = {}
  if len(todo) > 1:
    from fedjax_sim.launch import vectorized
    keys = sorted({k for i in todo for k in points[i].overrides
                   if len({repr(points[j].overrides.get(k)) for j in todo}) > 1})
    cfgs = [apply_overrides(cfg, points[i].overrides) for i in todo]
    try:
      t = time.time()
      outs = vectorized.run_group(cfgs, [os.path.join(workdir, points[i].name) for i in todo],
                                  keys)
      log(f"vectorized {len(todo)} points over {', '.join(keys) or 'nothing'} in one program "
          f"({time.time() - t:.1f} s)")
      for i, out in zip(todo, outs):
        results[i] = {**out, "mode": f"vectorized[{len(todo)}]"}
        _write_result(workdir, points[i], results[i])
    except vectorized.NotVectorizable as err:
      log(f"not vectorized ({err}); running {len(todo)} points one by one")
  for i in todo:
    if i in results:
      continue
    t = time.time()
    results[i] = _run_single(cfg, workdir, points[i])
    _write_result(workdir, points[i], results[i])
    log(f"{points[i].name}: {results[i]['status']} ({time.time() - t:.1f} s)")
  return [results.get(i) or load_result(workdir, points[i]) for i in indices]


# --------------------------------------------------------------------------- back ends


@dataclasses.dataclass
class SlurmOptions:
  partition: Optional[str] = None
  time: str = "01:00:00"
  gpus: int = 0
  cpus: int = 1
  mem: Optional[str] = None
  max_parallel: int = 0
  extra: str = ""
  wait: bool = True
  poll_s: float = 2.0
  timeout_s: Optional[float] = None  # cancel the job (scancel) after this long


def _plan_dir(workdir: str) -> str:
  return os.path.join(workdir, "sweep")


def write_plan(cfg, workdir: str, points: Sequence[Point], tasks: Sequence[Sequence[int]]):
  d = _plan_dir(workdir)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "plan.pkl"), "wb") as f:
    # Plain dicts, not Point objects: the worker runs this module as __main__.
    pickle.dump({"config": cfg, "points": [dataclasses.asdict(p) for p in points],
                 "tasks": [list(t) for t in tasks]}, f)
  with open(os.path.join(d, "plan.json"), "w") as f:
    json.dump({"points": [{"name": p.name, "overrides": _jsonable(p.overrides)} for p in points],
               "tasks": [list(t) for t in tasks]}, f, indent=2)


def python_executable() -> str:
  """The interpreter workers run with: this one (the repo's .venv), absolute, links kept."""
  return os.path.abspath(sys.executable)


def worker_command(workdir: str, task: str) -> list[str]:
  return [python_executable(), "-m", "fedjax_sim.launch.sweep", os.path.abspath(workdir), task]


def run_local_processes(workdir: str, tasks: Sequence[int], processes: int, log=print) -> None:
  """Runs the given task indices in at most ``processes`` worker processes at once."""
  logs = os.path.join(_plan_dir(workdir), "logs")
  os.makedirs(logs, exist_ok=True)
  pending, running, failed = list(tasks), [], []
  while pending or running:
    while pending and len(running) < processes:
      t = pending.pop(0)
      f = open(os.path.join(logs, f"task_{t}.log"), "w")
      running.append((t, f, subprocess.Popen(worker_command(workdir, str(t)), stdout=f,
                                             stderr=subprocess.STDOUT)))
    time.sleep(0.2)
    for item in list(running):
      t, f, proc = item
      if proc.poll() is not None:
        f.close()
        running.remove(item)
        if proc.returncode:
          failed.append(t)
          log(f"task {t} failed (exit {proc.returncode}); log: {f.name}")
  if failed:
    log(f"{len(failed)} task(s) failed: {failed}")


def slurm_script(workdir: str, tasks: Sequence[int], opts: SlurmOptions) -> str:
  """The ``sbatch`` job script: one array index per task."""
  workdir = os.path.abspath(workdir)
  logs = os.path.join(_plan_dir(workdir), "logs")
  array = ",".join(map(str, tasks)) + (f"%{opts.max_parallel}" if opts.max_parallel else "")
  lines = ["#!/bin/bash", "#SBATCH --job-name=fedjax-sweep", f"#SBATCH --array={array}",
           f"#SBATCH --output={logs}/slurm_%A_%a.log", f"#SBATCH --time={opts.time}",
           f"#SBATCH --cpus-per-task={opts.cpus}", f"#SBATCH --chdir={os.getcwd()}"]
  if opts.partition:
    lines.append(f"#SBATCH --partition={opts.partition}")
  if opts.gpus:
    lines.append(f"#SBATCH --gres=gpu:{opts.gpus}")
  if opts.mem:
    lines.append(f"#SBATCH --mem={opts.mem}")
  cmd = " ".join(shlex.quote(a) for a in worker_command(workdir, "PLACEHOLDER"))
  lines += ["set -eu", cmd.replace("PLACEHOLDER", '"$SLURM_ARRAY_TASK_ID"')]
  return "\n".join(lines) + "\n"


def submit_slurm(workdir: str, tasks: Sequence[int], opts: SlurmOptions, log=print) -> str:
  """Writes ``job.sh``, submits it with ``sbatch --parsable``; returns the job id."""
  os.makedirs(os.path.join(_plan_dir(workdir), "logs"), exist_ok=True)
  script = os.path.join(_plan_dir(workdir), "job.sh")
  with open(script, "w") as f:
    f.write(slurm_script(workdir, tasks, opts))
  cmd = ["sbatch", "--parsable", *shlex.split(opts.extra), script]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  except FileNotFoundError:
    raise RuntimeError("sbatch not found: --backend=slurm needs the SLURM client tools on "
                       "PATH (and SLURM_CONF if the cluster is not the default)") from None
  except subprocess.CalledProcessError as err:
    raise RuntimeError(f"sbatch failed: {err.stderr.strip()}") from None
  job = out.stdout.strip().split(";")[0]
  log(f"submitted SLURM array job {job} ({len(tasks)} task(s)): {script}")
  return job


def wait_slurm(job: str, poll_s: float = 2.0, timeout_s: Optional[float] = None) -> None:
  """Polls ``squeue`` until the job has left the queue."""
  t0 = time.time()
  while True:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True,
                         text=True)
    if out.returncode == 0 and not out.stdout.strip():
      return
    if out.returncode != 0 and "Invalid job id" in out.stderr:
      return
    if timeout_s is not None and time.time() - t0 > timeout_s:
      raise TimeoutError(f"SLURM job {job} still queued/running after {timeout_s:.0f} s")
    time.sleep(poll_s)


# --------------------------------------------------------------------------- summary


def collect(workdir: str, points: Sequence[Point]) -> list[dict]:
  """One summary row per point: its overrides, status and final metrics."""
  rows = []
  for p in points:
    res = None
    if os.path.exists(_result_path(workdir, p)):
      with open(_result_path(workdir, p)) as f:
        res = json.load(f)
    row = {"point": p.name, **p.overrides}
    if res is None:
      row["status"] = "missing"
    else:
      row.update(status=res["status"], mode=res.get("mode", ""),
                 **{k: v for k, v in res.get("metrics", {}).items()})
      if res.get("error"):
        row["error"] = res["error"].splitlines()[0][:200]
    rows.append(row)
  return rows


def _seed_groups(points: Sequence[Point], rows: Sequence[dict]):
  groups: dict[str, list[dict]] = {}
  for p, r in zip(points, rows):
    key = point_name({k: v for k, v in p.overrides.items() if k != "seed"})
    groups.setdefault(key, []).append(r)
  return groups


def _cell(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


MD_METRICS = ("round", "test_accuracy", "test_loss", "client_acc_mean", "client_acc_worst10",
              "train_loss", "train_time_s")


def write_summary(workdir: str, points: Sequence[Point], rows: Sequence[dict],
                  metric: str = "test_accuracy") -> dict[str, str]:
  """Writes summary.csv, summary.md and the comparison plots; returns their paths."""
  import numpy as np
  from fedjax_sim.metrics import sample_std
  swept = list(dict.fromkeys(k for p in points for k in p.overrides))
  fixed = ["point", *swept, "status", "mode"]
  metric_keys = sorted({k for r in rows for k in r} - set(fixed) - {"error"})
  cols = fixed + metric_keys + ["error"]
  paths = {"csv": os.path.join(workdir, "summary.csv"), "md": os.path.join(workdir, "summary.md")}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in cols})

  md_metrics = [m for m in MD_METRICS if any(m in r for r in rows)]
  if metric not in md_metrics and any(metric in r for r in rows):
    md_metrics.insert(1, metric)
  lines = [f"# Sweep summary ({len(points)} points)", "",
           f"Run directories under `{os.path.abspath(workdir)}`.", "",
           "| " + " | ".join([*swept, "status", *md_metrics]) + " |",
           "|" + "---|" * (len(swept) + 1 + len(md_metrics))]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in [*swept, "status", *md_metrics])
                 + " |")
  groups = _seed_groups(points, rows)
  if "seed" in swept and any(len(g) > 1 for g in groups.values()):
    stats = [m for m in md_metrics if m not in ("round", "train_time_s")]
    lines += ["", "## Mean ± sample std (ddof=1) over seeds", "",
              "| config | seeds | " + " | ".join(stats) + " |",
              "|---|---|" + "---|" * len(stats)]
    for name, rs in groups.items():
      cells = []
      for m in stats:
        vals = np.array([r[m] for r in rs if r.get("status") == "ok" and m in r], float)
        cells.append(f"{vals.mean():.4g} ± {sample_std(vals):.2g}" if vals.size else "")
      lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  try:
    paths.update(_plots(workdir, points, rows, metric))
  except Exception as err:  # plots are a convenience; never lose the tables over them
    print(f"sweep: comparison plots failed ({type(err).__name__}: {err})", file=sys.stderr)
  return paths


def _plots(workdir, points, rows, metric) -> dict[str, str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from fedjax_sim.metrics import sample_std
  out = {}
  groups = _seed_groups(points, [dict(r, _dir=os.path.join(workdir, p.name))
                                 for p, r in zip(points, rows)])
  # Curves: metric against round, mean over seeds, one line per config.
  fig, ax = plt.subplots(figsize=(8, 5))
  for name, rs in groups.items():
    curves = []
    for r in rs:
      path = os.path.join(r["_dir"], "metrics.jsonl")
      if os.path.exists(path):
        with open(path) as f:
          hist = [json.loads(line) for line in f if line.strip()]
        curves.append({h["round"]: h.get(metric) for h in hist if h.get(metric) is not None})
    if not curves:
      continue
    rounds = sorted(set.intersection(*[set(c) for c in curves]))
    if rounds:
      mean = [np.mean([c[t] for c in curves]) for t in rounds]
      ax.plot(rounds, mean, label=name if len(groups) <= 20 else None)
  ax.set(xlabel="round", ylabel=metric, title=f"{metric} (mean over seeds)")
  ax.grid(alpha=0.3)
  if len(groups) <= 20:
    ax.legend(fontsize=7)
  fig.tight_layout()
  out["curves"] = os.path.join(workdir, "summary_curves.png")
  fig.savefig(out["curves"], dpi=100)
  plt.close(fig)

  # Final metric against the first numeric swept key, one line per other config.
  swept = [k for k in dict.fromkeys(k for p in points for k in p.overrides) if k != "seed"]
  numeric = [k for k in swept if all(isinstance(p.overrides.get(k), (int, float))
                                     and not isinstance(p.overrides.get(k), bool)
                                     for p in points)]
  fig, ax = plt.subplots(figsize=(8, 5))
  if numeric:
    x_key = numeric[0]
    lines: dict[str, dict[float, list]] = {}
    for p, r in zip(points, rows):
      if r.get("status") != "ok" or metric not in r:
        continue
      rest = point_name({k: v for k, v in p.overrides.items() if k not in (x_key, "seed")})
      lines.setdefault(rest, {}).setdefault(float(p.overrides[x_key]), []).append(r[metric])
    for rest, pts in lines.items():
      xs = sorted(pts)
      ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[sample_std(pts[x]) for x in xs],
                  marker="o", capsize=3, label=rest if rest != "base" else None)
    xs_all = [float(p.overrides[x_key]) for p in points]
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
      ax.set_xscale("log")
    ax.set(xlabel=x_key)
    if len(lines) > 1 and len(lines) <= 20:
      ax.legend(fontsize=7)
  else:
    names = list(groups)
    vals = [[r[metric] for r in groups[n] if r.get("status") == "ok" and metric in r]
            for n in names]
    ax.bar(range(len(names)), [np.mean(v) if v else np.nan for v in vals],
           yerr=[sample_std(v) if v else 0 for v in vals], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
  ax.set(ylabel=f"final {metric}", title=f"final {metric} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out["final"] = os.path.join(workdir, "summary_final.png")
  fig.savefig(out["final"], dpi=100)
  plt.close(fig)
  return out


# --------------------------------------------------------------------------- driver


def run_sweep(cfg, points: Sequence[Point], workdir: str, *, backend: str = "local",
              processes: int = 1, vectorize: Optional[bool] = None,
              slurm: Optional[SlurmOptions] = None, collect_only: bool = False,
              metric: str = "test_accuracy", log=print) -> list[dict]:
  """Runs (or resumes) a sweep and writes its summary; returns one row per point.

  Args:
    cfg: the base ConfigDict (every point overrides some of its keys).
    points: from :func:`make_points`.
    workdir: the sweep directory (one run directory per point under it).
    backend: ``local`` or ``slurm``.
    processes: local worker processes (1 = this process).
    vectorize: share one compiled program between points that differ only in
      numeric hyperparameters and seeds (default: True locally, False on SLURM).
    slurm: SLURM options (partition, time, GPUs, ...).
    collect_only: run nothing, only summarize.
  """
  if backend not in ("local", "slurm"):
    raise ValueError(f"unknown backend {backend!r}; use local or slurm")
  if vectorize is None:
    vectorize = backend == "local"
  os.makedirs(workdir, exist_ok=True)
  tasks = plan_tasks(cfg, points, vectorize)
  done = [all(load_result(workdir, points[i]) for i in t) for t in tasks]
  todo = [k for k, d in enumerate(done) if not d]
  n_done = sum(load_result(workdir, p) is not None for p in points)
  log(f"sweep: {len(points)} points in {len(tasks)} task(s); {n_done} point(s) already "
      f"finished, {len(todo)} task(s) to run ({backend}) -> {os.path.abspath(workdir)}")
  if todo and not collect_only:
    write_plan(cfg, workdir, points, tasks)
    if backend == "slurm":
      opts = slurm or SlurmOptions()
      job = submit_slurm(workdir, todo, opts, log)
      if not opts.wait:
        log(f"not waiting; when job {job} is done, run the same command with --collect_only")
        return collect(workdir, points)
      try:
        wait_slurm(job, opts.poll_s, opts.timeout_s)
      except TimeoutError:
        subprocess.run(["scancel", job], capture_output=True)
        raise
      log(f"SLURM job {job} finished")
    elif processes > 1:
      run_local_processes(workdir, todo, processes, log)
    else:
      for k in todo:
        run_task(cfg, workdir, points, tasks[k], log)
  rows = collect(workdir, points)
  paths = write_summary(workdir, points, rows, metric)
  bad = [r["point"] for r in rows if r["status"] not in ("ok",)]
  log(f"sweep: {len(rows) - len(bad)}/{len(rows)} points ok; summary: {paths['md']}, "
      f"{paths['csv']}" + (f"; not ok: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
                           if bad else ""))
  return rows


def main(flags_) -> int:
  """``fedjax-sim sweep`` (called by launch/main.py with the parsed FLAGS)."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  cfg = flags_.config
  grid: dict = {}
  seeds = None
  points = None
  if flags_.sweep_file:
    try:
      sweep = load_sweep_file(flags_.sweep_file)
      if sweep.get("config") and not flags_["config"].present:
        cfg = load_config(sweep["config"], os.path.dirname(os.path.abspath(flags_.sweep_file)))
      # the sweep file's overrides, then the command line's --config.<key> (which win)
      from ml_collections import config_flags
      cfg = apply_overrides(cfg, dict(sweep.get("overrides") or {}))
      cfg = apply_overrides(cfg, config_flags.get_override_values(flags_["config"]))
    except (FileNotFoundError, KeyError, ValueError) as err:
      print(f"fedjax-sim sweep: error: {err}", file=sys.stderr)
      return 2
    grid.update(sweep.get("grid") or {})
    seeds = sweep.get("seeds")
    points = sweep.get("points")
  if flags_.seeds:
    seeds = flags_.seeds
  if points and flags_.grid:
    print("fedjax-sim sweep: error: a sweep file with explicit points cannot take --grid",
          file=sys.stderr)
    return 2
  try:
    grid.update(parse_grid(flags_.grid))
    pts = make_points(cfg, grid, seeds, points)
  except (KeyError, ValueError) as err:
    print(f"fedjax-sim sweep: error: {err.args[0] if err.args else err}", file=sys.stderr)
    return 2
  workdir = flags_.workdir or os.path.join("runs", f"sweep_{time.strftime('%Y%m%d-%H%M%S')}")
  opts = SlurmOptions(flags_.slurm_partition, flags_.slurm_time, flags_.slurm_gpus,
                      flags_.slurm_cpus, flags_.slurm_mem, flags_.slurm_max_parallel,
                      flags_.slurm_args, flags_.slurm_wait)
  try:
    rows = run_sweep(cfg, pts, workdir, backend=flags_.backend, processes=flags_.processes,
                     vectorize=flags_.vectorize, slurm=opts, collect_only=flags_.collect_only,
                     metric=flags_.metric)
  except RuntimeError as err:
    print(f"fedjax-sim sweep: error: {err}", file=sys.stderr)
    return 1
  return 0 if all(r["status"] in ("ok", "diverged") for r in rows) else 1


def worker_main(argv: Sequence[str]) -> int:
  """``python -m fedjax_sim.launch.sweep WORKDIR TASK``: runs one task of a written plan."""
  if len(argv) != 3:
    print("usage: python -m fedjax_sim.launch.sweep WORKDIR TASK_INDEX", file=sys.stderr)
    return 2
  workdir, task = argv[1], int(argv[2])
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  with open(os.path.join(_plan_dir(workdir), "plan.pkl"), "rb") as f:
    plan = pickle.load(f)
  try:
    points = [Point(**p) for p in plan["points"]]
    results = run_task(plan["config"], workdir, points, plan["tasks"][task],
                       log=lambda m: print(m, flush=True))
  except Exception:  # the log keeps the traceback; the summary says "missing"
    traceback.print_exc()
    return 1
  return 0 if all(r and r["status"] in ("ok", "diverged") for r in results) else 1


if __name__ == "__main__":
  sys.exit(worker_main(sys.argv))
