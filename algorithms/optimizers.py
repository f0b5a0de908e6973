"""Server optimizers by name (FedOpt: Reddi et al., "Adaptive Federated Optimization",
arXiv 2003.00295, Algorithm 2), shared by FedAvg/FedOpt and every method that takes
``--config.server_optimizer``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def scale_by_rss_outer_eps(tau: float) -> optax.GradientTransformation:
  """FedAdagrad's preconditioner (Reddi et al., Algorithm 2): v += g^2, g / (sqrt(v) + tau).

  optax.adagrad puts its epsilon inside the square root (g / sqrt(v + eps)),
  which makes steps far smaller than the paper's for small pseudo-gradients.
  """
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(updates, v, params=None):
    del params
    v = jax.tree.map(lambda a, g: a + g * g, v, updates)
    return jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + tau), updates, v), v

  return optax.GradientTransformation(init, update)


def server_optimizer(name: str, lr: float, b1: float = 0.9, b2: float = 0.99,
                     tau: float = 1e-3) -> optax.GradientTransformation:
  """Server optimizer by name: sgd (FedAvg with lr=1), adam, yogi, adagrad."""
  if name == "sgd":
    return optax.sgd(lr)
  if name == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=tau)
  if name == "yogi":
    return optax.yogi(lr, b1=b1, b2=b2, eps=tau)
  if name == "adagrad":
    return optax.chain(scale_by_rss_outer_eps(tau), optax.scale(-lr))
  raise ValueError(f"Unknown server optimizer '{name}'; set --config.server_optimizer to one "
                   "of sgd, adam, yogi, adagrad.")
