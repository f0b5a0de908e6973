"""Evaluation: global test accuracy/loss and each client's accuracy on its own test split."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import text
from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.client_data import AnyClientData, gather_clients
from fedjax_sim.metrics import accuracy_spread


def make_evaluate(algorithm: FederatedAlgorithm, *, batch_size: int = 512, client_chunk: int = 64):
  """Returns a jitted ``evaluate(server_state, client_states, test, test_x, test_y)``.

  ``test`` is the clients' test splits, padded (:class:`~fedjax_sim.client_data.ClientData`
  [C, N, ...]) or flat (:class:`~fedjax_sim.client_data.FlatClientData`); both give the same
  numbers.

  Outputs (device arrays): ``client_correct`` float32 [C] and ``client_count``
  float32 [C] on each client's own test split (with its own ``eval_params``),
  and, for non-personalized algorithms, ``test_correct``/``test_loss_sum``
  over the global test set (test_x float32 [N_g, ...], test_y int32 [N_g]).

  A sequence task (labels int32 [N, T], logits [N, T, V]) is scored per token,
  over the tokens that count (:func:`fedjax_sim.text.token_weights`: real rows,
  targets >= 0): ``client_count`` counts tokens, and ``test_count`` (float32 [])
  joins the global outputs (:func:`summarize` divides by it).
  """
  apply_fn = algorithm.apply_fn

  def per_client_fn(eval_params, apply):
    def per_client(server_state, client_state, x, y, mask):
      logits = apply(eval_params(server_state, client_state), x)
      if y.ndim > 1:  # tokens [N, T]
        w = text.token_weights(y, mask)
        return jnp.sum(text.token_correct(logits, y) * w), jnp.sum(w)
      m = mask.astype(jnp.float32)
      return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(m)
    return per_client

  def clients_accuracy(per_client, server_state, client_states, test, ids):
    # lax.map with batch_size vmaps chunks of clients (bounded memory); each client's test
    # rows are read from either storage inside the map (a flat test split is never padded
    # to [C, N, ...]).
    def one(args):
      client_state, gid = args
      d = gather_clients(test, gid)
      return per_client(server_state, client_state, d.x, d.y, d.mask)
    return jax.lax.map(one, (client_states, ids), batch_size=min(client_chunk, ids.shape[0]))

  def global_test(params, test_x, test_y, apply_fn=apply_fn):
    n = test_y.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    xs = jnp.pad(test_x, [(0, pad)] + [(0, 0)] * (test_x.ndim - 1)).reshape(
        nb, batch_size, *test_x.shape[1:])
    ys = jnp.pad(test_y, [(0, pad)] + [(0, 0)] * (test_y.ndim - 1)).reshape(
        nb, batch_size, *test_y.shape[1:])
    ms = (jnp.arange(nb * batch_size) < n).reshape(nb, batch_size)

    def batch(args):
      x, y, m = args
      logits = apply_fn(params, x)
      if y.ndim > 1:  # tokens [B, T]
        w = text.token_weights(y, m)
        return (jnp.sum(text.token_correct(logits, y) * w),
                jnp.sum(text.token_cross_entropy(logits, y) * w), jnp.sum(w))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(ce * m)

    if test_y.ndim > 1:
      correct, loss, count = jax.lax.map(batch, (xs, ys, ms))
      return jnp.sum(correct), jnp.sum(loss), jnp.sum(count)
    correct, loss = jax.lax.map(batch, (xs, ys, ms))
    return jnp.sum(correct), jnp.sum(loss)

  def evaluate(server_state, client_states, test: AnyClientData, test_x, test_y):
    if algorithm.pools:  # every pool's clients with that pool's model
      out, corrects, counts = {}, [], []
      for pool, cs in zip(algorithm.pools, client_states):
        ids = jnp.asarray(pool.client_ids, jnp.int32)
        correct, count = clients_accuracy(
            per_client_fn(pool.eval_params, pool.apply_fn), server_state, cs, test, ids)
        out[f"{pool.name}/client_correct"], out[f"{pool.name}/client_count"] = correct, count
        if pool.global_model:
          params = pool.eval_params(server_state, None)
          out[f"{pool.name}/global_test_correct"] = global_test(
              params, test_x, test_y, pool.apply_fn)[0]
        corrects.append(correct)
        counts.append(count)
      out["client_correct"] = jnp.concatenate(corrects)
      out["client_count"] = jnp.concatenate(counts)
      return out
    ids = jnp.arange(test.num_examples.shape[0], dtype=jnp.int32)
    correct, count = clients_accuracy(per_client_fn(algorithm.eval_params, apply_fn),
                                      server_state, client_states, test, ids)
    out = {"client_correct": correct, "client_count": count}
    if not algorithm.personalized:
      params = algorithm.eval_params(server_state, None)
      out["test_correct"], out["test_loss_sum"], *count = global_test(params, test_x, test_y)
      if count:  # a sequence task: per token
        out["test_count"] = count[0]
    return out

  return jax.jit(evaluate)


def summarize(raw: dict[str, Any], num_test: int) -> dict[str, float]:
  """Host-side: turns :func:`make_evaluate` outputs into named float metrics.

  ``test_accuracy`` is the global test set's accuracy; for personalized and
  pooled algorithms it is the example-weighted accuracy over the clients' own
  test splits (there is no single global model). Pools also get
  ``<pool>/test_accuracy`` and ``<pool>/client_acc_mean``. A sequence task's
  global accuracy and loss are per token (divided by ``raw["test_count"]``, not
  ``num_test``).
  """
  raw = jax.tree.map(np.asarray, raw)
  pools = [k[: -len("/client_correct")] for k in raw if k.endswith("/client_correct")]
  extra = {}
  for name in pools:
    c, n = raw.pop(f"{name}/client_correct"), raw.pop(f"{name}/client_count")
    extra[f"{name}/test_accuracy"] = float(c.sum() / max(n.sum(), 1))
    extra[f"{name}/client_acc_mean"] = float(np.mean(c[n > 0] / n[n > 0]))
    if f"{name}/global_test_correct" in raw:
      extra[f"{name}/global_test_accuracy"] = float(raw.pop(f"{name}/global_test_correct")) / num_test
  count = raw["client_count"]
  has = count > 0
  acc = raw["client_correct"][has] / count[has]
  out = accuracy_spread(acc)
  if "test_correct" in raw:
    denom = float(raw["test_count"]) if "test_count" in raw else num_test
    out["test_accuracy"] = float(raw["test_correct"]) / max(denom, 1)
    out["test_loss"] = float(raw["test_loss_sum"]) / max(denom, 1)
  else:
    out["test_accuracy"] = float(raw["client_correct"].sum() / max(count.sum(), 1))
  out.update(extra)
  return out
