"""The simulation loop: run rounds, evaluate, checkpoint with Orbax, log
``metrics.jsonl``, detect divergence, resume, plot.

:func:`simulate` takes an :class:`Experiment` of BUILT objects (algorithm,
sampler, data, mesh and the run config's engine settings); the engine never
imports the algorithm registry, the data pipeline or the launch code. Building
an experiment from a config lives in :mod:`fedjax_sim.launch.experiment`
(``build_experiment``, ``train_and_evaluate``), the one module that knows the
registries.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import evaluation, sampling
from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.checks import check_algorithm
from fedjax_sim.errors import ConfigError, DivergedError
from fedjax_sim.round import init_state, make_round


@dataclasses.dataclass
class Experiment:
  """Everything a simulation runs on (built by ``fedjax_sim.launch.experiment.build_experiment``).

  ``cfg`` holds the engine settings :func:`simulate` reads (seed, rounds,
  eval_every, checkpoint_every, max_checkpoints, rounds_per_call,
  chunk_size, progress, algorithm, client_lr, server_lr).
  """
  cfg: Any
  data: Any  # fedjax_sim.data.FederatedData
  model: Any
  algorithm: FederatedAlgorithm
  sampler: sampling.Sampler
  mesh: Any


def _finite(tree) -> bool:
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return all(np.all(np.isfinite(x)) for x in leaves)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """On device: True when every float in the pytree (server AND client state) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _rounds_per_call(cfg) -> int:
  return math.gcd(cfg.rounds_per_call, cfg.eval_every, cfg.checkpoint_every, cfg.rounds)


def simulate(experiment: Experiment, workdir: str, resume: bool = False) -> dict[str, Any]:
  """Runs a whole simulation and writes its run directory.

  Writes ``workdir/config.json`` (resolved config), ``metrics.jsonl`` (one JSON
  object per evaluation), ``checkpoints/`` (Orbax, every
  ``checkpoint_every`` rounds and at the end) and ``plots.png``.

  Args:
    experiment: the built objects and the run config (:class:`Experiment`).
    workdir: the run directory (created).
    resume: continue from the latest checkpoint; reproduces an uninterrupted
      run exactly (cohorts and client keys depend only on (seed, round)).

  Returns:
    The last evaluation's metrics dict.

  Raises:
    ConfigError: bad settings, or existing checkpoints without ``resume``.
    DivergedError: a non-finite loss or model; the last good checkpoint stays.
    CheckpointError: ``resume`` with no or an unreadable checkpoint.
  """
  exp, cfg = experiment, experiment.cfg
  # Multi-host: every process runs the same program; process 0 writes files.
  main_process = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.max_checkpoints)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not resume and ckpt.latest_round() is not None:
    raise ConfigError(f"{workdir} already holds checkpoints (round {ckpt.latest_round()}); "
                      "pass --resume to continue it or choose another --workdir.")
  if main_process:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))

  mesh = exp.mesh
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, cfg.seed, mesh)
  check_algorithm(exp.algorithm, state, exp.data.train,
                  exp.sampler.clients_per_round if exp.sampler is not None else 2)
  history: list[dict] = []
  if resume:
    state = ckpt.restore(state)
    start = int(state.round)
    if os.path.exists(metrics_path):  # keep only what the checkpoint has seen
      with open(metrics_path) as f:
        history = [r for r in map(json.loads, f) if r["round"] <= start]
    if main_process:
      print(f"Resumed from {ckpt.directory} at round {start}.")
  if main_process:
    with open(metrics_path, "w") as f:
      for r in history:
        f.write(json.dumps(r) + "\n")

  rpc = _rounds_per_call(cfg)
  if resume:  # a checkpoint saved under another cadence: keep calls aligned to it
    rpc = math.gcd(rpc, int(state.round)) or rpc
  round_fn = make_round(exp.algorithm, exp.sampler, seed=cfg.seed, mesh=mesh,
                        chunk_size=cfg.chunk_size or None, rounds_per_call=rpc)
  evaluate = evaluation.make_evaluate(exp.algorithm)
  from fedjax_sim import comm
  comm_counts = comm.round_comm(exp.algorithm, exp.data.train,
                                None if exp.algorithm.pools else exp.sampler.clients_per_round)
  data = exp.data
  num_test = int(data.test_y.shape[0])

  def do_eval(state, round_metrics, wall):
    if exp.algorithm.evaluate is not None:  # the algorithm's own metrics (e.g. SSL)
      row = {"round": int(state.round), **exp.algorithm.evaluate(state.server, state.clients, data)}
    else:
      raw = evaluate(state.server, state.clients, data.test, data.test_x, data.test_y)
      row = {"round": int(state.round), **evaluation.summarize(raw, num_test)}
    row.update({f"train_{k}" if not k.startswith(("server/", "padding", "useful")) else k:
                float(np.mean(v)) for k, v in round_metrics.items()})
    row.update(comm.comm_row(comm_counts, int(state.round)))
    row["wall_s"] = wall
    if main_process:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    history.append(row)
    return row

  progress = _progress(cfg, int(state.round), enabled=main_process)
  t0, train_time = time.time(), 0.0
  row = history[-1] if history else {}
  if not history:  # the initial model, so curves start at round 0
    row = do_eval(state, {}, 0.0)
  pending: list[dict] = []  # per-call training metrics since the last evaluation
  try:
    while int(state.round) < cfg.rounds:
      tc = time.time()
      state, metrics = round_fn(state, data.train)
      metrics = jax.device_get(metrics)
      pending.append(metrics)
      train_time += time.time() - tc
      r = int(state.round)
      if not (_finite(metrics.get("loss", 0.0)) and bool(_all_finite((state.server,
                                                                        state.clients)))):
        bad = r - rpc + int(np.argmax(~np.isfinite(np.asarray(metrics.get("loss", [np.nan])))))
        raise DivergedError(
            f"training diverged: non-finite loss or model by round {bad + 1} (client_lr="
            f"{cfg.client_lr}, server_lr={cfg.server_lr}); lower --config.client_lr or "
            f"--config.server_lr. Last good checkpoint: round {ckpt.latest_round()} in "
            f"{ckpt.directory}.")
      if r % cfg.checkpoint_every == 0 or r == cfg.rounds:
        ckpt.save(r, state)
      if r % cfg.eval_every == 0 or r == cfg.rounds:
        # Training metrics averaged over every round since the last evaluation.
        since = {k: np.concatenate([np.atleast_1d(m[k]) for m in pending if k in m])
                 for k in pending[-1]}
        pending.clear()
        row = do_eval(state, since, time.time() - t0)
        if "test_accuracy" in row:
          progress.set_postfix(acc=f"{row['test_accuracy']:.3f}",
                               loss=f"{row.get('train_loss', 0):.3f}")
      progress.update(rpc)
  finally:
    progress.close()
    ckpt.wait()
    ckpt.close()
  row = dict(row)
  row["train_time_s"] = train_time
  if main_process:
    from fedjax_sim import plotting
    plotting.plot_history(history, os.path.join(workdir, "plots.png"),
                          title=f"{cfg.algorithm} on {data.name}")
  return row


def _progress(cfg, start: int, enabled: bool = True):
  from tqdm.auto import tqdm
  return tqdm(total=cfg.rounds, initial=start, desc=f"{cfg.algorithm}", unit="round",
              disable=not (cfg.progress and enabled), dynamic_ncols=True)
