"""FedProx: Li et al., "Federated Optimization in Heterogeneous Networks",
arXiv 1812.06127, Eq. (2): client k minimizes
h_k(w; w^t) = F_k(w) + (mu / 2) ||w - w^t||^2; the server aggregates as FedAvg.
mu = 0 is exactly FedAvg (tested).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm, masked_cross_entropy
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.registry import register
from fedjax_sim.checks import concrete


def proximal_term(params: Any, global_params: Any) -> jax.Array:
  """||w - w^t||^2 summed over every parameter (float32 scalar)."""
  sq = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), params, global_params)
  return jax.tree.reduce(jnp.add, sq)


def fedprox(apply_fn: Callable, init_params: Callable, *, mu: float = 0.01, **fedavg_kwargs
            ) -> FederatedAlgorithm:
  """FedProx with proximal weight ``mu`` (>= 0); other arguments as :func:`fedavg`.

  Raises:
    ValueError: ``mu`` < 0.
  """
  if concrete(mu) and mu < 0:
    raise ValueError(f"FedProx mu={mu} must be >= 0; set --config.fedprox.mu.")

  def loss(params, global_params, x, y, mask):
    ce = masked_cross_entropy(apply_fn(params, x), y, mask)
    return ce + 0.5 * mu * proximal_term(params, global_params)

  return fedavg(apply_fn, init_params, local_loss=loss, name="fedprox", **fedavg_kwargs)


@register("fedprox", fedprox)
def _build(ctx, **knobs):
  return fedprox(*ctx.model_fns(), server_opt=ctx.server_opt(), **ctx.client, **knobs)
