"""q-FFL solved by q-FedAvg.

Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning",
ICLR 2020, arXiv 1905.10497, Algorithm 2 (q-FedAvg), as in ``docs/decisions.md#q-ffl``
(the baseline CoRe-Fed, arXiv 2602.00647, compares against). With client k's
local model w_k after E epochs of SGD from w at learning rate lr (the round's
decayed rate), F_k the client's training loss at w (+1e-10) and L = 1/lr:

  g_k = (w - w_k) / lr,  Delta_k = F_k^q g_k,
  h_k = q F_k^(q-1) ||g_k||^2 + L F_k^q,
  w <- w - sum_k Delta_k / sum_k h_k.

q = 0 reduces to the uniform average of the clients' models (tested). Padding
slots (``valid`` False) contribute nothing.

The client update is in step form (``FederatedAlgorithm.local``); F_k, which needs the
global model on all of the client's rows, is its ``prepare`` step, so under the streaming
schedule it is computed once per client before the slots run.

Axis legend: K cohort (padded), N examples, B batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.registry import register
from fedjax_sim.checks import concrete
from fedjax_sim.protocol import (FederatedAlgorithm, LocalSpec, client_optimizer,
                                 client_update_from_local, masked_cross_entropy)

PyTree = Any


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """sum of squares over every leaf (float32 scalar)."""
  return jax.tree.reduce(jnp.add, jax.tree.map(lambda a: jnp.sum(a * a), tree))


def qffl_step(params: PyTree, grads: PyTree, losses: jax.Array, lrs: jax.Array,
              valid: jax.Array, q: float) -> PyTree:
  """The q-FedAvg server step.

  Args:
    params: the global model w.
    grads: g_k stacked [K, ...] per params leaf (g_k = (w - w_k) / lr_k).
    losses: float32 [K], F_k at w (before the +1e-10).
    lrs: float32 [K], the client learning rates (L = 1/lr).
    valid: bool [K]; False slots are excluded.
    q: fairness knob (q = 0: uniform model average).
  """
  F = losses + 1e-10
  v = valid.astype(jnp.float32)
  fq = jnp.power(F, q) * v  # [K]
  sq = jax.vmap(tree_sq_norm)(grads)  # [K]
  if concrete(q):
    h = (q * jnp.power(F, q - 1.0) * sq if q != 0 else 0.0) + fq / lrs
  else:  # a swept (traced) q: the same branch as data
    h = jnp.where(q != 0, q * jnp.power(F, q - 1.0) * sq, 0.0) + fq / lrs
  h = jnp.sum(jnp.where(valid, h, 0.0))
  num = jax.tree.map(lambda g: jnp.tensordot(fq.astype(g.dtype), g, axes=1), grads)
  return jax.tree.map(lambda p, n: p - n / jnp.maximum(h, 1e-12).astype(p.dtype), params, num)


def qffl(apply_fn: Callable, init_params: Callable[[jax.Array], PyTree], *, q: float = 1.0,
         client_lr: float, batch_size: int, epochs: int = 1, local_steps: int = 0,
         client_momentum: float = 0.0, lr_decay: float = 1.0,
         name: str = "qffl") -> FederatedAlgorithm:
  """q-FedAvg with fairness knob ``q`` (>= 0); client arguments as FedAvg.

  Uploads: ``{"g": (w - w_k) / lr (params pytree), "loss": F_k float32 [],
  "lr": float32 []}``. Server state: the params pytree. F_k is the masked mean
  cross-entropy of w on all of client k's training rows, computed in batches of B.
  """
  if concrete(q) and q < 0:
    raise ValueError(f"q-FFL q={q} must be >= 0; set --config.qffl.q.")

  def client_loss(params, data):
    n_rows = data.y.shape[0]
    xs = data.x.reshape(n_rows // batch_size, batch_size, *data.x.shape[1:])
    ys = data.y.reshape(n_rows // batch_size, batch_size)
    ms = data.mask.reshape(n_rows // batch_size, batch_size)

    def one(args):
      x, y, m = args
      ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y)
      return jnp.sum(ce * m)

    return jnp.sum(jax.lax.map(one, (xs, ys, ms))) / jnp.maximum(jnp.sum(data.mask), 1)

  lr_of = lambda info: client_lr * (lr_decay ** info.round.astype(jnp.float32)
                                    if lr_decay != 1.0 else 1.0)

  def begin(w, client_state, data, rng, info, F):
    del client_state, data, rng, info
    return w, F  # start at the global model; F_k rides along to finish

  def finish(w, client_state, F, params, metrics, data, info):
    del data
    lr = lr_of(info)
    g = jax.tree.map(lambda a, b: (a - b) / lr, w, params)
    return ({"g": g, "loss": F, "lr": jnp.asarray(lr, jnp.float32)}, client_state,
            {**metrics, "loss_at_global": F})

  local = LocalSpec(
      begin=begin,
      loss=lambda p, F, x, y, m, r: masked_cross_entropy(apply_fn(p, x), y, m),
      optimizer=lambda info: client_optimizer(client_lr, client_momentum, lr_decay, info.round),
      finish=finish, epochs=epochs, batch_size=batch_size, local_steps=local_steps,
      prepare=lambda w, client_state, data, info: client_loss(w, data))

  def server_update(w, uploads, weights, info, rng):
    del weights, rng
    new = qffl_step(w, uploads["g"], uploads["loss"], uploads["lr"], info.valid, q)
    delta = jax.tree.map(lambda a, b: a - b, w, new)
    return new, {"update_norm": optax.global_norm(delta)}

  return FederatedAlgorithm(
      name=name, init=init_params, init_client=lambda rng: (),
      client_update=client_update_from_local(local), server_update=server_update,
      eval_params=lambda s, c: s, apply_fn=apply_fn, local=local)


@register("qffl", qffl)
def _build(ctx, **knobs):
  """q-FFL with ``--config.qffl.q``; client settings as FedAvg."""
  return qffl(*ctx.model_fns(), **ctx.client, **knobs)
