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
(CoRe-Fed, arXiv 2602.00647; the report's evaluation of it is
``repr_metrics.make_repr_eval(..., metrics=("disparity",))``).

:func:`l2_normalize` is the package's one L2-normalization (a leaf module, so
the engine's representation metrics and the algorithms' losses import it
without a cycle).

Axis legend: C clients, N examples per client, D embedding dim.
"""
from __future__ import annotations

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


def l2_normalize(z: jax.Array, axis: int = -1, eps: float = 1e-12, *,
                 rsqrt: bool = False) -> jax.Array:
  """z / max(||z||, eps) along ``axis``, with a finite gradient at z = 0 (jittable).

  The one L2-normalization of the package (the engine's representation
  metrics, the contrastive losses, SSD/FedSimCLR, FedMuscle, CoRe-Fed).
  ``jnp.linalg.norm``'s gradient at a zero vector is NaN, and a masked-out
  zero row (a padded example through a bias-free layer) still sends
  0 * NaN = NaN into the parameters. Zero rows go through the norm as ones
  (the double-``where`` trick), so their gradient is finite (z / eps, as
  torch's ``F.normalize``), while every nonzero row runs exactly the ops of
  ``z / max(norm(z), eps)``: values and gradients are bit for bit those.

  Args:
    z: float array [..., D, ...]; normalized along ``axis``.
    axis: the axis normalized.
    eps: lower bound on the norm (a zero row stays zero).
    rsqrt: evaluate ``z * rsqrt(max(sum z^2, eps^2))`` instead (one rsqrt and a
      multiply, no divide). The same function up to rounding (last-ulp
      differences), also finite at zero; CoRe-Fed uses it because its
      committed results were computed with it (``docs/decisions.md#core-fed``).

  Returns:
    float array, the shape and dtype of ``z``.
  """
  if rsqrt:
    sq = jnp.sum(z * z, axis=axis, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))
  nonzero = jnp.any(z != 0, axis=axis, keepdims=True)
  norm = jnp.linalg.norm(jnp.where(nonzero, z, 1.0), axis=axis, keepdims=True)
  return z / jnp.maximum(jnp.where(nonzero, norm, 0.0), eps)


def representation_disparity(z: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """mean_i (1 - cos(z_i, z_g)) over valid clients (jittable).

  Args:
    z: float32 [C, D] client embeddings (normalized inside).
    valid: bool [C]; invalid rows are ignored (and excluded from z_g).

  Returns:
    (disparity float32 [], z_g float32 [D]) with z_g = normalize(mean of valid
    normalized z_i); disparity 0 when no client is valid.
  """
  zn = l2_normalize(z)
  v = valid.astype(zn.dtype)
  zg = l2_normalize(jnp.sum(zn * v[:, None], 0) / jnp.maximum(jnp.sum(v), 1.0))
  d = jnp.sum((1.0 - zn @ zg) * v) / jnp.maximum(jnp.sum(v), 1.0)
  return d, zg

