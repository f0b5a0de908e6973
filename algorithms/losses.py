"""Contrastive losses shared by the representation methods.

Shapes: B anchors (a public batch for the multi-model losses), D embedding
dim, M other models (FedMuscle: M sampled other users, N = M + 1 models in a
tuple). All losses take embeddings that the caller has already L2-normalized
(:func:`fedjax_sim.metrics.l2_normalize`) unless stated, and return float32 scalars.

Multi-model losses (FedMuscle, arXiv 2602.01626; ``docs/decisions.md#fedmuscle``):
:func:`pairwise_info_nce` (sum of InfoNCE over the anchor's model pairs),
:func:`gram_volume_loss` (GRAM, Cicchetti et al., arXiv 2412.11959, the
paper's Gramian comparison) and :func:`muscle_loss` (the N-tuple Muscle loss
with the negative-combination weights alpha_j), with :func:`muscle_loss_dense`
as its materialized reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.metrics import l2_normalize


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


# --------------------------------------------------------------------------
# Multi-model losses (FedMuscle, arXiv 2602.01626).
# --------------------------------------------------------------------------

def pairwise_info_nce(anchor: jax.Array, others: jax.Array, tau: float) -> jax.Array:
  """Pairwise multi-model InfoNCE: L^n_Pairwise = sum_{m in S_n} L^{n,m}_InfoNCE.

  The FedMuscle paper's "pairwise" baseline (arXiv 2602.01626, Sec. 3): one
  InfoNCE per (anchor model, other model) pair, summed over the M others.

  Args:
    anchor: float32 [B, D], the anchor model's L2-normalized representations
      of a public batch.
    others: float32 [M, B, D], the other models' L2-normalized representations
      of the same batch (row i of each is example i).
    tau: temperature.
  """
  return jnp.sum(jax.vmap(lambda o: info_nce(anchor, o, tau))(others))


def gram_volume(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Volume of the parallelotope spanned by k vectors: sqrt(det(A A^T)).

  Args: vectors float32 [..., k, D]. Returns float32 [...]. ``eps`` keeps the
  square root differentiable at a degenerate (zero-volume) tuple.
  """
  g = vectors @ jnp.swapaxes(vectors, -1, -2)
  return jnp.sqrt(jnp.maximum(jnp.linalg.det(g), 0.0) + eps)


def gram_volume_loss(anchor: jax.Array, others: jax.Array, tau: float) -> jax.Array:
  """GRAM contrastive loss (Cicchetti et al., "Gramian Multimodal Representation
  Learning and Alignment", ICLR 2025, arXiv 2412.11959; code github.com/ispamm/GRAM).

  vol[i, j] = Volume(anchor_i, others[0]_j, ..., others[M-1]_j) (the Gram
  determinant of the (M+1) vectors); logits = -vol / tau; the loss is the mean
  of the two cross-entropies (anchor -> tuple and tuple -> anchor) with the
  matching index as target, as in GRAM's ``volume_computation`` + symmetric
  cross-entropy. FedMuscle's comparison "Gramian" loss (arXiv 2602.01626).
  GRAM's data-anchor matching term (DAM) is not included.

  Args:
    anchor: float32 [B, D] L2-normalized; others: float32 [M, B, D] L2-normalized.
    tau: temperature.

  Memory: B^2 (M+1)^2 floats for the Gram matrices.
  """
  b = anchor.shape[0]
  tuples = jnp.swapaxes(others, 0, 1)  # [B_j, M, D]
  vecs = jnp.concatenate([
      jnp.broadcast_to(anchor[:, None, None, :], (b, b, 1, anchor.shape[-1])),
      jnp.broadcast_to(tuples[None], (b, *tuples.shape))], axis=2)  # [B_i, B_j, M+1, D]
  logits = -gram_volume(vecs) / tau  # [B_i, B_j]
  labels = jnp.arange(b)
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels)))


def muscle_gamma(tau_n: float = 0.2, tau_n1: float = 0.15) -> float:
  """gamma = 1/tau^(N-1) - 1/tau^(N) (> 0 when tau^(N-1) < tau^(N)); 5/3 by default."""
  return 1.0 / tau_n1 - 1.0 / tau_n


def muscle_log_alpha(others: jax.Array, gamma: float) -> jax.Array:
  """log alpha_j = -gamma sum_{m < m'} z^m_{j_m} . z^m'_{j_m'} for every j in [B]^M.

  Args: others float32 [M, B, D] (L2-normalized). Returns float32 [B]*M
  (axis m indexes j_m). Built by broadcast sums of the M(M-1)/2 [B, B] Gram
  blocks; B^M floats. For M = 1 it is 0 (alpha = 1).
  """
  m_count, b = others.shape[:2]
  log_alpha = jnp.zeros((b,) * m_count, others.dtype)
  for m in range(m_count):
    for mp in range(m + 1, m_count):
      shape = [1] * m_count
      shape[m], shape[mp] = b, b
      log_alpha = log_alpha - gamma * (others[m] @ others[mp].T).reshape(shape)
  return log_alpha


def _muscle_positive(anchor, others, tau_n, gamma):
  """log of the positive term's numerator for every anchor i: float32 [B]."""
  pos = jnp.sum(jnp.einsum("bd,mbd->mb", anchor, others), axis=0) / tau_n
  m_count = others.shape[0]
  log_alpha_pos = jnp.zeros(anchor.shape[:1], anchor.dtype)
  for m in range(m_count):
    for mp in range(m + 1, m_count):
      log_alpha_pos = log_alpha_pos - gamma * jnp.sum(others[m] * others[mp], axis=-1)
  return pos + log_alpha_pos


def muscle_loss(anchor: jax.Array, others: jax.Array, tau_n: float = 0.2,
                tau_n1: float = 0.15) -> jax.Array:
  """The Muscle loss (FedMuscle, arXiv 2602.01626; docs/decisions.md#fedmuscle).

  For anchor user n with representations z^n_i and M other users' matrices z^m
  (the N = M + 1 tuple), negatives indexed by j = (j_1..j_M) in [B]^M::

      L^n = 1/B sum_i -log( alpha_(i..i) exp(sum_m z^n_i . z^m_i / tau_N)
                            / sum_j alpha_j exp(sum_m z^n_i . z^m_{j_m} / tau_N) )
      alpha_j = exp(-gamma sum_{m < m'} z^m_{j_m} . z^m'_{j_m'}),
      gamma = 1/tau_(N-1) - 1/tau_N.

  The denominator includes the positive (j = (i..i)) [ours]. With M = 1
  alpha = 1 and this is :func:`info_nce` at tau_N.

  Efficient form (ours, equal to the server-built ``Z^n S^T + log alpha`` without
  building S [B^M, D] or the logits [B, B^M]): the anchor-dependent part of a
  logit separates over the other users, sum_m A_m[i, j_m] with
  A_m = z^n z^m^T / tau_N [B, B], while alpha_j does not depend on the anchor.
  So the denominator is a multilinear contraction

      den_i = sum_j alpha_j prod_m exp(A_m[i, j_m]),

  done one axis at a time (contract j_M against exp(A_M) for every anchor,
  then j_(M-1) batched over anchors, ...), in log-stabilized form (per-factor
  maxima and a per-anchor renormalization after each contraction, with
  stop-gradient on the shifts, which cancel exactly).

  Memory (float32 words): O(B^M) + M B^2 + (M + 1) B D, independent of D
  beyond the inputs: log alpha, alpha and the first contraction's
  [B^(M-1), B] output are B^M each, and reverse mode keeps about one more.
  Measured (XLA temp buffers of jitted value_and_grad, B = D = 32,
  bench/muscle_cost.py): M = 3: 0.52 MiB, M = 4: 16 MiB (= 4 B^M words).
  :func:`muscle_loss_dense` needs O(B^(M+1)) (logits and their gradient: 8 MiB
  and 256 MiB = 2 B^(M+1) words), and a server-built S [B^M, D] would add B^M D more.
  Time: O(M B^2 D + B^(M+1)) multiply-adds.

  Args:
    anchor: float32 [B, D], the anchor model's L2-normalized representations of
      the public batch (gradients flow into it).
    others: float32 [M, B, D], M >= 1 other users' L2-normalized matrices of the
      same batch (received from the server; treat as constants).
    tau_n: tau^(N), 0.2 [paper].
    tau_n1: tau^(N-1), 0.15 [paper].

  Returns:
    float32 scalar, the mean over the B anchors.
  """
  m_count, b = others.shape[:2]
  gamma = muscle_gamma(tau_n, tau_n1)
  sg = jax.lax.stop_gradient
  a = jnp.einsum("id,mjd->mij", anchor, others) / tau_n  # [M, B_i, B_j]
  a_max = sg(jnp.max(a, axis=-1, keepdims=True))  # [M, B_i, 1]
  e = jnp.exp(a - a_max)
  log_alpha = muscle_log_alpha(others, gamma)
  la_max = sg(jnp.max(log_alpha))
  t = jnp.exp(log_alpha - la_max)  # [B]*M
  log_shift = la_max + jnp.sum(a_max[..., 0], axis=0)  # [B_i]
  # Contract j_M for every anchor: [B]*(M-1) + [B_i].
  t = jnp.tensordot(t, e[m_count - 1], axes=([m_count - 1], [1]))
  for m in range(m_count - 2, -1, -1):
    scale = sg(jnp.max(t, axis=tuple(range(t.ndim - 1))))  # [B_i]
    t = t / scale
    log_shift = log_shift + jnp.log(scale)
    t = jnp.einsum("...ji,ij->...i", t, e[m])  # contracts j_(m+1) (axis m)
  log_den = jnp.log(t) + log_shift
  return jnp.mean(log_den - _muscle_positive(anchor, others, tau_n, gamma))


def muscle_loss_dense(anchor: jax.Array, others: jax.Array, tau_n: float = 0.2,
                      tau_n1: float = 0.15) -> jax.Array:
  """:func:`muscle_loss` with the [B, B^M] logits materialized (reference).

  logits[i, j] = sum_m A_m[i, j_m] + log alpha_j by broadcast sums;
  cross-entropy at the flat index of (i, ..., i). Memory B^(M+1) + B^M words.
  Same arguments and value as :func:`muscle_loss`.
  """
  m_count, b = others.shape[:2]
  gamma = muscle_gamma(tau_n, tau_n1)
  a = jnp.einsum("id,mjd->mij", anchor, others) / tau_n
  logits = muscle_log_alpha(others, gamma)[None]  # [1] + [B]*M
  for m in range(m_count):
    shape = [b] + [1] * m_count
    shape[m + 1] = b
    logits = logits + a[m].reshape(shape)
  logits = logits.reshape(b, b ** m_count)
  diag = jnp.arange(b) * sum(b ** k for k in range(m_count))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, diag))
