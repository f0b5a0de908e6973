"""Federated algorithms, one module per method, and the config registry.

:func:`build_algorithm` turns a run config into a
:class:`~fedjax_sim.protocol.FederatedAlgorithm`.
"""
from __future__ import annotations

from typing import Any, Callable

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms.config_args import client_kwargs, embedding_fn, server_opt
from fedjax_sim.algorithms.fedavg import fedavg, server_optimizer
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.local import local_only
from fedjax_sim.algorithms.scaffold import scaffold

__all__ = ["ALGORITHMS", "build_algorithm", "embedding_fn", "fedavg", "fedprox", "local_only",
           "server_optimizer"]


def _fedopt(opt_name: str):
  def build(cfg, apply_fn, init_params):
    return fedavg(apply_fn, init_params, server_opt=server_opt(cfg, opt_name),
                  name=f"fed{opt_name}", **client_kwargs(cfg))
  return build


# name -> builder(cfg, apply_fn, init_params) -> FederatedAlgorithm
ALGORITHMS: dict[str, Callable[..., FederatedAlgorithm]] = {
    "fedavg": lambda cfg, a, i: fedavg(a, i, server_opt=server_opt(cfg), **client_kwargs(cfg)),
    "fedprox": lambda cfg, a, i: fedprox(a, i, mu=cfg.mu, server_opt=server_opt(cfg),
                                         **client_kwargs(cfg)),
    "fedadam": _fedopt("adam"),
    "fedyogi": _fedopt("yogi"),
    "fedadagrad": _fedopt("adagrad"),
    "local": lambda cfg, a, i: local_only(a, i, init_seed=cfg.seed, **client_kwargs(cfg)),
    "scaffold": lambda cfg, a, i: scaffold(a, i, num_clients=cfg.data.num_clients,
                                           server_lr=cfg.server_lr, **client_kwargs(cfg)),
}


def _fedavg_pools(cfg, spec):
  from fedjax_sim.algorithms.pooled import fedavg_per_pool
  return fedavg_per_pool(tuple(cfg.archs), spec, cfg.clients_per_round,
                         server_opt=server_opt(cfg), **client_kwargs(cfg))


# Model-heterogeneous algorithms (model pools): name -> builder(cfg, spec: DataSpec).
# They build their own models from cfg.archs (fedjax_sim.models.MODEL_ZOO names).
POOLED_ALGORITHMS: dict[str, Callable[..., FederatedAlgorithm]] = {
    "fedavg_pools": _fedavg_pools,
}


def _register_codist():  # CODIST (arXiv 2310.02549); builder in algorithms/codist.py
  from fedjax_sim.algorithms.codist import build_codist
  POOLED_ALGORITHMS["codist"] = build_codist


_register_codist()


def _register_hetero():  # FedRE and its baselines, one module each; builders live there
  from fedjax_sim.algorithms import fedallrep, fedgh, fedproto, lg_fedavg, local_pools
  from fedjax_sim.algorithms.fedre import build_fedre
  POOLED_ALGORITHMS["fedre"] = build_fedre
  for module in (fedproto, fedgh, fedallrep, lg_fedavg, local_pools):
    POOLED_ALGORITHMS[module.__name__.rsplit(".", 1)[1]] = module.BUILDER


_register_hetero()


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
