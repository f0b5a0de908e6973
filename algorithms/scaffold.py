"""SCAFFOLD: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", arXiv 1910.06378, Algorithm 1 with option II.

Client i keeps a control variate c_i (per-client state); the server keeps c.
Local steps use the corrected gradient g_i(y) - c_i + c (implemented by adding
the linear term <c - c_i, y> to the loss). After S local steps with rate eta_l:

    c_i+ = c_i - c + (x - y_i) / (S eta_l)                     (option II)
    upload (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i)
    x <- x + eta_g mean_i Delta y_i,   c <- c + (1 / N) sum_{i in S} Delta c_i

The model mean is example-weighted over the round's clients (as FedAvg); the
control update is the paper's uniform sum, so c stays the mean of the c_i.

The client update is in step form (``FederatedAlgorithm.local``: the correction
c - c_i is the loss's per-client aux, option II runs in ``finish``), so SCAFFOLD
also runs under the streaming schedule (``make_round(..., schedule="stream")``;
its server keeps the stacked uploads, as it sums the Delta c_i).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.registry import register
from fedjax_sim.checks import concrete
from fedjax_sim.protocol import (FederatedAlgorithm, LocalSpec, client_update_from_local,
                                 masked_cross_entropy, tree_weighted_mean)


class ServerState(NamedTuple):
  params: Any  # global model x
  control: Any  # server control variate c (same pytree as params)


def scaffold(apply_fn: Callable, init_params: Callable, *, client_lr: float, batch_size: int,
             num_clients: int, epochs: int = 1, local_steps: int = 0,
             server_lr: float = 1.0, lr_decay: float = 1.0, client_momentum: float = 0.0,
             ) -> FederatedAlgorithm:
  """SCAFFOLD (option II) with global step eta_g = ``server_lr``.

  Args:
    num_clients: N, for the server control update c += (1/N) sum_{i in S} Delta c_i.
    lr_decay: the round's local rate is eta_l = client_lr * lr_decay**round
      (option II divides by that round's S * eta_l).
    client_momentum: must be 0 (SCAFFOLD's local steps are plain SGD).

  Raises:
    ValueError: client_momentum != 0.
  """
  if not concrete(client_momentum) or client_momentum:
    raise ValueError(f"SCAFFOLD uses plain local SGD; client_momentum={client_momentum} must "
                     "be 0 (set --config.client_momentum=0).")
  zeros = lambda rng: jax.tree.map(jnp.zeros_like, init_params(rng))

  def init(rng):
    params = init_params(rng)
    return ServerState(params, jax.tree.map(jnp.zeros_like, params))

  eta = lambda info: client_lr * lr_decay ** info.round.astype(jnp.float32)  # eta_l

  def begin(server, c_i, data, rng, info):
    del data, rng, info
    return server.params, jax.tree.map(lambda c, ci: c - ci, server.control, c_i)

  def loss(p, correction, x, y, m, r):
    del r
    linear = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(correction),
                                                 jax.tree.leaves(p)))
    return masked_cross_entropy(apply_fn(p, x), y, m) + linear

  def finish(server, c_i, correction, params, metrics, data, info):
    del correction, data
    steps = jnp.maximum(metrics["steps"], 1.0)
    c_new = jax.tree.map(lambda ci, c, x, y: ci - c + (x - y) / (steps * eta(info)),
                         c_i, server.control, server.params, params)
    # A client that took no steps (padding slot) keeps its control variate.
    c_new = jax.tree.map(lambda new, old: jnp.where(metrics["steps"] > 0, new, old),
                         c_new, c_i)
    delta_y = jax.tree.map(lambda y, x: y - x, params, server.params)
    delta_c = jax.tree.map(lambda a, b: a - b, c_new, c_i)
    return (delta_y, delta_c), c_new, metrics

  local = LocalSpec(begin=begin, loss=loss, optimizer=lambda info: optax.sgd(eta(info)),
                    finish=finish, epochs=epochs, batch_size=batch_size,
                    local_steps=local_steps)

  def server_update(server, uploads, weights, info, rng):
    delta_y, delta_c = uploads
    mean_dy = tree_weighted_mean(delta_y, weights)
    # c += (1/N) sum over the round's clients (uniform, as Algorithm 1; padding excluded).
    sum_dc = jax.tree.map(lambda d: jnp.tensordot(info.valid.astype(d.dtype), d, axes=1),
                          delta_c)
    params = jax.tree.map(lambda x, d: x + server_lr * d, server.params, mean_dy)
    control = jax.tree.map(lambda c, d: c + d / num_clients, server.control, sum_dc)
    return ServerState(params, control), {"control_norm": optax.global_norm(control)}

  return FederatedAlgorithm(
      name="scaffold", init=init, init_client=zeros,
      client_update=client_update_from_local(local), server_update=server_update,
      eval_params=lambda s, c: s.params, apply_fn=apply_fn, local=local)


@register("scaffold", scaffold, fixed=("server_lr",))
def _build(ctx, **knobs):
  """eta_g is the engine's ``server_lr`` (SCAFFOLD has no server optimizer)."""
  return scaffold(*ctx.model_fns(), num_clients=ctx.spec.num_clients, server_lr=ctx.server["lr"],
                  **ctx.client, **knobs)
