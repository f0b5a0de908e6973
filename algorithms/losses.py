"""Contrastive losses shared by the representation methods.

Shapes: B anchors, D embedding dim. All losses take embeddings that the
caller has already L2-normalized unless stated, and return float32 scalars.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def l2_normalize(z: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """z / max(||z||, eps) along ``axis``."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=axis, keepdims=True), eps)


def info_nce(anchors: jax.Array, positives: jax.Array, tau: float) -> jax.Array:
  """InfoNCE (van den Oord et al. 2018, arXiv 1807.03748, Eq. 4) with in-batch negatives.

  L = -1/B sum_i log( exp(a_i . p_i / tau) / sum_j exp(a_i . p_j / tau) ).

  Args:
    anchors: float32 [B, D], L2-normalized.
    positives: float32 [B, D], L2-normalized; row i is anchor i's positive,
      the other rows its negatives (the denominator includes the positive).
    tau: temperature (> 0).
  """
  logits = anchors @ positives.T / tau
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.arange(anchors.shape[0])))


def nt_xent(z1: jax.Array, z2: jax.Array, tau: float) -> jax.Array:
  """NT-Xent (SimCLR, Chen et al. 2020, arXiv 2002.05709, Eq. 1) over 2B views.

  Each of the 2B normalized views has its other view as positive and the
  remaining 2B - 2 views as negatives; self-similarity is excluded.

  Args:
    z1, z2: float32 [B, D] (normalized inside).
    tau: temperature.
  """
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
  n = z.shape[0]
  b = n // 2
  sim = z @ z.T / tau
  sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)
  targets = jnp.concatenate([jnp.arange(b, n), jnp.arange(0, b)])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sim, targets))


def nt_xent_single(anchor: jax.Array, positive: jax.Array, negatives: jax.Array,
                   tau: float, negative_mask: jax.Array | None = None) -> jax.Array:
  """NT-Xent for one anchor: -log(e^{a.p/tau} / (e^{a.p/tau} + sum_j e^{a.n_j/tau})).

  Used by CoRe-Fed's embedding alignment (anchor = client embedding,
  positive = global embedding, negatives = other clients' embeddings).

  Args:
    anchor: float32 [D]; positive: float32 [D]; negatives: float32 [M, D]
      (all normalized inside); negative_mask: bool [M], False entries ignored.
  """
  a, p, negs = l2_normalize(anchor), l2_normalize(positive), l2_normalize(negatives)
  pos = jnp.dot(a, p) / tau
  neg = negs @ a / tau
  if negative_mask is not None:
    neg = jnp.where(negative_mask, neg, -jnp.inf)
  return -pos + jax.nn.logsumexp(jnp.concatenate([pos[None], neg]))
