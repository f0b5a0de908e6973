"""FedAvg and the FedOpt family (server optimizers on the FedAvg pseudo-gradient).

* FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", arXiv 1602.05629, Algorithm 1: clients run E
  epochs of SGD with batch B from the global model; the server takes the
  example-weighted average.
* FedOpt: Reddi et al., "Adaptive Federated Optimization", arXiv 2003.00295,
  Algorithm 2: the server treats Delta = sum_k w_k (x - x_k) / sum_k w_k as a
  gradient and applies a server optimizer (FedAdam, FedYogi, FedAdagrad; tau is
  the optimizer's epsilon, eta the server learning rate). FedAvg is the special
  case SGD with eta = 1. We use optax's optimizers, which (unlike Algorithm 2)
  apply Adam's bias correction.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.protocol import (FederatedAlgorithm, LocalSpec, client_optimizer,
                                 client_update_from_local, masked_cross_entropy,
                                 reads_weighted_mean, tree_weighted_mean)
from fedjax_sim.algorithms.optimizers import scale_by_rss_outer_eps, server_optimizer  # noqa: F401
from fedjax_sim.algorithms.registry import register


class ServerState(NamedTuple):
  params: Any  # the global model pytree
  opt_state: Any  # server optimizer state


def fedavg(apply_fn: Callable, init_params: Callable[[jax.Array], Any], *,
           client_lr: float, batch_size: int, epochs: int = 1, local_steps: int = 0,
           client_momentum: float = 0.0, lr_decay: float = 1.0,
           server_opt: optax.GradientTransformation = optax.sgd(1.0),
           local_loss: Callable | None = None, name: str = "fedavg") -> FederatedAlgorithm:
  """FedAvg / FedOpt.

  Args:
    apply_fn: ``(params, x [B, ...]) -> logits [B, L]``.
    init_params: ``rng -> params`` for the global model.
    client_lr: client SGD learning rate eta_l.
    batch_size: B.  epochs: E.  local_steps: fixed steps instead of epochs (> 0).
    client_momentum: client SGD momentum (0 = plain SGD).
    lr_decay: client lr is ``client_lr * lr_decay**round``.
    server_opt: optax server optimizer applied to the pseudo-gradient.
    local_loss: ``(params, global_params, x, y, mask) -> scalar``; default is
      masked cross-entropy (FedProx adds its proximal term here).

  Upload: the client's pseudo-gradient x_global - x_k (same pytree as params). The client
  update is in step form (``FederatedAlgorithm.local``), so it also runs under the streaming
  schedule.
  """
  def ce_loss(params, global_params, x, y, mask):
    del global_params
    return masked_cross_entropy(apply_fn(params, x), y, mask)

  needs_global = local_loss is not None  # the default loss ignores x_global: no per-client copy
  local_loss = local_loss or ce_loss

  def init(rng):
    params = init_params(rng)
    return ServerState(params, server_opt.init(params))

  def begin(server_state, client_state, data, rng, info):
    del client_state, data, rng, info
    g = server_state.params  # start at x_global; a custom loss also sees it (aux)
    return g, (g if needs_global else ())

  def finish(server_state, client_state, aux, params, metrics, data, info):
    del aux, data, info
    delta = jax.tree.map(lambda a, b: a - b, server_state.params, params)
    return delta, client_state, metrics

  local = LocalSpec(
      begin=begin,
      loss=lambda p, aux, x, y, m, r: local_loss(p, aux if needs_global else None, x, y, m),
      optimizer=lambda info: client_optimizer(client_lr, client_momentum, lr_decay, info.round),
      finish=finish, epochs=epochs, batch_size=batch_size, local_steps=local_steps)

  @reads_weighted_mean
  def server_update(server_state, uploads, weights, info, rng):
    del info, rng
    delta = tree_weighted_mean(uploads, weights)
    updates, opt_state = server_opt.update(delta, server_state.opt_state, server_state.params)
    params = optax.apply_updates(server_state.params, updates)
    return ServerState(params, opt_state), {"update_norm": optax.global_norm(delta)}

  return FederatedAlgorithm(
      name=name, init=init, init_client=lambda rng: (),
      client_update=client_update_from_local(local), server_update=server_update,
      eval_params=lambda s, c: s.params, apply_fn=apply_fn, local=local)


@register("fedavg", fedavg, fixed=("local_loss",))
def _build_fedavg(ctx, **knobs):
  """FedAvg, or FedOpt with ``--config.server_optimizer`` (the engine's server knobs)."""
  return fedavg(*ctx.model_fns(), server_opt=ctx.server_opt(), **ctx.client, **knobs)


def _fedopt(opt_name: str):
  @register(f"fed{opt_name}", fedavg, fixed=("local_loss",))
  def build(ctx, **knobs):
    return fedavg(*ctx.model_fns(), server_opt=ctx.server_opt(opt_name), name=f"fed{opt_name}",
                  **ctx.client, **knobs)
  return build


for _opt in ("adam", "yogi", "adagrad"):  # FedAdam, FedYogi, FedAdagrad (arXiv 2003.00295)
  _fedopt(_opt)
