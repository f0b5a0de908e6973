"""Where a sweep's tasks run: this process, local worker processes, or a SLURM job array.

Every back end runs tasks of the frozen plan (:mod:`fedjax_sim.launch.sweep_plan`) with
:func:`run_task`, which skips finished points, runs a vectorized group as one program (or
falls back to one run per point) and writes each point's ``result.json``.

* In this process: :func:`run_task` for each unfinished task.
* Local processes: :func:`run_local_processes` starts at most N workers
  ``<venv python> -m fedjax_sim.launch.sweep <workdir> <task>`` (logs
  ``<workdir>/sweep/logs/task_<i>.log``).
* SLURM, through `submitit <https://github.com/facebookincubator/submitit>`_:
  :func:`submit_slurm` submits ONE job array (``submitit.SlurmExecutor.map_array``), one
  array index per unfinished task, each running :func:`slurm_task` (the task index is its
  argument); submitit writes the sbatch script, the pickled calls, and each index's log
  (stdout and stderr together) under ``<workdir>/sweep/slurm/``
  (``<job>_submission.sh``, ``<job>_<index>_0_log.out``, ``..._result.pkl``).
  :func:`wait_slurm` waits for every array index with submitit's job state (its result
  pickle, or a final ``sacct`` state) and also stops when the array has left ``squeue``:
  ``sacct`` needs SLURM accounting, which small clusters (and ``.ci/slurm-localhost``) do
  not run, and then an index SLURM killed leaves no trace but that.
  :func:`report_slurm` logs each failed index with its error (the worker's exception,
  which submitit pickles) and log file.

What submitit does not do stays here: resuming (only unfinished tasks are submitted; a
point's ``result.json`` says it finished), the frozen plan the workers read, the squeue
check, cancelling the whole array after ``SlurmOptions.timeout_s``, and sbatch settings
submitit has no parameter for: ``--chdir`` (the submitting directory) and
``SlurmOptions.extra`` (``--slurm_args``, long-form sbatch options) go in through
``additional_parameters``. The task runs directly in the batch script (submitit's
``use_srun=False``), as the hand-written script before it did: an ``srun`` step inside the
allocation does not inherit ``--cpus-per-task`` since Slurm 22.05.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence, Union

from fedjax_sim.errors import ConfigError
from fedjax_sim.launch.sweep_plan import (Point, apply_overrides, load_result, plan_dir,
                                          read_plan, write_result)


# --------------------------------------------------------------------------- running tasks


def _run_single(cfg, workdir: str, p: Point) -> dict:
  from fedjax_sim.checkpoint import Checkpointer
  from fedjax_sim.data import DatasetError, PartitionError
  from fedjax_sim.errors import DivergedError, FedSimError
  from fedjax_sim.launch.experiment import train_and_evaluate
  import json
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
        write_result(workdir, points[i], results[i])
    except vectorized.NotVectorizable as err:
      log(f"not vectorized ({err}); running {len(todo)} points one by one")
  for i in todo:
    if i in results:
      continue
    t = time.time()
    results[i] = _run_single(cfg, workdir, points[i])
    write_result(workdir, points[i], results[i])
    log(f"{points[i].name}: {results[i]['status']} ({time.time() - t:.1f} s)")
  return [results.get(i) or load_result(workdir, points[i]) for i in indices]


def run_planned_task(workdir: str, task: int) -> list[tuple[str, str, str]]:
  """A worker: runs task ``task`` of the plan frozen under ``workdir``, printing progress.

  Returns:
    ``(point name, status, error)`` for each of the task's points: status ``ok``,
    ``diverged``, ``failed``, or ``missing`` when it wrote no result; error the first line
    of the point's error, or "".
  """
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  cfg, points, tasks = read_plan(workdir)
  results = run_task(cfg, workdir, points, tasks[task], log=lambda m: print(m, flush=True))
  return [(points[i].name, r["status"] if r else "missing",
           ((r or {}).get("error") or "").split("\n")[0][:200])
          for i, r in zip(tasks[task], results)]


class TaskFailed(RuntimeError):
  """A SLURM array index ran, but some of its task's points did not finish (see their
  ``result.json``)."""


def slurm_task(workdir: str, task: int) -> list[str]:
  """What each SLURM array index runs (pickled by submitit; ``task`` is its argument).

  Raises:
    TaskFailed: a point failed, so the array index ends FAILED in SLURM (the hand-written
      worker exited 1 then).
  """
  print(f"sweep task {task} of {os.path.abspath(workdir)}", flush=True)
  out = run_planned_task(workdir, task)
  bad = [f"{name}: {status}" + (f" ({error})" if error else "") for name, status, error in out
         if status not in ("ok", "diverged")]
  if bad:
    raise TaskFailed("; ".join(bad))
  return [status for _, status, _ in out]


# --------------------------------------------------------------------------- local processes


def python_executable() -> str:
  """The interpreter workers run with: this one (the repo's .venv), absolute, links kept."""
  return os.path.abspath(sys.executable)


def worker_command(workdir: str, task: str) -> list[str]:
  """``<python> -m fedjax_sim.launch.sweep <workdir> <task>``: a local worker process."""
  return [python_executable(), "-m", "fedjax_sim.launch.sweep", os.path.abspath(workdir), task]


def run_local_processes(workdir: str, tasks: Sequence[int], processes: int, log=print) -> None:
  """Runs the given task indices in at most ``processes`` worker processes at once."""
  logs = os.path.join(plan_dir(workdir), "logs")
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


# --------------------------------------------------------------------------- SLURM (submitit)


@dataclasses.dataclass
class SlurmOptions:
  """sbatch settings of a sweep's job array (``--slurm_*`` flags) and how the driver waits."""
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


def slurm_dir(workdir: str) -> str:
  """``<workdir>/sweep/slurm``: submitit's folder (sbatch scripts, pickles, logs)."""
  return os.path.join(plan_dir(os.path.abspath(workdir)), "slurm")


def slurm_minutes(spec: str) -> int:
  """A SLURM time limit (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in
  whole minutes, seconds rounded up as SLURM does.

  Raises:
    ConfigError: not one of those forms.
  """
  m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec.strip())
  if not m:
    raise ConfigError(f"--slurm_time={spec!r}: expected minutes, M:S, H:M:S or D-H[:M[:S]] "
                      "(e.g. 01:00:00)")
  days, a, b, c = m.groups()
  parts = [int(x) for x in (a, b, c) if x is not None]
  if days is not None:  # D-H, D-H:M, D-H:M:S
    h, mi, s = (parts + [0, 0])[:3]
  else:  # M, M:S, H:M:S
    h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
  return int(days or 0) * 1440 + h * 60 + mi + math.ceil(s / 60)


def sbatch_options(extra: str) -> dict:
  """``--slurm_args`` (``'--account=abc --qos high --exclusive'``) as submitit's
  ``additional_parameters`` (``{"account": "abc", "qos": "high", "exclusive": True}``).

  Raises:
    ConfigError: a short option (``-A abc``) or a stray value; write long options.
  """
  out, toks, i = {}, shlex.split(extra), 0
  while i < len(toks):
    tok = toks[i]
    if not tok.startswith("--") or tok == "--":
      raise ConfigError(f"--slurm_args: {tok!r} is not a long sbatch option; write them as "
                        "--name=value (e.g. --slurm_args='--account=abc --qos=high')")
    name, eq, value = tok[2:].partition("=")
    if not eq and i + 1 < len(toks) and not toks[i + 1].startswith("-"):
      eq, value, i = "=", toks[i + 1], i + 1
    out[name] = value if eq else True
    i += 1
  return out


def slurm_executor(workdir: str, opts: SlurmOptions, n_tasks: int):
  """A ``submitit.SlurmExecutor`` for a sweep's array (folder :func:`slurm_dir`).

  Raises:
    RuntimeError: no ``sbatch`` (or ``srun``) on PATH.  ConfigError: a bad ``--slurm_time``
      or ``--slurm_args``.
  """
  if shutil.which("sbatch") is None:
    raise RuntimeError("sbatch not found: --backend=slurm needs the SLURM client tools on "
                       "PATH (and SLURM_CONF if the cluster is not the default)")
  import submitit
  ex = submitit.SlurmExecutor(folder=slurm_dir(workdir), python=shlex.quote(python_executable()))
  ex.update_parameters(
      job_name="fedjax-sweep", time=slurm_minutes(opts.time), cpus_per_task=opts.cpus,
      partition=opts.partition, gres=f"gpu:{opts.gpus}" if opts.gpus else None, mem=opts.mem,
      array_parallelism=opts.max_parallel or max(n_tasks, 1), wckey=None, use_srun=False,
      stderr_to_stdout=True,
      additional_parameters={"chdir": os.getcwd(), **sbatch_options(opts.extra)})
  return ex


def slurm_script(workdir: str, tasks: Sequence[int], opts: SlurmOptions) -> str:
  """The sbatch script submitit writes for ``tasks`` (what :func:`submit_slurm` submits)."""
  ex = slurm_executor(workdir, opts, len(tasks))
  if len(tasks) > 1:
    ex.parameters["map_count"] = len(tasks)  # as submitit's own array submission does
  return ex._make_submission_file_text(ex._submitit_command_str, "preview")  # noqa: SLF001


def submit_slurm(workdir: str, tasks: Sequence[int], opts: SlurmOptions, log=print) -> list:
  """Submits ONE job array, one index per task (``map_array`` over :func:`slurm_task`).

  Returns:
    The submitit jobs, in ``tasks`` order (job ids ``<array>_<index>``; a single task is a
    plain job).

  Raises:
    RuntimeError: sbatch is missing or refused the job.
  """
  import submitit
  ex = slurm_executor(workdir, opts, len(tasks))
  workdir = os.path.abspath(workdir)
  try:
    jobs = ex.map_array(slurm_task, [workdir] * len(tasks), list(tasks))
  except submitit.core.utils.FailedJobError as err:
    raise RuntimeError(f"sbatch failed: {str(err).strip()}") from None
  array = _array_id(jobs)
  log(f"submitted SLURM array job {array} ({len(tasks)} task(s)): "
      f"{jobs[0].paths.submission_file}")
  return jobs


def _array_id(jobs) -> str:
  return str(jobs[0].job_id).split("_")[0]


def _has_accounting(array: str) -> bool:
  """Whether ``sacct`` answers (SLURM accounting runs), so submitit's job states are real."""
  try:
    out = subprocess.run(["sacct", "-n", "-X", "-j", array, "-o", "JobID"], capture_output=True,
                         text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return out.returncode == 0


UNREACHABLE_S = 120.0  # squeue failing this long: the controller is gone, stop waiting


def _in_squeue(array: str) -> Optional[bool]:
  """Whether the array is still in ``squeue``; None when squeue itself fails (no answer)."""
  out = subprocess.run(["squeue", "-h", "-j", array, "-o", "%i %T"], capture_output=True,
                       text=True)
  if out.returncode != 0 and "Invalid job id" in out.stderr:
    return False
  if out.returncode != 0:
    return None
  return bool(out.stdout.strip())


def wait_slurm(jobs: Union[Sequence, str], poll_s: float = 2.0,
               timeout_s: Optional[float] = None) -> None:
  """Waits until every job is done or the array has left ``squeue``.

  A job is done (submitit's ``Job.done``) when its result pickle exists or, where SLURM
  keeps accounting, ``sacct`` gives a final state; without accounting only the pickle
  counts, and an index SLURM killed (time limit, memory) leaves none, hence the squeue
  check. ``jobs`` may also be a job id (squeue only).

  Raises:
    TimeoutError: still queued or running after ``timeout_s``.
    RuntimeError: ``squeue`` has failed for :data:`UNREACHABLE_S` seconds in a row
      (the SLURM controller is down); the finished points' results stay on disk, and
      running the sweep again resumes the rest.
  """
  jobs, array = ([], jobs) if isinstance(jobs, str) else (list(jobs), _array_id(jobs))
  sacct = bool(jobs) and _has_accounting(array)
  t0, failing_since = time.time(), None
  while True:
    if jobs and all(j.done() if sacct else j.paths.result_pickle.exists() for j in jobs):
      return
    queued = _in_squeue(array)
    if queued is False:
      return
    if queued is None:
      failing_since = failing_since or time.time()
      if time.time() - failing_since > UNREACHABLE_S:
        raise RuntimeError(f"squeue has not answered for {UNREACHABLE_S:.0f} s (is the SLURM "
                           f"controller up? check sinfo); job {array} may still run. Run the "
                           "sweep again to resume the unfinished points.")
    else:
      failing_since = None
    if timeout_s is not None and time.time() - t0 > timeout_s:
      raise TimeoutError(f"SLURM job {array} still queued/running after {timeout_s:.0f} s")
    time.sleep(poll_s)


def cancel_slurm(jobs: Union[Sequence, str]) -> None:
  """``scancel`` of the whole array."""
  subprocess.run(["scancel", jobs if isinstance(jobs, str) else _array_id(jobs)],
                 capture_output=True)


def report_slurm(jobs: Sequence, tasks: Sequence[int], log=print) -> list[int]:
  """Logs every array index that failed (its error, or its SLURM state when it left no
  result) with its log file; returns the failed task indices."""
  failed = []
  sacct = bool(jobs) and _has_accounting(_array_id(jobs))
  if sacct:
    jobs[0].watcher.update()  # one sacct call for every index
  for t, job in zip(tasks, jobs):
    if job.paths.result_pickle.exists():
      err = job.exception()
      if err is None:
        continue
      # submitit's message: a header, the worker's traceback between dashed lines, paths
      parts = str(err).split("-" * 22)
      lines = [s for s in (parts[1] if len(parts) > 2 else str(err)).splitlines() if s.strip()]
      why = lines[-1] if lines else type(err).__name__
    else:
      state = job.watcher.get_state(job.job_id, mode="cache") if sacct else "unknown: no sacct"
      why = f"no result; SLURM state {state}"
    failed.append(t)
    log(f"task {t} failed ({why.strip()}); log: {job.paths.stdout}")
  if failed:
    log(f"{len(failed)} task(s) failed: {failed}")
  return failed
