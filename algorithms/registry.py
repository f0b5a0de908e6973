"""The algorithm registry: a name -> builder table that each algorithm module fills itself.

One config dialect: ``cfg.algorithm`` names the method and ``cfg.<algorithm>``
(a sub-dict named after it) holds its knobs, passed as keyword arguments to
the method's constructor, so the constructor's signature states every default
exactly once. The engine, data and model knobs (local training: client_lr, B,
E, ...; the server optimizer; the model or model pools) reach every builder
through one :class:`BuildContext`, the same for single-model and
model-pool (pooled) methods.

Adding an algorithm is one new module in ``algorithms/`` plus its test::

  from fedjax_sim.algorithms.registry import register

  def mymethod(apply_fn, init_params, *, client_lr, batch_size, ..., gamma: float = 0.5):
    ...  # -> FederatedAlgorithm

  @register("mymethod", mymethod)
  def _build(ctx, **knobs):
    return mymethod(*ctx.model_fns(), **ctx.client, **knobs)

``fedjax_sim.algorithms`` imports every module of the package, so the
``@register`` line runs and ``--config.algorithm=mymethod`` (knobs
``--config.mymethod.gamma=...``) works with no other edit.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax

from fedjax_sim import models
from fedjax_sim.algorithms.optimizers import server_optimizer
from fedjax_sim.errors import ConfigError
from fedjax_sim.protocol import FederatedAlgorithm

__all__ = ["ALGORITHMS", "BuildContext", "DataSpec", "Entry", "build", "check_knobs",
           "knob_defaults", "register"]

# Constructor parameters that come from the context (engine, data and model knobs), never from
# the method's knob sub-dict.
CONTEXT_PARAMS = frozenset({
    "apply_fn", "init_params", "embed_fn", "embed_dim", "archs", "spec", "clients_per_round",
    "num_clients", "client_lr", "batch_size", "epochs", "local_steps", "client_momentum",
    "lr_decay", "server_opt", "name"})


class DataSpec(NamedTuple):
  """What a builder needs to know about the data (no arrays)."""
  input_shape: tuple
  num_classes: int
  num_clients: int


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """Everything a builder gets besides its knobs (one signature for every method).

  Attributes:
    spec: input shape, number of classes L, number of clients C.
    seed: the run seed (int; a traced int32 inside a vectorized sweep).
    clients_per_round: K (of the single model; pooled methods split it per pool).
    rounds: the run's number of rounds (schedules such as cosine decay).
    client: local-training keyword arguments, passed as they are to every
      constructor: ``client_lr`` (eta_l), ``batch_size`` (B), ``epochs`` (E),
      ``local_steps``, ``client_momentum``, ``lr_decay``.
    server: ``{"name", "lr", "b1", "b2", "tau"}`` of the server optimizer.
    model: ``fedjax_sim.models.MODELS`` name of the single model.
    model_kwargs: its fields (e.g. ``hidden``).
    archs: ``fedjax_sim.models.MODEL_ZOO`` names of the model pools.
    data: the built :class:`fedjax_sim.data.FederatedData` (auxiliary sets such
      as a server or public split live in ``data.aux``), or None.
  """
  spec: DataSpec
  seed: Any
  clients_per_round: int
  rounds: int
  client: dict
  server: dict
  model: str = "mlp"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  archs: tuple = ()
  data: Any = None

  @classmethod
  def from_config(cls, cfg, spec: DataSpec, data: Any = None, seed: Any = None,
                  values: Optional[dict] = None) -> "BuildContext":
    """The context of run config ``cfg``; ``values`` replaces dotted keys (a sweep's arrays)."""
    v = values or {}
    get = lambda key: v[key] if key in v else cfg[key]
    return cls(
        spec=spec, seed=cfg.seed if seed is None else seed,
        clients_per_round=cfg.clients_per_round, rounds=cfg.rounds,
        client=dict(client_lr=get("client_lr"), batch_size=cfg.batch_size,
                    epochs=cfg.local_epochs, local_steps=cfg.local_steps,
                    client_momentum=get("client_momentum"), lr_decay=get("lr_decay")),
        server=dict(name=cfg.server_optimizer, lr=get("server_lr"), b1=get("server_b1"),
                    b2=get("server_b2"), tau=get("server_tau")),
        model=cfg.model, model_kwargs=dict(cfg.get("model_kwargs") or {}),
        archs=tuple(cfg.get("archs", ())), data=data)

  def server_opt(self, name: Optional[str] = None):
    """The server optimizer (optax) named ``name`` (default: the config's)."""
    s = self.server
    return server_optimizer(name or s["name"], s["lr"], s["b1"], s["b2"], s["tau"])

  def model_fns(self) -> tuple[Callable, Callable]:
    """``(apply_fn(params, x [B, ...]) -> logits [B, L], init_params(rng) -> params)``."""
    model = models.build_model(self.model, self.spec.num_classes, **self.model_kwargs)
    return ((lambda params, x: model.apply({"params": params}, x)),
            (lambda rng: models.init_params(model, rng, self.spec.input_shape)))

  def embedding_fn(self) -> tuple[Callable, int]:
    """``(embed_fn(params, x [B, ...]) -> (logits [B, L], z float32 [B, D]), D)``.

    Every model in ``fedjax_sim.models`` returns its penultimate embedding with
    ``return_embedding=True``; D is read off the classifier (the last
    top-level ``Dense_<i>``, kernel [D, L]).

    Raises:
      ValueError: the model has no top-level Dense classifier.
    """
    _, init_params = self.model_fns()
    shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    dense = [k for k in shapes if k.startswith("Dense_") and k[6:].isdigit()]
    if not dense:
      raise ValueError(f"model '{self.model}' has no top-level Dense classifier to read D from.")
    dim = shapes[max(dense, key=lambda k: int(k[6:]))]["kernel"].shape[0]
    model = models.build_model(self.model, self.spec.num_classes, **self.model_kwargs)
    return (lambda p, x: model.apply({"params": p}, x, return_embedding=True)), int(dim)


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered method: ``builder(ctx, **knobs)``; its knobs are ``constructor``'s."""
  name: str
  builder: Callable[..., FederatedAlgorithm]
  constructor: Any  # a function, or a tuple of them (their knobs' union)
  fixed: frozenset  # constructor parameters the builder sets itself (not knobs)
  pooled: bool  # model pools (built from ctx.archs), no engine sampler


ALGORITHMS: dict[str, Entry] = {}


def register(name: str, constructor: Any, *, fixed: tuple = (), pooled: bool = False):
  """Decorator: registers ``builder(ctx: BuildContext, **knobs) -> FederatedAlgorithm``.

  Args:
    name: the ``cfg.algorithm`` value (also the name of its knob sub-dict).
    constructor: the function whose keyword parameters with defaults, minus
      :data:`CONTEXT_PARAMS` and ``fixed``, are the method's knobs (a tuple of
      functions when the constructor passes ``**kwargs`` on: the union of their
      knobs, the first function's default winning).
    fixed: constructor parameters the builder sets (e.g. a preset's switches).
    pooled: a model-pool method (no engine sampler; models from ``ctx.archs``).

  Raises:
    ValueError: ``name`` is already registered.
  """
  def wrap(builder):
    if name in ALGORITHMS:
      raise ValueError(f"algorithm '{name}' is registered twice.")
    ALGORITHMS[name] = Entry(name, builder, constructor, frozenset(fixed), pooled)
    return builder
  return wrap


def knob_defaults(name: str) -> dict:
  """``{knob: default}`` of algorithm ``name``: its constructor's signature.

  Raises:
    ConfigError: unknown algorithm.
  """
  entry = _entry(name)
  out = {}
  fns = entry.constructor if isinstance(entry.constructor, tuple) else (entry.constructor,)
  for fn in fns:
    for p in inspect.signature(fn).parameters.values():
      if (p.default is not inspect.Parameter.empty and p.name not in CONTEXT_PARAMS
          and p.name not in entry.fixed and p.name not in out):
        out[p.name] = p.default
  return out


def _entry(name: str) -> Entry:
  if name not in ALGORITHMS:
    raise ConfigError(f"unknown algorithm '{name}'; set --config.algorithm to one of "
                      f"{', '.join(sorted(ALGORITHMS))}.")
  return ALGORITHMS[name]


def build(name: str, ctx: BuildContext, knobs: Optional[dict] = None) -> FederatedAlgorithm:
  """Builds algorithm ``name`` with ``knobs`` (its ``cfg.<name>`` sub-dict).

  Raises:
    ConfigError: unknown algorithm, or a knob the method does not have (the
      message lists its knobs).
    ValueError: a knob value the constructor rejects (its own message).
  """
  entry = _entry(name)
  knobs = dict(knobs or {})
  check_knobs(name, knobs)
  return entry.builder(ctx, **knobs)


def check_knobs(name: str, knobs) -> None:
  """Raises ConfigError (listing the method's knobs) for a knob ``name`` does not have."""
  valid = knob_defaults(name)
  extra = sorted(set(knobs) - set(valid))
  if extra:
    raise ConfigError(f"{name} has no knob {', '.join(extra)}; its knobs are "
                      f"{', '.join(f'{k}={v!r}' for k, v in valid.items()) or 'none'}; remove "
                      f"--config.{name}.{extra[0]}.")
