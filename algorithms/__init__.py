"""Federated algorithms, one module per method, and the config registry.

:func:`build_algorithm` turns a run config into a
:class:`~fedjax_sim.algorithm.FederatedAlgorithm`.
"""
from __future__ import annotations

from typing import Any, Callable

from fedjax_sim.algorithm import FederatedAlgorithm
from fedjax_sim.algorithms.fedavg import fedavg, server_optimizer
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.local import local_only
from fedjax_sim.algorithms.scaffold import scaffold

__all__ = ["ALGORITHMS", "build_algorithm", "fedavg", "fedprox", "local_only",
           "server_optimizer"]


def _common(cfg) -> dict:
  return dict(client_lr=cfg.client_lr, batch_size=cfg.batch_size, epochs=cfg.local_epochs,
              local_steps=cfg.local_steps, client_momentum=cfg.client_momentum,
              lr_decay=cfg.lr_decay)


def _server_opt(cfg, name=None):
  return server_optimizer(name or cfg.server_optimizer, cfg.server_lr, cfg.server_b1,
                          cfg.server_b2, cfg.server_tau)


def _fedopt(opt_name: str):
  def build(cfg, apply_fn, init_params):
    return fedavg(apply_fn, init_params, server_opt=_server_opt(cfg, opt_name),
                  name=f"fed{opt_name}", **_common(cfg))
  return build


# name -> builder(cfg, apply_fn, init_params) -> FederatedAlgorithm
ALGORITHMS: dict[str, Callable[..., FederatedAlgorithm]] = {
    "fedavg": lambda cfg, a, i: fedavg(a, i, server_opt=_server_opt(cfg), **_common(cfg)),
    "fedprox": lambda cfg, a, i: fedprox(a, i, mu=cfg.mu, server_opt=_server_opt(cfg),
                                         **_common(cfg)),
    "fedadam": _fedopt("adam"),
    "fedyogi": _fedopt("yogi"),
    "fedadagrad": _fedopt("adagrad"),
    "local": lambda cfg, a, i: local_only(a, i, init_seed=cfg.seed, **_common(cfg)),
    "scaffold": lambda cfg, a, i: scaffold(a, i, num_clients=cfg.data.num_clients,
                                           server_lr=cfg.server_lr, **_common(cfg)),
}


def _fedavg_pools(cfg, spec):
  from fedjax_sim.algorithms.pooled import fedavg_per_pool
  return fedavg_per_pool(tuple(cfg.archs), spec, cfg.clients_per_round,
                         server_opt=_server_opt(cfg), **_common(cfg))


# Model-heterogeneous algorithms (model pools): name -> builder(cfg, spec: DataSpec).
# They build their own models from cfg.archs (fedjax_sim.models.MODEL_ZOO names).
POOLED_ALGORITHMS: dict[str, Callable[..., FederatedAlgorithm]] = {
    "fedavg_pools": _fedavg_pools,
}


def _register_codist():  # CODIST (arXiv 2310.02549); builder in algorithms/codist.py
  from fedjax_sim.algorithms.codist import build_codist
  POOLED_ALGORITHMS["codist"] = build_codist


_register_codist()


def _register_hetero():  # FedRE and its baselines; builders live in their modules
  from fedjax_sim.algorithms.fedre import build_fedre
  from fedjax_sim.algorithms.hetero_baselines import BUILDERS
  POOLED_ALGORITHMS["fedre"] = build_fedre
  POOLED_ALGORITHMS.update(BUILDERS)


_register_hetero()


def embedding_fn(cfg: Any, init_params: Callable) -> tuple[Callable, int]:
  """``(embed_fn, D)`` for representation methods, from ``cfg.model``.

  The engine hands builders ``apply_fn(params, x) -> logits`` only; every model
  in ``fedjax_sim.models`` also returns the penultimate embedding with
  ``return_embedding=True``. The model is rebuilt from ``cfg.model`` and
  ``cfg.model_kwargs``; the number of classes L and D are read off the
  classifier (the last top-level ``Dense_<i>``, kernel [D, L]) of
  ``init_params``'s shapes. ``embed_fn(params, x [B, ...]) -> (logits [B, L],
  z float32 [B, D])``.
  """
  import jax
  from fedjax_sim import models
  shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  dense = [k for k in shapes if k.startswith("Dense_") and k[6:].isdigit()]
  if not dense:
    raise ValueError(f"model '{cfg.model}' has no top-level Dense classifier to read D from.")
  dim, num_classes = shapes[max(dense, key=lambda k: int(k[6:]))]["kernel"].shape
  model = models.build_model(cfg.model, num_classes, **dict(cfg.model_kwargs))
  return (lambda p, x: model.apply({"params": p}, x, return_embedding=True)), int(dim)


def _register_fairness():  # CoRe-Fed (+ ablations), q-FFL, FedMDFG; builders live in their modules
  from fedjax_sim.algorithms.corefed import build_corefed
  from fedjax_sim.algorithms.fedmdfg import build_fedmdfg
  from fedjax_sim.algorithms.qffl import build_qffl
  for name in ("corefed", "refed", "cofed"):
    ALGORITHMS[name] = build_corefed(name)
  ALGORITHMS["qffl"] = build_qffl
  ALGORITHMS["fedmdfg"] = build_fedmdfg


_register_fairness()


def _register_ssl():  # FedAlignUniform, FedSimCLR, SSD; builders live in algorithms/ssd.py
  from fedjax_sim.algorithms.ssd import SSL_BUILDERS
  ALGORITHMS.update(SSL_BUILDERS)


_register_ssl()


def build_algorithm(cfg: Any, apply_fn: Callable, init_params: Callable) -> FederatedAlgorithm:
  """Looks up ``cfg.algorithm`` in :data:`ALGORITHMS`.

  Raises:
    ValueError: unknown algorithm (the message lists the known ones).
  """
  if cfg.algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown algorithm '{cfg.algorithm}'; set --config.algorithm to one of "
                     f"{', '.join(sorted(ALGORITHMS))}.")
  return ALGORITHMS[cfg.algorithm](cfg, apply_fn, init_params)
