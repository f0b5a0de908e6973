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
worker processes; ``slurm`` submits ONE job array through submitit, one array
index per task (per point unless ``--vectorize``), waits for it and collects
(sbatch script, pickles and logs under ``<workdir>/sweep/slurm/``).

At the end: ``<workdir>/summary.csv``, ``summary.md`` (one row per point, and
mean and sample std (ddof=1) over seeds) and ``summary_curves.png`` / ``summary_final.png``.
summary.md's metric columns: the standard ones, then any other numeric final
metric a method logs (e.g. delta_pct), or ``--summary_metrics``.

Workers (local processes and SLURM) read the frozen plan
``<workdir>/sweep/plan.pkl`` (the base ConfigDict and the points); a local
worker is ``<venv python> -m fedjax_sim.launch.sweep <workdir> <task>``.

Modules: this one (flags, :func:`run_sweep`, the CLI and the worker entry, and
every public name of the ones below), :mod:`fedjax_sim.launch.sweep_plan`
(points, tasks, plan and results on disk), :mod:`fedjax_sim.launch.sweep_backends`
(running tasks: in process, local processes, SLURM via submitit) and
:mod:`fedjax_sim.launch.sweep_summary` (summary tables and plots).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Optional, Sequence

from absl import flags

from fedjax_sim.launch.sweep_backends import (  # noqa: F401  (public names of the sweep)
    SlurmOptions, TaskFailed, cancel_slurm, python_executable, report_slurm, run_local_processes,
    run_planned_task, run_task, slurm_script, slurm_task, submit_slurm, wait_slurm,
    worker_command)
from fedjax_sim.launch.sweep_plan import (  # noqa: F401
    Point, apply_overrides, coerce, get_key, load_config, load_result, load_sweep_file,
    make_points, parse_grid, plan_dir, plan_tasks, point_name, read_plan, write_plan)
from fedjax_sim.launch.sweep_summary import (  # noqa: F401
    MD_METRICS, MD_SKIP, TIMING_KEYS, collect, summary_metrics, write_summary)

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
flags.DEFINE_list("summary_metrics", None, "Metric columns of summary.md (e.g. "
                  "test_accuracy,delta_pct). Default: the standard ones the runs log, then every "
                  "other numeric final metric a method defines (summary.csv has all of them).")
flags.DEFINE_string("slurm_partition", None, "SLURM partition (sbatch --partition).")
flags.DEFINE_string("slurm_time", "01:00:00", "SLURM time limit per array task.")
flags.DEFINE_integer("slurm_gpus", 0, "GPUs per array task (sbatch --gres=gpu:N).")
flags.DEFINE_integer("slurm_cpus", 1, "CPUs per array task (sbatch --cpus-per-task).")
flags.DEFINE_string("slurm_mem", None, "Memory per array task (sbatch --mem, e.g. 8G).")
flags.DEFINE_integer("slurm_max_parallel", 0, "At most this many array tasks at once (0 = no "
                     "limit; sbatch --array=...%N).")
flags.DEFINE_string("slurm_args", "", "Extra sbatch options in long form, e.g. "
                    "'--account=abc --qos=high'.")
flags.DEFINE_bool("slurm_wait", True, "Wait for the array job and collect the summary; "
                  "--noslurm_wait submits and returns (collect later with --collect_only).")


def run_sweep(cfg, points: Sequence[Point], workdir: str, *, backend: str = "local",
              processes: int = 1, vectorize: Optional[bool] = None,
              slurm: Optional[SlurmOptions] = None, collect_only: bool = False,
              metric: str = "test_accuracy", summary_metrics: Optional[Sequence[str]] = None,
              log=print) -> list[dict]:
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
    metric: the comparison plots' metric.
    summary_metrics: summary.md's metric columns (default: see
      :func:`fedjax_sim.launch.sweep_summary.summary_metrics`).

  Raises:
    ValueError: an unknown back end.  RuntimeError: SLURM's sbatch is missing or refused
    the job.  TimeoutError: the SLURM job outlived ``slurm.timeout_s`` (it is cancelled).
    ConfigError: a bad ``slurm.time`` or ``slurm.extra``.
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
      jobs = submit_slurm(workdir, todo, opts, log)
      job = str(jobs[0].job_id).split("_")[0]
      if not opts.wait:
        log(f"not waiting; when job {job} is done, run the same command with --collect_only")
        return collect(workdir, points)
      try:
        wait_slurm(jobs, opts.poll_s, opts.timeout_s)
      except TimeoutError:
        cancel_slurm(jobs)
        raise
      log(f"SLURM job {job} finished")
      report_slurm(jobs, todo, log)
    elif processes > 1:
      run_local_processes(workdir, todo, processes, log)
    else:
      for k in todo:
        run_task(cfg, workdir, points, tasks[k], log)
  rows = collect(workdir, points)
  paths = write_summary(workdir, points, rows, metric, summary_metrics)
  bad = [r["point"] for r in rows if r["status"] not in ("ok",)]
  log(f"sweep: {len(rows) - len(bad)}/{len(rows)} points ok; summary: {paths['md']}, "
      f"{paths['csv']}" + (f"; not ok: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
                           if bad else ""))
  return rows


def main(flags_) -> int:
  """``fedjax-sim sweep`` (called by launch/main.py with the parsed FLAGS)."""
  from absl import logging
  from fedjax_sim.errors import ConfigError
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
                     metric=flags_.metric, summary_metrics=flags_.summary_metrics)
  except ConfigError as err:
    print(f"fedjax-sim sweep: error: {err}", file=sys.stderr)
    return 2
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
  try:
    out = run_planned_task(workdir, task)
  except Exception:  # the log keeps the traceback; the summary says "missing"
    traceback.print_exc()
    return 1
  return 0 if all(status in ("ok", "diverged") for _, status, _ in out) else 1


if __name__ == "__main__":
  sys.exit(worker_main(sys.argv))
