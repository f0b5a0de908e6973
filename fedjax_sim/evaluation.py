"""Evaluation: global test accuracy/loss and each client's accuracy on its own test split."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithm import FederatedAlgorithm
from fedjax_sim.client_data import ClientData
from fedjax_sim.metrics import accuracy_spread


def make_evaluate(algorithm: FederatedAlgorithm, *, batch_size: int = 512, client_chunk: int = 64):
  """Returns a jitted ``evaluate(server_state, client_states, test: ClientData, test_x, test_y)``.

  Outputs (device arrays): ``client_correct`` float32 [C] and ``client_count``
  float32 [C] on each client's own test split (with its own ``eval_params``),
  and, for non-personalized algorithms, ``test_correct``/``test_loss_sum``
  over the global test set (test_x float32 [N_g, ...], test_y int32 [N_g]).
  """
  apply_fn = algorithm.apply_fn

  def per_client(server_state, client_state, x, y, mask):
    params = algorithm.eval_params(server_state, client_state)
    logits = apply_fn(params, x)
    m = mask.astype(jnp.float32)
    return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(m)

  def global_test(params, test_x, test_y):
    n = test_y.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xs = jnp.pad(test_x, [(0, pad)] + [(0, 0)] * (test_x.ndim - 1)).reshape(
        nb, batch_size, *test_x.shape[1:])
    ys = jnp.pad(test_y, (0, pad)).reshape(nb, batch_size)
    ms = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

    def batch(args):
      x, y, m = args
      logits = apply_fn(params, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(ce * m)

    correct, loss = jax.lax.map(batch, (xs, ys, ms))
    return jnp.sum(correct), jnp.sum(loss)

  def evaluate(server_state, client_states, test: ClientData, test_x, test_y):
    # lax.map with batch_size vmaps chunks of clients (bounded memory).
    chunk = min(client_chunk, test.y.shape[0])
    correct, count = jax.lax.map(
        lambda a: per_client(server_state, *a), (client_states, test.x, test.y, test.mask),
        batch_size=chunk)
    out = {"client_correct": correct, "client_count": count}
    if not algorithm.personalized:
      params = algorithm.eval_params(server_state, None)
      out["test_correct"], out["test_loss_sum"] = global_test(params, test_x, test_y)
    return out

  return jax.jit(evaluate)


def summarize(raw: dict[str, Any], num_test: int) -> dict[str, float]:
  """Host-side: turns :func:`make_evaluate` outputs into named float metrics.

  ``test_accuracy`` is the global test set's accuracy; for personalized
  algorithms it is the example-weighted accuracy over the clients' own test
  splits (there is no single global model).
  """
  raw = jax.tree.map(np.asarray, raw)
  count = raw["client_count"]
  has = count > 0
  acc = raw["client_correct"][has] / count[has]
  out = accuracy_spread(acc)
  if "test_correct" in raw:
    out["test_accuracy"] = float(raw["test_correct"]) / num_test
    out["test_loss"] = float(raw["test_loss_sum"]) / num_test
  else:
    out["test_accuracy"] = float(raw["client_correct"].sum() / max(count.sum(), 1))
  return out
