"""Vectorized sweeps: G runs that differ only in numeric hyperparameters and
seeds, as ONE compiled program vmapped over a leading config axis G.

How: the algorithm is built *inside* a function of traced hyperparameters
(``build_algorithm`` reads them from a config overlay, :class:`_Overlay`), and
``make_round(..., jit=False)`` gives the un-jitted round, so

    vmap(lambda state, data, hp: make_round(build(hp), ..., seed=hp["seed"],
                                            jit=False)(state, data))

is one program for all G points (``jax.random.PRNGKey`` accepts the traced
seed; the engine derives every key from (seed, round)). The same goes for
``init_state`` and the evaluation.

Hyperparameters reach the builders as :class:`HParam` objects: arithmetic on
one gives a traced array (``optax.sgd(lr)``, ``0.5 * mu * ...`` work), while
Python control flow on one (``if mu < 0``, ``momentum or None``,
``decay == 1.0``) is answered from the G concrete values when they all agree,
and raises :class:`NotVectorizable` when they don't. Anything else a builder
does with a number (``float(x)``, NumPy, a ``jnp`` call on the raw object)
also fails at trace time; the sweep then falls back to one run per point.

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
import operator
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_sim.client_data import pad_examples
from fedjax_sim import evaluation, models, sampling
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.round import init_state, make_mesh, make_round
from fedjax_sim.launch.experiment import validate_config

# Keys that are never vectorized: they change data, shapes or Python structure.
SHAPE_KEYS_PREFIXES = ("data.", "availability.", "model_kwargs.", "corefed.window",
                       "corefed.max_age")


class NotVectorizable(Exception):
  """A group of points cannot share one compiled program (the reason is the message)."""


def is_vectorizable_key(key: str, value: Any) -> bool:
  """Whether sweeping ``key`` can stay inside one compiled program.

  ``seed`` always can; otherwise numeric float hyperparameters (client_lr,
  server_lr, mu, qffl_q, server_tau, corefed.beta, ...) outside the data,
  availability and model settings.
  """
  if key == "seed":
    return True
  if key.startswith(SHAPE_KEYS_PREFIXES):
    return False
  return isinstance(value, float)


class HParam:
  """A traced hyperparameter that still answers Python comparisons.

  ``traced`` is this point's scalar (a tracer under vmap); ``values`` are the
  concrete values of all G points. Arithmetic returns traced arrays;
  comparisons and ``bool`` return a Python bool when every point agrees.
  """

  def __init__(self, name: str, traced: Any, values: Sequence[Any]):
    self.name, self.traced, self.values = name, traced, list(values)

  # --- control flow: answered from the concrete values -------------------
  def _agree(self, op, other, opname):
    others = other.values if isinstance(other, HParam) else [other] * len(self.values)
    results = {bool(op(v, o)) for v, o in zip(self.values, others)}
    if len(results) != 1:
      raise NotVectorizable(f"the algorithm branches on '{self.name}' ({opname}) and the swept "
                            f"values {self.values} take different branches")
    return results.pop()

  def __lt__(self, o): return self._agree(operator.lt, o, "<")
  def __le__(self, o): return self._agree(operator.le, o, "<=")
  def __gt__(self, o): return self._agree(operator.gt, o, ">")
  def __ge__(self, o): return self._agree(operator.ge, o, ">=")
  def __eq__(self, o): return self._agree(operator.eq, o, "==")
  def __ne__(self, o): return self._agree(operator.ne, o, "!=")
  def __bool__(self): return self._agree(lambda v, _: bool(v), None, "bool")
  __hash__ = None

  def _concrete(self, what):
    raise NotVectorizable(f"the algorithm needs a concrete {what} of '{self.name}'")

  def __float__(self): self._concrete("float")
  def __int__(self): self._concrete("int")
  def __index__(self): self._concrete("index")
  def __array__(self, *a, **k): self._concrete("NumPy value")

  # --- arithmetic: traced --------------------------------------------------
  @staticmethod
  def _t(x):
    return x.traced if isinstance(x, HParam) else x

  def __add__(self, o): return self.traced + self._t(o)
  def __radd__(self, o): return self._t(o) + self.traced
  def __sub__(self, o): return self.traced - self._t(o)
  def __rsub__(self, o): return self._t(o) - self.traced
  def __mul__(self, o): return self.traced * self._t(o)
  def __rmul__(self, o): return self._t(o) * self.traced
  def __truediv__(self, o): return self.traced / self._t(o)
  def __rtruediv__(self, o): return self._t(o) / self.traced
  def __pow__(self, o): return self.traced ** self._t(o)
  def __rpow__(self, o): return self._t(o) ** self.traced
  def __neg__(self): return -self.traced
  def __pos__(self): return self.traced
  def __abs__(self): return jnp.abs(self.traced)
  def __jax_array__(self): return self.traced

  def __repr__(self):
    return f"HParam({self.name}, {self.values})"


class _Overlay:
  """A read-only view of a ConfigDict where some dotted keys are replaced."""

  def __init__(self, cfg, overrides: dict[str, Any], prefix: str = ""):
    object.__setattr__(self, "_cfg", cfg)
    object.__setattr__(self, "_over", overrides)
    object.__setattr__(self, "_prefix", prefix)

  def _lookup(self, name):
    full = self._prefix + name
    if full in self._over:
      return self._over[full]
    value = getattr(self._cfg, name)
    if isinstance(value, ml_collections.ConfigDict) and any(
        k.startswith(full + ".") for k in self._over):
      return _Overlay(value, self._over, full + ".")
    return value

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return self._lookup(name)

  def __getitem__(self, name):
    return self._lookup(name)

  def __contains__(self, name):
    return name in self._cfg

  def get(self, name, default=None):
    return self._lookup(name) if name in self._cfg else default

  def __setattr__(self, name, value):
    raise TypeError("the sweep's config overlay is read-only")


def get_key(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def _builder(cfg, spec):
  """``build(cfg_like) -> (algorithm, sampler)`` for the config's algorithm."""
  from fedjax_sim.algorithms import POOLED_ALGORITHMS, build_algorithm
  if cfg.algorithm in POOLED_ALGORITHMS:
    from fedjax_sim.algorithms.pooled import DataSpec
    dspec = DataSpec(spec["input_shape"], spec["num_classes"], spec["num_clients"])
    return lambda c: (POOLED_ALGORITHMS[cfg.algorithm](c, dspec), None)
  model = models.build_model(cfg.model, spec["num_classes"], **dict(cfg.model_kwargs))
  apply_fn = lambda params, x: model.apply({"params": params}, x)
  init_params = lambda rng: models.init_params(model, rng, spec["input_shape"])
  return lambda c: (build_algorithm(c, apply_fn, init_params),
                    sampling.build_sampler(c, spec["num_clients"]))


def _stack_data(datas: list, index: list[int]):
  """(train, test, test_x, test_y) with a leading G axis on the client data.

  Raises:
    NotVectorizable: the global test sets differ between seeds.
  """
  d0 = datas[0]
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
  build = _builder(cfg0, spec)
  mesh = make_mesh(cfg0.num_devices or None)
  rpc = math.gcd(cfg0.rounds_per_call, cfg0.eval_every, cfg0.checkpoint_every, cfg0.rounds)

  def point(h):
    return build(_Overlay(cfg0, {k: HParam(k, h[k], values[k]) for k in keys}))

  def init_fn(h):
    alg, smp = point(h)
    return init_state(alg, smp, num_clients, h["seed"])

  def round_fn(state, dat, h):
    alg, smp = point(h)
    fn = make_round(alg, smp, seed=h["seed"], mesh=mesh, chunk_size=cfg0.chunk_size or None,
                    rounds_per_call=rpc, jit=False)
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
                                None if alg0.pools else smp0.clients_per_round)

  def do_eval(state, round_metrics, wall, r):
    raw = jax.device_get(veval(state, data, hp))
    for g in range(g_count):
      if status[g] != "ok":
        continue
      row = {"round": r, **evaluation.summarize(jax.tree.map(lambda a: a[g], raw), num_test)}
      row.update({f"train_{k}" if not k.startswith(("server/", "padding", "useful")) else k:
                  float(np.mean(v[g])) for k, v in round_metrics.items()})
      row.update(comm.comm_row(comm_counts, r))
      row["wall_s"] = wall
      with open(os.path.join(workdirs[g], "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
      histories[g].append(row)

  t0, train_time, r = time.time(), 0.0, 0
  do_eval(state, {}, 0.0, 0)
  while r < cfg0.rounds and "ok" in status:
    tc = time.time()
    state, metrics = vround(state, data, hp)
    metrics = jax.device_get(metrics)
    ok = np.asarray(vfinite(state, metrics))
    train_time += time.time() - tc
    r += rpc
    for g in range(g_count):
      if status[g] == "ok" and not ok[g]:
        loss = np.asarray(metrics.get("loss", np.full((1, rpc), np.nan))[g])
        bad = r - rpc + int(np.argmax(~np.isfinite(loss)))
        status[g] = "diverged"
        errors[g] = (f"training diverged: non-finite loss or model by round {bad + 1} "
                     f"(client_lr={cfgs[g].client_lr}, server_lr={cfgs[g].server_lr}); lower "
                     "--config.client_lr or --config.server_lr.")
    if r % cfg0.eval_every == 0 or r == cfg0.rounds:
      do_eval(state, metrics, time.time() - t0, r)

  from fedjax_sim import plotting
  out = []
  for g in range(g_count):
    if save_checkpoint and status[g] == "ok":
      ckdir = os.path.join(workdirs[g], "checkpoints")
      shutil.rmtree(ckdir, ignore_errors=True)
      ckpt = Checkpointer(ckdir, cfgs[g].max_checkpoints)
      ckpt.save(r, jax.tree.map(lambda a: a[g], state))
      ckpt.wait()
      ckpt.close()
    plotting.plot_history(histories[g], os.path.join(workdirs[g], "plots.png"),
                          title=f"{cfgs[g].algorithm} on {d0.name}")
    row = dict(histories[g][-1]) if histories[g] else {}
    row["train_time_s"] = train_time
    out.append({"status": status[g], "metrics": row, "error": errors[g]})
  return out
