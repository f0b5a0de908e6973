"""Vectorized sweeps: G runs that differ only in numeric hyperparameters and
seeds, as ONE compiled program vmapped over a leading config axis G.

How: the algorithm is built *inside* a function of traced hyperparameters
(optax's ``inject_hyperparams`` idea): ``launch.experiment.build_algorithm(cfg,
spec, seed=h["seed"], values=h)`` hands the swept keys to the builder as
arrays (engine knobs such as ``client_lr`` through the build context, method
knobs ``<algorithm>.<knob>`` as the constructor's keyword arguments), and
``make_round(..., jit=False)`` gives the un-jitted round, so

    vmap(lambda state, data, h: make_round(build(h), ..., seed=h["seed"],
                                           jit=False)(state, data))

is one program for all G points (``jax.random.PRNGKey`` accepts the traced
seed; the engine derives every key from (seed, round)). The same goes for
``init_state`` and the evaluation. Constructors are written for array knobs:
arithmetic works, and range checks run only on concrete values (each point
is built once with its own concrete values first, so bad values still fail
with their message). A builder that branches in Python on a swept value, or
needs a concrete number, fails while tracing; the sweep then falls back to
one run per point (:class:`NotVectorizable` says why).

Seeds change the data partition (the run seed seeds it): each distinct seed's
data is built, padded to a common N (padding rows are inert: masked, and the
local shuffles do not depend on N) and stacked on the config axis. Keys that
change shapes (``data.*``, ``rounds``, ``batch_size``, model sizes, ...) are
never vectorized; the sweep groups points by them.

Every point gets a normal run directory (``config.json``, ``metrics.jsonl``,
``plots.png``, a final Orbax checkpoint) whose metrics equal a separate
``train_and_evaluate`` run up to float rounding (tested). Axis legend: G
points in the group, C clients, N examples.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_sim.client_data import FlatClientData, pad_examples
from fedjax_sim import evaluation
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.round import init_state, make_mesh, make_round
from fedjax_sim.simulation import run_rounds, train_fields
from fedjax_sim.launch.experiment import diverged_hint, validate_config

# Keys that are never vectorized: they change data, shapes or Python structure.
SHAPE_KEYS_PREFIXES = ("data.", "availability.", "model_kwargs.")


class NotVectorizable(Exception):
  """A group of points cannot share one compiled program (the reason is the message)."""


def is_vectorizable_key(key: str, value: Any) -> bool:
  """Whether sweeping ``key`` can stay inside one compiled program.

  ``seed`` always can; otherwise numeric float hyperparameters (client_lr,
  server_lr, server_tau, fedprox.mu, qffl.q, corefed.beta, ...) outside the data,
  availability and model settings.
  """
  if key == "seed":
    return True
  if key.startswith(SHAPE_KEYS_PREFIXES):
    return False
  return isinstance(value, float)


def get_key(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


# Engine knobs the build context takes as arrays (BuildContext.from_config's ``values``).
ENGINE_VALUE_KEYS = ("client_lr", "client_momentum", "lr_decay", "server_lr", "server_b1",
                     "server_b2", "server_tau")


def _check_traceable_keys(cfg, keys) -> None:
  """Raises NotVectorizable for a swept key that the builders do not take as an array."""
  from fedjax_sim.algorithms.registry import knob_defaults
  method = {f"{cfg.algorithm}.{k}" for k in knob_defaults(cfg.algorithm)}
  for k in keys:
    if k != "seed" and k not in ENGINE_VALUE_KEYS and k not in method:
      raise NotVectorizable(f"'{k}' does not reach the algorithm as an array (vectorizable: "
                            f"seed, {', '.join(ENGINE_VALUE_KEYS)} and {cfg.algorithm}'s knobs)")


def _stack_data(datas: list, index: list[int]):
  """(train, test, test_x, test_y) with a leading G axis on the client data.

  Raises:
    NotVectorizable: the global test sets differ between seeds.
  """
  d0 = datas[0]
  if isinstance(d0.train, FlatClientData) or isinstance(d0.test, FlatClientData):
    raise NotVectorizable("flat client storage cannot be stacked over seeds (each seed's rows "
                          "differ in number); use --config.data.storage=padded to vectorize")
  for d in datas[1:]:
    if d.test_x.shape != d0.test_x.shape or not (
        np.array_equal(np.asarray(d.test_x), np.asarray(d0.test_x))
        and np.array_equal(np.asarray(d.test_y), np.asarray(d0.test_y))):
      raise NotVectorizable("the global test set depends on the seed for this dataset")
  n_tr = max(d.train.y.shape[1] for d in datas)
  n_te = max(d.test.y.shape[1] for d in datas)
  trains = [pad_examples(d.train, n_tr) for d in datas]
  tests = [pad_examples(d.test, n_te) for d in datas]
  idx = jnp.asarray(index)
  stack = lambda ds: jax.tree.map(lambda *a: jnp.stack(a)[idx], *ds)
  return (stack(trains), stack(tests), d0.test_x, d0.test_y)


def run_group(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
              keys: Sequence[str], save_checkpoint: bool = True) -> list[dict]:
  """Runs G configs that differ only in ``keys`` (vectorizable) as one program.

  Args:
    cfgs: G run configs, equal except in ``keys``.
    workdirs: G run directories (written like ``train_and_evaluate``'s).
    keys: the dotted keys that differ (``seed`` included if seeds differ).
    save_checkpoint: write each point's final state as an Orbax checkpoint.

  Returns:
    G dicts ``{"status": "ok"|"diverged", "metrics": last evaluation row,
    "error": message or None}``; ``train_time_s`` in the metrics is the whole
    group's training time (the G points share it).

  Raises:
    NotVectorizable: the algorithm cannot be traced with these keys swept.
    ConfigError, DatasetError, PartitionError: as ``build_experiment``.
  """
  from fedjax_sim.data import build_federated_data
  from fedjax_sim.errors import ConfigError
  g_count = len(cfgs)
  cfg0 = cfgs[0]
  for c in cfgs:
    validate_config(c)
  keys = [k for k in keys if k != "seed"] + ["seed"]  # seed always rides along (it may be equal)

  seeds = [int(c.seed) for c in cfgs]
  uniq = sorted(set(seeds))
  datas = []
  for s in uniq:
    d = build_federated_data(cfg0.data, batch_size=cfg0.batch_size, seed=s)
    empty = np.flatnonzero(np.asarray(d.train.num_examples) == 0)
    if empty.size:
      raise ConfigError(f"client {int(empty[0])} has no training data (seed {s}); lower "
                        "--config.data.client_test_fraction or --config.data.num_clients.")
    datas.append(d)
  d0 = datas[0]
  spec = dict(input_shape=d0.input_shape, num_classes=d0.num_classes,
              num_clients=d0.num_clients)
  if len(uniq) == 1:
    data, data_axes = (d0.train, d0.test, d0.test_x, d0.test_y), None
  else:
    data = _stack_data(datas, [uniq.index(s) for s in seeds])
    data_axes = (0, 0, None, None)
  num_test = int(d0.test_y.shape[0])
  num_clients = d0.num_clients

  values = {k: [get_key(c, k) for c in cfgs] for k in keys}
  hp = {k: jnp.asarray(v, jnp.int32 if k == "seed" else jnp.float32) for k, v in values.items()}
  from fedjax_sim.algorithms.registry import DataSpec
  from fedjax_sim.launch.experiment import build_algorithm, complete_config, dp_fields
  dspec = DataSpec(spec["input_shape"], spec["num_classes"], spec["num_clients"])
  for c in cfgs:
    complete_config(c)
  _check_traceable_keys(cfg0, keys)
  # Each point with its own concrete values: range checks with their messages, and the
  # privacy fields of its rows (dp_epsilon, ...; None without DP).
  extras = [dp_fields(c, build_algorithm(c, dspec, d0)[1]) for c in cfgs]
  mesh = make_mesh(cfg0.num_devices or None)
  rpc = math.gcd(cfg0.rounds_per_call, cfg0.eval_every, cfg0.checkpoint_every, cfg0.rounds)

  def point(h):
    return build_algorithm(cfg0, dspec, d0, seed=h["seed"],
                           values={k: h[k] for k in keys if k != "seed"})

  def init_fn(h):
    alg, smp = point(h)
    return init_state(alg, smp, num_clients, h["seed"])

  def round_fn(state, dat, h):
    alg, smp = point(h)
    fn = make_round(alg, smp, seed=h["seed"], mesh=mesh, chunk_size=cfg0.chunk_size or None,
                    rounds_per_call=rpc, jit=False, schedule=cfg0.get("schedule", "chunked"),
                    slots=cfg0.get("slots") or None)
    return fn(state, dat[0])

  def eval_fn(state, dat, h):
    alg, _ = point(h)
    train, test, tx, ty = dat
    raw = evaluation.make_evaluate(alg)(state.server, state.clients, test, tx, ty)
    return raw

  def finite_fn(state, metrics):
    leaves = [x for x in jax.tree.leaves((state.server, metrics.get("loss", 0.0)))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] + [jnp.bool_(True)]))

  vinit = jax.jit(jax.vmap(init_fn))
  vround = jax.jit(jax.vmap(round_fn, in_axes=(0, data_axes, 0)), donate_argnums=(0,))
  veval = jax.jit(jax.vmap(eval_fn, in_axes=(0, data_axes, 0)))
  vfinite = jax.jit(jax.vmap(finite_fn))
  try:  # trace once up front: builder problems surface here, before any output
    state = vinit(hp)
    jax.eval_shape(vround, state, data, hp)
  except NotVectorizable:
    raise
  except Exception as err:  # a builder that needs concrete values: fall back
    if isinstance(err.__cause__, NotVectorizable) or isinstance(err.__context__, NotVectorizable):
      raise NotVectorizable(str(err.__cause__ or err.__context__)) from err
    raise NotVectorizable(f"tracing the algorithm with {', '.join(keys)} as arrays failed "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err

  histories: list[list[dict]] = [[] for _ in range(g_count)]
  status = ["ok"] * g_count
  errors: list[Any] = [None] * g_count
  for w, c in zip(workdirs, cfgs):
    os.makedirs(w, exist_ok=True)
    with open(os.path.join(w, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
    open(os.path.join(w, "metrics.jsonl"), "w").close()

  # Communication counts depend only on shapes, so the first point's algorithm gives
  # every point's (as in a single run's metrics rows).
  from fedjax_sim import comm
  alg0, smp0 = point({k: v[0] for k, v in hp.items()})
  comm_counts = comm.round_comm(alg0, d0.train,
                                None if alg0.pools else smp0.expected_cohort)
  t0 = time.time()

  def evaluate(r, state, train_metrics):  # every point still finite: a metrics.jsonl row
    raw = jax.device_get(veval(state, data, hp))
    for g in range(g_count):
      if status[g] != "ok":
        continue
      row = {"round": r, **evaluation.summarize(jax.tree.map(lambda a: a[g], raw), num_test)}
      row.update(train_fields(train_metrics, g))
      row.update(comm.comm_row(comm_counts, r))
      if extras[g] is not None:  # reads the point's server clip norm and sampler state only
        row.update(extras[g](r, types.SimpleNamespace(
            server=jax.tree.map(lambda a: a[g], state.server),
            sampler=jax.tree.map(lambda a: a[g], state.sampler))))
      row["wall_s"] = time.time() - t0 if r else 0.0
      with open(os.path.join(workdirs[g], "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
      histories[g].append(row)

  def diverged(round_, g):
    status[g] = "diverged"
    errors[g] = (f"training diverged: non-finite loss or model by round {round_}"
                 f"{diverged_hint(cfgs[g])}")

  def checkpoint(r, state):  # the final state of every point still finite
    for g in range(g_count):
      if status[g] == "ok":
        ckdir = os.path.join(workdirs[g], "checkpoints")
        shutil.rmtree(ckdir, ignore_errors=True)
        ckpt = Checkpointer(ckdir, cfgs[g].max_checkpoints)
        ckpt.save(r, jax.tree.map(lambda a: a[g], state))
        ckpt.wait()
        ckpt.close()

  result = run_rounds(lambda s: vround(s, data, hp), state, rounds=cfg0.rounds,
                      rounds_per_call=rpc, eval_every=cfg0.eval_every, start=0,
                      evaluate=evaluate, is_finite=lambda s, m: np.asarray(vfinite(s, m)),
                      on_diverged=diverged, checkpoint=checkpoint if save_checkpoint else None)

  from fedjax_sim import plotting
  out = []
  for g in range(g_count):
    plotting.plot_history(histories[g], os.path.join(workdirs[g], "plots.png"),
                          title=f"{cfgs[g].algorithm} on {d0.name}")
    row = dict(histories[g][-1]) if histories[g] else {}
    row["train_time_s"] = result.train_s
    out.append({"status": status[g], "metrics": row, "error": errors[g]})
  return out
