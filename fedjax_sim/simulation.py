"""The simulation loop: build everything from a config, run rounds, evaluate,
checkpoint with Orbax, log ``metrics.jsonl``, plot, summarize.

Library entry point (the CLI is a thin wrapper): :func:`train_and_evaluate`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import evaluation, models, sampling
from fedjax_sim.algorithm import FederatedAlgorithm
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.checks import check_algorithm
from fedjax_sim.errors import ConfigError, DivergedError
from fedjax_sim.round import init_state, make_mesh, make_round
from jax.sharding import NamedSharding, PartitionSpec as P


def validate_config(cfg) -> None:
  """Checks config values before anything is built.

  Every integer setting (also inside tuples such as ``model_kwargs.hidden``)
  must fit int32 (counts and the seed are int32 on device) and every float
  setting must be finite; then the engine's settings are range-checked, the
  names (algorithm, model, sampler) looked up, and ``model_kwargs`` matched to
  the model's fields. Values that need the data (e.g. ``classes_per_client``
  against the dataset's classes) are checked where the data is built.

  Raises:
    ConfigError: one line naming the setting and the fix.
  """
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)

  def settings(node, prefix=""):  # (dotted key, value); each element of a tuple on its own
    for k, v in node.items():
      if hasattr(v, "items"):
        yield from settings(v, f"{prefix}{k}.")
      elif isinstance(v, (tuple, list)):
        yield from ((f"{prefix}{k}", x) for x in v)
      else:
        yield f"{prefix}{k}", v

  for key, v in settings(cfg):
    if isinstance(v, int) and not isinstance(v, bool):
      need(-2**31 <= v < 2**31, f"{key}={v} does not fit in int32 (|value| < 2**31); set "
           f"--config.{key} to a smaller number.")
    elif isinstance(v, float):
      need(math.isfinite(v), f"{key}={v} must be a finite number; set --config.{key}.")
  need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**31,
       f"seed={cfg.seed!r} must be an integer in [0, 2**31) (it is traced as int32); set "
       "--config.seed (e.g. 0).")
  need(cfg.rounds >= 1, f"rounds={cfg.rounds} must be >= 1; set --config.rounds.")
  need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1; set --config.batch_size "
       "(e.g. 10).")
  need(cfg.local_epochs >= 1 or cfg.local_steps >= 1,
       f"local_epochs={cfg.local_epochs} and local_steps={cfg.local_steps}: one must be >= 1.")
  need(cfg.local_steps >= 0, f"local_steps={cfg.local_steps} must be >= 0 (0 = use epochs).")
  need(cfg.client_lr > 0 and math.isfinite(cfg.client_lr),
       f"client_lr={cfg.client_lr} must be a finite number > 0; set --config.client_lr.")
  need(cfg.server_lr > 0, f"server_lr={cfg.server_lr} must be > 0; set --config.server_lr.")
  need(cfg.data.num_clients >= 1, f"data.num_clients={cfg.data.num_clients} must be >= 1.")
  need(1 <= cfg.clients_per_round <= cfg.data.num_clients,
       f"clients_per_round={cfg.clients_per_round} must be in [1, data.num_clients="
       f"{cfg.data.num_clients}]; lower --config.clients_per_round or raise "
       "--config.data.num_clients.")
  if cfg.data.partition in ("dirichlet", "pra", "quantity_skew"):
    need(cfg.data.alpha > 0, f"data.alpha={cfg.data.alpha} must be > 0 (Dirichlet concentration; "
         "smaller = more skew, e.g. 0.1 or 0.5); set --config.data.alpha.")
  need(cfg.eval_every >= 1, f"eval_every={cfg.eval_every} must be >= 1.")
  need(cfg.checkpoint_every >= 1, f"checkpoint_every={cfg.checkpoint_every} must be >= 1.")
  need(cfg.max_checkpoints >= 1, f"max_checkpoints={cfg.max_checkpoints} must be >= 1 (how many "
       "checkpoints to keep; 0 would keep none, so nothing could resume); set "
       "--config.max_checkpoints.")
  need(cfg.rounds_per_call >= 1, f"rounds_per_call={cfg.rounds_per_call} must be >= 1.")
  need(cfg.chunk_size >= 0, f"chunk_size={cfg.chunk_size} must be >= 0 (0 = no chunking).")
  visible = len(jax.devices())
  need(0 <= cfg.num_devices <= visible,
       f"num_devices={cfg.num_devices} but {visible} device(s) are visible; set "
       f"--config.num_devices to at most {visible} (0 = all visible devices).")
  from fedjax_sim.algorithms import ALGORITHMS, POOLED_ALGORITHMS
  known = sorted(ALGORITHMS) + sorted(POOLED_ALGORITHMS)
  need(cfg.algorithm in known, f"unknown algorithm '{cfg.algorithm}'; set "
       f"--config.algorithm to one of {', '.join(known)}.")
  need(cfg.model in models.MODELS, f"unknown model '{cfg.model}'; set --config.model to one of "
       f"{', '.join(sorted(models.MODELS))}.")
  optimizers = ("sgd", "adam", "yogi", "adagrad")  # fedjax_sim.algorithms.server_optimizer
  need(cfg.get("server_optimizer", "sgd") in optimizers, "unknown server optimizer "
       f"'{cfg.get('server_optimizer')}'; set --config.server_optimizer to one of "
       f"{', '.join(optimizers)}.")
  samplers = ("uniform", "availability", "schedule")  # fedjax_sim.sampling.build_sampler
  need(cfg.get("sampler", "uniform") in samplers, f"unknown sampler '{cfg.get('sampler')}'; set "
       f"--config.sampler to one of {', '.join(samplers)}.")
  if cfg.algorithm not in POOLED_ALGORITHMS:  # model pools build their own models from archs
    fields = [f.name for f in dataclasses.fields(models.MODELS[cfg.model])
              if f.name not in ("parent", "name", "num_classes")]
    kwargs = dict(cfg.get("model_kwargs") or {})
    extra = sorted(set(kwargs) - set(fields))
    need(not extra, f"model_kwargs.{', model_kwargs.'.join(extra)} does not apply to model "
         f"'{cfg.model}' (it takes {', '.join(fields)}); use a config file whose model_kwargs fit "
         "the model (e.g. launch/configs/fedavg_cifar10.py for cnn).")
    for k, v in kwargs.items():  # layer widths and counts
      for x in (v if isinstance(v, (tuple, list)) else (v,)):
        need(isinstance(x, int) and not isinstance(x, bool) and x >= 1,
             f"model_kwargs.{k}={v!r}: every entry must be an integer >= 1 (a layer width or "
             f"count); set --config.model_kwargs.{k} (e.g. (32,)).")


@dataclasses.dataclass
class Experiment:
  """Everything built from a config (see :func:`build_experiment`)."""
  cfg: Any
  data: Any  # fedjax_sim.data.FederatedData
  model: Any
  algorithm: FederatedAlgorithm
  sampler: sampling.Sampler
  mesh: Any


def build_experiment(cfg) -> Experiment:
  """Validates the config and builds data, model, algorithm, sampler and mesh.

  Raises:
    ConfigError, DatasetError, PartitionError: bad settings or missing data.
  """
  validate_config(cfg)
  from fedjax_sim.algorithms import build_algorithm
  from fedjax_sim.data import build_federated_data
  mesh = make_mesh(cfg.num_devices or None)
  data = build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed,
                              sharding=NamedSharding(mesh, P()))
  empty = np.flatnonzero(np.asarray(data.train.num_examples) == 0)
  if empty.size:
    raise ConfigError(f"client {int(empty[0])} has no training data; lower "
                      "--config.data.client_test_fraction or --config.data.num_clients.")
  from fedjax_sim.algorithms import POOLED_ALGORITHMS
  if cfg.algorithm in POOLED_ALGORITHMS:  # model pools: the algorithm builds its models
    from fedjax_sim.algorithms.pooled import DataSpec
    model, sampler = None, None
    algorithm = POOLED_ALGORITHMS[cfg.algorithm](
        cfg, DataSpec(data.input_shape, data.num_classes, data.num_clients))
  else:
    model = models.build_model(cfg.model, data.num_classes, **dict(cfg.model_kwargs))
    apply_fn = lambda params, x: model.apply({"params": params}, x)
    init_params = lambda rng: models.init_params(model, rng, data.input_shape)
    algorithm = build_algorithm(cfg, apply_fn, init_params)
    sampler = sampling.build_sampler(cfg, data.num_clients)
  return Experiment(cfg, data, model, algorithm, sampler, mesh)


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


def train_and_evaluate(cfg, workdir: str, resume: bool = False,
                       experiment: Optional[Experiment] = None) -> dict[str, Any]:
  """Runs a whole simulation and writes its run directory.

  Writes ``workdir/config.json`` (resolved config), ``metrics.jsonl`` (one JSON
  object per evaluation), ``checkpoints/`` (Orbax, every
  ``checkpoint_every`` rounds and at the end) and ``plots.png``.

  Args:
    cfg: the run ConfigDict.
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
  exp = experiment or build_experiment(cfg)
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
