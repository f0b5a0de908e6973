"""Local-only training: every client trains its own model on its own data and
never communicates (the "Local" baseline of FedRE, FedMuscle, CoRe-Fed, ...).

Each client's model is per-client state (stacked [C, ...] by the engine). All
clients start from the same initialization (the run's ``init`` stream,
``fedjax_sim.seeding.jax_key(init_seed, "init")``, the key a global model's
server init gets), so differences come from the data only, and train E epochs whenever sampled.
"""
from __future__ import annotations

from typing import Callable

from fedjax_sim import seeding
from fedjax_sim.algorithms.registry import register
from fedjax_sim.protocol import (FederatedAlgorithm, LocalSpec, client_optimizer,
                                 client_update_from_local, masked_cross_entropy)


def local_only(apply_fn: Callable, init_params: Callable, *, client_lr: float,
               batch_size: int, epochs: int = 1, local_steps: int = 0,
               client_momentum: float = 0.0, lr_decay: float = 1.0,
               init_seed: int = 0) -> FederatedAlgorithm:
  """Local training baseline; ``eval_params`` is each client's own model."""
  def begin(server_state, params, data, rng, info):
    del server_state, data, rng, info
    return params, ()  # the client's own model; the loss needs nothing else

  def finish(server_state, params, aux, trained, metrics, data, info):
    del server_state, params, aux, data, info
    return (), trained, metrics

  local = LocalSpec(
      begin=begin, loss=lambda p, aux, x, y, m, r: masked_cross_entropy(apply_fn(p, x), y, m),
      optimizer=lambda info: client_optimizer(client_lr, client_momentum, lr_decay, info.round),
      finish=finish, epochs=epochs, batch_size=batch_size, local_steps=local_steps)

  return FederatedAlgorithm(
      name="local", init=lambda rng: (),
      init_client=lambda rng: init_params(seeding.jax_key(init_seed, "init")),
      client_update=client_update_from_local(local),
      server_update=lambda state, uploads, weights, info, rng: (state, {}),
      eval_params=lambda server_state, params: params, apply_fn=apply_fn, personalized=True,
      local=local)


@register("local", local_only, fixed=("init_seed",))
def _build(ctx, **knobs):
  return local_only(*ctx.model_fns(), init_seed=ctx.seed, **ctx.client, **knobs)
