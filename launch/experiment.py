"""Building an experiment from a run config: the one module that knows the registries.

The engine (``fedjax_sim/``) takes built objects and imports none of
``algorithms/``, ``data/`` or ``launch/``; this module turns a config into
them: :func:`validate_config` checks the values, :func:`build_experiment`
builds the data (``fedjax_sim.data``), the model (``fedjax_sim.models``), the
algorithm (the registries in ``fedjax_sim.algorithms``), the sampler and the
mesh, and :func:`train_and_evaluate` runs the engine's loop
(:func:`fedjax_sim.simulation.simulate`) on them. The CLI, the sweeps, the
experiment drivers and the tests build through here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sim import models, sampling
from fedjax_sim.algorithms import ALGORITHMS, POOLED_ALGORITHMS, build_algorithm
from fedjax_sim.algorithms.pooled import DataSpec
from fedjax_sim.data import build_federated_data
from fedjax_sim.errors import ConfigError
from fedjax_sim.round import make_mesh
from fedjax_sim.simulation import Experiment, simulate

__all__ = ["Experiment", "build_experiment", "train_and_evaluate", "validate_config"]


def validate_config(cfg) -> None:
  """Checks config values before anything is built.

  Every integer setting (also inside tuples such as ``model_kwargs.hidden``)
  must fit int32 (counts and the seed are int32 on device) and every float
  setting must be finite; then the engine's settings are range-checked, the
  names (algorithm, model, sampler) looked up, and ``model_kwargs`` matched to
  the model's fields. The data knobs (``alpha``, ``classes_per_client``, ...)
  are checked by the dataset and partitioner functions that read them, when
  the data is built (``fedjax_sim.data``: each names ``--config.data.<knob>``).

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


def build_experiment(cfg) -> Experiment:
  """Validates the config and builds data, model, algorithm, sampler and mesh.

  Raises:
    ConfigError, DatasetError, PartitionError: bad settings or missing data.
  """
  validate_config(cfg)
  mesh = make_mesh(cfg.num_devices or None)
  data = build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed,
                              sharding=NamedSharding(mesh, P()))
  empty = np.flatnonzero(np.asarray(data.train.num_examples) == 0)
  if empty.size:
    raise ConfigError(f"client {int(empty[0])} has no training data; lower "
                      "--config.data.client_test_fraction or --config.data.num_clients.")
  if cfg.algorithm in POOLED_ALGORITHMS:  # model pools: the algorithm builds its models
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


def train_and_evaluate(cfg, workdir: str, resume: bool = False,
                       experiment: Optional[Experiment] = None) -> dict[str, Any]:
  """Builds the experiment of ``cfg`` (unless given) and runs it: :func:`fedjax_sim.simulation.simulate`.

  Args:
    cfg: the run ConfigDict.
    workdir: the run directory (created).
    resume: continue from the latest checkpoint (exact, see ``simulate``).
    experiment: an already built experiment of ``cfg``.

  Returns:
    The last evaluation's metrics dict.

  Raises:
    ConfigError, DatasetError, PartitionError: bad settings or missing data.
    DivergedError, CheckpointError: see :func:`fedjax_sim.simulation.simulate`.
  """
  return simulate(experiment if experiment is not None else build_experiment(cfg), workdir,
                  resume)
