"""Per-client accuracy spread, fairness and representation metrics.

Names as in ``docs/decisions.md#fairness-metrics`` (our decisions where the paper's
definitions were not found): ``client_acc_mean``, ``client_acc_std``,
``client_acc_var``, ``client_acc_worst10`` (mean of the worst 10% of
clients, at least one), ``jain_index`` (Jain et al. 1984: (sum a)^2 / (n sum
a^2)), ``d_cosine`` (angle in radians between the per-client accuracy vector
and the all-ones vector, FedMDFG's fairness angle, what the official CoRe-Fed
code computes) and ``d_manhattan`` (sum_i |acc_i - mean acc| in percentage
points); ``repr_disparity`` = mean_i (1 - cos(z_i, z_g)) with z_i client i's
L2-normalized mean embedding and z_g the L2-normalized mean of the z_i
(CoRe-Fed, arXiv 2602.00647).

Axis legend: C clients, N examples per client, D embedding dim.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def sample_std(values, axis=0) -> np.ndarray:
  """The sample standard deviation (ddof = 1) over seeds or runs, NumPy.

  Reports give spreads over seeds with this estimator; one value gives 0.0
  (no spread can be estimated), not NaN.

  Args:
    values: float array-like, the repeated axis at ``axis``.
  """
  v = np.asarray(values, np.float64)
  if v.shape[axis] < 2:
    return np.zeros(np.delete(v.shape, axis)) if v.ndim > 1 else np.float64(0.0)
  return np.std(v, axis=axis, ddof=1)


def accuracy_spread(acc: np.ndarray) -> dict[str, float]:
  """Summary of per-client accuracies (NumPy, host side).

  Args:
    acc: float [C'] accuracies in [0, 1] of the clients that have test data.

  Returns:
    dict of python floats (accuracies in [0, 1], d_cosine in radians,
    d_manhattan in percentage points).
  """
  acc = np.asarray(acc, np.float64)
  if acc.size == 0:
    return {}
  k = max(1, int(np.ceil(0.1 * acc.size)))
  norm = np.linalg.norm(acc)
  cos = acc.sum() / (np.sqrt(acc.size) * norm) if norm > 0 else 1.0
  return {
      "client_acc_mean": float(acc.mean()),
      "client_acc_std": float(acc.std()),
      "client_acc_var": float(acc.var()),
      "client_acc_worst10": float(np.sort(acc)[:k].mean()),
      "jain_index": float(acc.sum() ** 2 / (acc.size * np.sum(acc ** 2))) if norm > 0 else 1.0,
      "d_cosine": float(np.arccos(np.clip(cos, -1.0, 1.0))),
      "d_manhattan": float(np.sum(np.abs(acc - acc.mean())) * 100.0),
  }


def _normalize(z, eps=1e-12):
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def representation_disparity(z: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """mean_i (1 - cos(z_i, z_g)) over valid clients (jittable).

  Args:
    z: float32 [C, D] client embeddings (normalized inside).
    valid: bool [C]; invalid rows are ignored (and excluded from z_g).

  Returns:
    (disparity float32 [], z_g float32 [D]) with z_g = normalize(mean of valid
    normalized z_i); disparity 0 when no client is valid.
  """
  zn = _normalize(z)
  v = valid.astype(zn.dtype)
  zg = _normalize(jnp.sum(zn * v[:, None], 0) / jnp.maximum(jnp.sum(v), 1.0))
  d = jnp.sum((1.0 - zn @ zg) * v) / jnp.maximum(jnp.sum(v), 1.0)
  return d, zg


def make_representation_eval(embed_fn: Callable, *, client_chunk: int = 32):
  """Jitted ``(params, x [C, N, ...], mask [C, N]) -> dict`` with the global model.

  z_i = normalize(mean over client i's real rows of embed_fn(params, x)[1]);
  returns ``repr_disparity`` (float32 []) and ``client_embedding`` ([C, D]).
  Clients without rows are excluded.

  Args:
    embed_fn: ``(params, x [B, ...]) -> (logits [B, L], z [B, D])``.
  """
  def client_mean(params, x, mask):
    _, z = embed_fn(params, x)
    m = mask.astype(z.dtype)
    return jnp.sum(z * m[:, None], 0) / jnp.maximum(jnp.sum(m), 1.0)

  def run(params, x, mask):
    chunk = min(client_chunk, x.shape[0])
    zs = jax.lax.map(lambda a: client_mean(params, *a), (x, mask), batch_size=chunk)
    d, _ = representation_disparity(zs, jnp.any(mask, axis=1))
    return {"repr_disparity": d, "client_embedding": _normalize(zs)}

  return jax.jit(run)
