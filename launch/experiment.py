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

import ml_collections

from fedjax_sim import dp, models, privacy, sampling
from fedjax_sim.algorithms import registry
from fedjax_sim.algorithms.registry import ALGORITHMS, BuildContext, DataSpec
from fedjax_sim.data import build_federated_data
from fedjax_sim.data import registry as data_registry
from fedjax_sim.errors import ConfigError
from fedjax_sim.round import make_mesh
from fedjax_sim.simulation import Experiment, simulate

__all__ = ["DP_ALGORITHMS", "Experiment", "build_algorithm", "build_context", "build_experiment",
           "complete_config", "dp_fields", "privacy_spec", "train_and_evaluate",
           "validate_config"]

# Algorithms whose upload is their model delta and whose server update averages the uploads:
# the ones client-level DP (fedjax_sim.dp.private, --config.dp.enabled) wraps.
DP_ALGORITHMS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


def _config_value(v):
  """A knob default as a config value (a dataclass or NamedTuple of settings, such as
  ``AugmentConfig``, becomes a sub-dict)."""
  if dataclasses.is_dataclass(v) and not isinstance(v, type):
    return ml_collections.ConfigDict(dataclasses.asdict(v))
  if isinstance(v, tuple) and hasattr(v, "_asdict"):
    return ml_collections.ConfigDict(v._asdict())
  return v


def complete_config(cfg) -> None:
  """Fills ``cfg.<cfg.algorithm>`` with the method's knob defaults it does not set.

  The defaults are read off the method's constructor signature
  (:func:`fedjax_sim.algorithms.registry.knob_defaults`), so they are stated
  once; after this every knob can be overridden with
  ``--config.<algorithm>.<knob>`` and is written to ``config.json``. Unknown
  algorithms are left for :func:`validate_config` to report.
  """
  name = cfg.algorithm
  if name not in ALGORITHMS:
    return
  with cfg.unlocked():
    if name not in cfg or cfg[name] is None:
      cfg[name] = ml_collections.ConfigDict()
    sub = cfg[name]
    with sub.unlocked():
      for k, v in registry.knob_defaults(name).items():
        if k not in sub:
          sub[k] = _config_value(v)


def _defines_clients(dataset: str) -> bool:
  """Whether ``dataset`` brings its own clients; an unknown name is reported when it is loaded."""
  try:
    return data_registry.defines_clients(dataset)
  except ValueError:
    return False


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
  need(cfg.clients_per_round >= 1,
       f"clients_per_round={cfg.clients_per_round} must be >= 1; set --config.clients_per_round.")
  # Natural partitions bring their own clients: the sampler checks K against them when built.
  if not _defines_clients(cfg.data.dataset):
    need(cfg.clients_per_round <= cfg.data.num_clients,
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
  need(cfg.schedule in ("chunked", "stream", "auto"), f"schedule={cfg.schedule!r}; set "
       "--config.schedule to 'chunked', 'stream' or 'auto'.")
  need(cfg.slots >= 0, f"slots={cfg.slots} must be >= 0 (0 = the default W).")
  visible = len(jax.devices())
  need(0 <= cfg.num_devices <= visible,
       f"num_devices={cfg.num_devices} but {visible} device(s) are visible; set "
       f"--config.num_devices to at most {visible} (0 = all visible devices).")
  known = sorted(ALGORITHMS)
  need(cfg.algorithm in known, f"unknown algorithm '{cfg.algorithm}'; set "
       f"--config.algorithm to one of {', '.join(known)}.")
  registry.check_knobs(cfg.algorithm, cfg.get(cfg.algorithm) or {})
  need(cfg.model in models.MODELS, f"unknown model '{cfg.model}'; set --config.model to one of "
       f"{', '.join(sorted(models.MODELS))}.")
  optimizers = ("sgd", "adam", "yogi", "adagrad")  # fedjax_sim.algorithms.server_optimizer
  need(cfg.get("server_optimizer", "sgd") in optimizers, "unknown server optimizer "
       f"'{cfg.get('server_optimizer')}'; set --config.server_optimizer to one of "
       f"{', '.join(optimizers)}.")
  samplers = ("uniform", "availability", "schedule", "poisson")  # sampling.build_sampler
  need(cfg.get("sampler", "uniform") in samplers, f"unknown sampler '{cfg.get('sampler')}'; set "
       f"--config.sampler to one of {', '.join(samplers)}.")
  need(cfg.get("cohort_bound", 0) >= 0, f"cohort_bound={cfg.get('cohort_bound')} must be >= 0 "
       "(0 = automatic); set --config.cohort_bound.")
  _validate_dp(cfg)
  if not ALGORITHMS[cfg.algorithm].pooled:  # model pools build their own models from archs
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


def _validate_dp(cfg) -> None:
  """Range checks of ``cfg.dp`` (when enabled) and the algorithm it wraps.

  Raises:
    ConfigError: one line naming the setting and the fix.
  """
  d = cfg.get("dp")
  if d is None or not d.get("enabled", False):
    return
  if cfg.algorithm not in DP_ALGORITHMS:
    raise ConfigError(f"dp.enabled=True wraps algorithms that upload a model delta "
                      f"({', '.join(DP_ALGORITHMS)}); '{cfg.algorithm}' uploads something "
                      "else: set --config.algorithm to one of them or --config.dp.enabled=False.")
  checks = [  # (key, ok, what a valid value is)
      ("noise_multiplier", d.noise_multiplier >= 0, ">= 0"),
      ("clip_norm", d.clip_norm > 0, "> 0"),
      ("target_epsilon", d.target_epsilon >= 0, ">= 0 (0 = use dp.noise_multiplier)"),
      ("delta", 0 <= d.delta < 1, "in [0, 1) (0 = num_clients ** -1.1)"),
      ("accountant", d.accountant in privacy.ACCOUNTANTS,
       f"one of {', '.join(privacy.ACCOUNTANTS)}"),
      ("target_quantile", 0 < d.target_quantile < 1, "in (0, 1)"),
      ("clip_lr", d.clip_lr >= 0, ">= 0"),
      ("clipped_count_stddev", d.clipped_count_stddev >= 0, ">= 0 (0 = expected cohort / 20)"),
  ]
  for key, ok, valid in checks:
    if not ok:
      raise ConfigError(f"dp.{key}={d[key]!r} must be {valid}; set --config.dp.{key}.")


def privacy_spec(cfg, sampler) -> Optional[privacy.PrivacySpec]:
  """The accounting settings of run config ``cfg`` with its built ``sampler`` (None unless
  ``cfg.dp.enabled``): z = ``dp.noise_multiplier``, delta = ``dp.delta`` (0: C^-1.1),
  Poisson (``sampler=poisson``) or fixed-size (``uniform``) sampling.

  Raises:
    PrivacyError: a sampler or accountant the accounting cannot analyse (one line).
  """
  d = cfg.get("dp")
  if d is None or not d.get("enabled", False):
    return None
  name = cfg.get("sampler", "uniform")
  if name not in ("poisson", "uniform"):
    raise privacy.PrivacyError(f"dp: sampler={name} draws clients with unequal or scheduled "
                               "probabilities, which no accountant here analyses; use "
                               "--config.sampler=poisson or uniform.")
  c = sampler.num_clients
  spec = privacy.PrivacySpec(
      noise_multiplier=float(d.noise_multiplier), num_clients=c,
      sampling="poisson" if name == "poisson" else "fixed", cohort=sampler.clients_per_round,
      rate=sampler.rate if sampler.rate is not None else sampler.clients_per_round / c,
      delta=float(d.delta) or c ** -1.1, accountant=d.accountant)
  privacy.check(spec)
  return spec


def _private(cfg, algorithm, sampler):
  """``algorithm`` wrapped by :func:`fedjax_sim.dp.private` as ``cfg.dp`` says; a
  ``dp.target_epsilon`` > 0 first calibrates ``cfg.dp.noise_multiplier`` for ``cfg.rounds``."""
  d = cfg.dp
  _validate_dp(cfg)
  spec = privacy_spec(cfg, sampler)
  if d.target_epsilon > 0:
    z = privacy.calibrate(spec, float(d.target_epsilon), int(cfg.rounds))
    with d.unlocked():
      d.noise_multiplier = z
  return dp.private(algorithm, noise_multiplier=float(d.noise_multiplier),
                    clip_norm=float(d.clip_norm), expected_cohort=sampler.expected_cohort,
                    adaptive=bool(d.adaptive), target_quantile=float(d.target_quantile),
                    clip_lr=float(d.clip_lr),
                    clipped_count_stddev=float(d.clipped_count_stddev) or None,
                    name=cfg.algorithm)


def dp_fields(cfg, sampler):
  """``(round, state) -> dict`` of the privacy fields of an evaluation row (None without DP):
  ``dp_epsilon`` (spent after ``round`` rounds, at ``dp_delta``), ``dp_delta`` (plus a
  truncating Poisson bound's share, ``privacy.truncation_delta``), ``dp_noise_multiplier``,
  ``dp_clip_norm`` (the next round's C) and, for Poisson sampling, ``dp_truncated_rounds``."""
  spec = privacy_spec(cfg, sampler)
  if spec is None:
    return None
  spec = spec._replace(noise_multiplier=float(cfg.dp.noise_multiplier))

  def fields(r, state):
    eps = privacy.epsilon(spec, int(r))
    row = {"dp_epsilon": eps, "dp_delta": spec.delta + privacy.truncation_delta(spec, eps, r),
           "dp_noise_multiplier": spec.noise_multiplier,
           "dp_clip_norm": float(jax.device_get(state.server.clip_norm))}
    if spec.sampling == "poisson":
      row["dp_truncated_rounds"] = int(jax.device_get(state.sampler))
    return row
  return fields


def build_context(cfg, data) -> BuildContext:
  """The registry's build context of run config ``cfg`` over built ``data`` (FederatedData)."""
  return BuildContext.from_config(
      cfg, DataSpec(data.input_shape, data.num_classes, data.num_clients), data=data)


def build_algorithm(cfg, spec: DataSpec, data: Any = None, seed: Any = None,
                    values: Optional[dict] = None):
  """``(algorithm, sampler)`` of the run config: the registry's builder of ``cfg.algorithm``
  with the knob sub-dict ``cfg.<algorithm>``; sampler None for model-pool methods.

  Args:
    cfg: the run config.
    spec: input shape, classes, clients of the data.
    data: the built FederatedData (auxiliary sets), or None.
    seed: the run seed (default ``cfg.seed``; a traced int32 in a vectorized sweep).
    values: dotted keys replaced by arrays (a vectorized sweep's hyperparameters):
      engine knobs (``client_lr``, ``server_lr``, ...) and ``<algorithm>.<knob>``.

  With ``cfg.dp.enabled`` the algorithm is its client-level DP version
  (:func:`fedjax_sim.dp.private`; ``dp.target_epsilon`` > 0 sets ``cfg.dp.noise_multiplier``).

  Raises:
    ConfigError: unknown algorithm or knob; ValueError: a knob value the method rejects.
  """
  values = values or {}
  ctx = BuildContext.from_config(cfg, spec, data=data, seed=seed, values=values)
  prefix = cfg.algorithm + "."
  knobs = {k: v for k, v in (cfg.get(cfg.algorithm) or {}).items()}
  knobs.update({k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
  algorithm = registry.build(cfg.algorithm, ctx, knobs)
  sampler = None if ALGORITHMS[cfg.algorithm].pooled else sampling.build_sampler(
      cfg, spec.num_clients)
  if cfg.get("dp") is not None and cfg.dp.get("enabled", False):
    algorithm = _private(cfg, algorithm, sampler)
  return algorithm, sampler


def build_experiment(cfg) -> Experiment:
  """Validates the config and builds data, model, algorithm, sampler and mesh.

  Raises:
    ConfigError, DatasetError, PartitionError: bad settings or missing data.
  """
  complete_config(cfg)
  validate_config(cfg)
  mesh = make_mesh(cfg.num_devices or None)
  data = build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed,
                              sharding=NamedSharding(mesh, P()))
  empty = np.flatnonzero(np.asarray(data.train.num_examples) == 0)
  if empty.size:
    raise ConfigError(f"client {int(empty[0])} has no training data; lower "
                      "--config.data.client_test_fraction or --config.data.num_clients.")
  spec = DataSpec(data.input_shape, data.num_classes, data.num_clients)
  try:
    algorithm, sampler = build_algorithm(cfg, spec, data)
  except ValueError as err:
    if isinstance(err, ConfigError):
      raise
    raise ConfigError(f"{cfg.algorithm}: {err}") from err
  model = None
  if not ALGORITHMS[cfg.algorithm].pooled:
    model = models.build_model(cfg.model, data.num_classes, **dict(cfg.model_kwargs))
  return Experiment(cfg, data, model, algorithm, sampler, mesh)


def train_and_evaluate(cfg, workdir: str, resume: bool = False,
                       experiment: Optional[Experiment] = None) -> dict[str, Any]:
  """Builds the experiment of ``cfg`` (unless given) and runs it with the config's engine
  settings: :func:`fedjax_sim.simulation.simulate` with the run directory ``workdir``.

  Args:
    cfg: the run ConfigDict.
    workdir: the run directory (created).
    resume: continue from the latest checkpoint (exact, see ``simulate``).
    experiment: an already built experiment of ``cfg``.

  Returns:
    The last evaluation's metrics dict, with ``train_time_s`` (seconds in round calls).

  Raises:
    ConfigError, DatasetError, PartitionError: bad settings or missing data.
    DivergedError, CheckpointError: see :func:`fedjax_sim.simulation.simulate`.
  """
  exp = experiment if experiment is not None else build_experiment(cfg)
  result = simulate(
      exp.algorithm, exp.sampler, exp.data, seed=cfg.seed, rounds=cfg.rounds,
      rounds_per_call=cfg.rounds_per_call, eval_every=cfg.eval_every,
      checkpoint_every=cfg.checkpoint_every, max_checkpoints=cfg.max_checkpoints,
      chunk_size=cfg.chunk_size or None, schedule=cfg.schedule, slots=cfg.slots or None,
      mesh=exp.mesh, workdir=workdir, resume=resume,
      config_json=cfg.to_json_best_effort(indent=2), name=cfg.algorithm, progress=cfg.progress,
      diverged_hint=diverged_hint(cfg), row_extras=dp_fields(cfg, exp.sampler))
  row = dict(result.history[-1]) if result.history else {}
  row["train_time_s"] = result.train_s
  return row


def diverged_hint(cfg) -> str:
  """What follows "training diverged: ... by round N" for a run of ``cfg``: the learning
  rates and the flags that lower them."""
  return (f" (client_lr={cfg.client_lr}, server_lr={cfg.server_lr}); lower --config.client_lr "
          "or --config.server_lr.")
