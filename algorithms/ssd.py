"""SSD: Soft Separation and Distillation (Fang et al., ICCV 2025, arXiv 2508.01251).

Official code: github.com/hc-fang/ssd (``methods/loss.py``,
``methods/fedalignuniform``). ``docs/decisions.md#ssd`` records the decisions;
this module follows them:

* Base: FedAlignUniform (:mod:`fedjax_sim.algorithms.ssl`): L_align + beta
  L_uniform, t = 2, z = L2-normalized projector output. [code]
* DSR, dimension-scaled soft separation [code]: Q a random orthogonal D x D
  matrix, fixed and seeded (QR of a Gaussian matrix). Client k owns the
  disjoint block of b = D // C columns Q_k = Q[:, k b : (k + 1) b], indexed by
  its CLIENT ID (the official code indexes by position in the sampled list,
  which we treat as a bug). As in the code, the client's "subspace" is the
  whole basis with its own block's columns scaled by s = sqrt(10), S = Q
  diag(1, ..., s, ..., 1), so z S S^T = z + (s^2 - 1) (z Q_k) Q_k^T: a soft pull
  toward the client's directions, not a projection onto them (with a plain
  projection the scale would cancel under normalization). Target =
  normalize(stopgrad(z S S^T)); L_DSR = ||z - target||_F / B (Frobenius norm,
  not squared, over the real rows, divided by their number).
* PD, projector distillation [code]: KL(softmax(z_proj / T) || softmax(h_enc /
  T)), T = 0.5, mean over real rows ("batchmean"), gradients through both
  sides; z_proj is the RAW projector output, h_enc the raw encoder output (the
  code's ``distillation_loss(z_enc, z_pro)``), so the projector's output dim
  equals the encoder's.
* Total [paper notes]: L_align + beta L_uniform + gamma L_DSR + delta L_PD,
  beta = 1, gamma = 1, delta = 0.1. DSR and PD average the two views' values.
  gamma = delta = 0 is exactly FedAlignUniform (tested).

Eq. numbers: DSR is the paper's Sec. 4.1 (dimension-scaled regularization),
PD Sec. 4.2; we could not read the PDF, so equations follow the code above.

Axis legend: C clients, K cohort, N examples, B batch, D embedding.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.metrics import l2_normalize
from fedjax_sim.algorithms.ssl import (SSLModel, align_uniform_loss, fed_ssl, fedalignuniform,
                                        fedsimclr)
from fedjax_sim.algorithms.registry import register
from fedjax_sim.augment import AugmentConfig


def dsr_basis(dim: int, seed: int = 0) -> np.ndarray:
  """The fixed random orthogonal basis Q: float32 [D, D] (columns orthonormal).

  QR of a standard Gaussian matrix from ``np.random.default_rng(seed)``, with
  column signs fixed by diag(R) > 0 (Haar-distributed).
  """
  a = np.random.default_rng(seed).standard_normal((dim, dim))
  q, r = np.linalg.qr(a)
  return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def dsr_block_size(dim: int, num_clients: int) -> int:
  """b = D // C directions per client (disjoint blocks).

  Raises:
    ValueError: D < C (no disjoint block of at least one direction exists).
  """
  if dim < num_clients:
    raise ValueError(f"DSR needs embedding dim D={dim} >= number of clients C={num_clients} "
                     "for disjoint blocks; raise --config.<method>.dim.")
  return dim // num_clients


def client_block(basis: jax.Array, client_id: jax.Array, block: int) -> jax.Array:
  """Q_k = basis[:, k b : (k + 1) b], float32 [D, b], for client id k (int32 [], traced)."""
  return jax.lax.dynamic_slice_in_dim(basis, client_id * block, block, axis=1)


def dsr_target(z: jax.Array, q_block: jax.Array, scale: float) -> jax.Array:
  """normalize(stopgrad(z S S^T)) with S S^T = I + (s^2 - 1) Q_k Q_k^T; z [B, D] -> [B, D]."""
  zs = z + (scale ** 2 - 1.0) * (z @ q_block) @ q_block.T
  return l2_normalize(jax.lax.stop_gradient(zs))


def _safe_norm(sq: jax.Array) -> jax.Array:
  """sqrt(sq) with a zero (not NaN) gradient at sq = 0."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def dsr_loss(z: jax.Array, q_block: jax.Array, scale: float = float(np.sqrt(10.0)),
             mask: Optional[jax.Array] = None) -> jax.Array:
  """L_DSR = ||z - normalize(stopgrad(z S S^T))||_F / B over real rows.

  Args:
    z: float32 [B, D], L2-normalized projector outputs.
    q_block: float32 [D, b], the client's block of the basis.
    scale: s (sqrt(10), the official code's value).
    mask: bool [B] or None.
  """
  diff = z - dsr_target(z, q_block, scale)
  if mask is not None:
    diff = jnp.where(mask[:, None], diff, 0.0)
    n = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  else:
    n = z.shape[0]
  return _safe_norm(jnp.sum(jnp.square(diff))) / n


def pd_loss(z_proj: jax.Array, h_enc: jax.Array, temperature: float = 0.5,
            mask: Optional[jax.Array] = None) -> jax.Array:
  """L_PD = mean_i KL(softmax(z_i / T) || softmax(h_i / T)) (batchmean), both sides trained.

  Args: z_proj float32 [B, D] raw projector output; h_enc float32 [B, D] raw
  encoder output; temperature T; mask bool [B] or None.
  """
  lp = jax.nn.log_softmax(z_proj / temperature, axis=-1)
  lq = jax.nn.log_softmax(h_enc / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  if mask is None:
    return jnp.mean(kl)
  return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def ssd_loss(h1: jax.Array, h2: jax.Array, z1: jax.Array, z2: jax.Array,
             mask: Optional[jax.Array], q_block: jax.Array, *, beta: float = 1.0,
             gamma: float = 1.0, delta: float = 0.1, t: float = 2.0,
             scale: float = float(np.sqrt(10.0)), pd_temperature: float = 0.5) -> jax.Array:
  """SSD's local loss for one batch of two views.

  L = L_align + beta (L_unif(z1) + L_unif(z2)) / 2
      + gamma (L_DSR(z1) + L_DSR(z2)) / 2 + delta (L_PD(z1, h1) + L_PD(z2, h2)) / 2,
  with z normalized inside for the first three terms and raw for PD.

  Args:
    h1, h2: float32 [B, D] raw encoder outputs of the two views.
    z1, z2: float32 [B, D] raw projector outputs.
    mask: bool [B] or None.
    q_block: float32 [D, b] the client's DSR block.
    beta, gamma, delta: Python floats or float32 [] arrays.
  """
  n1, n2 = l2_normalize(z1), l2_normalize(z2)
  dsr = 0.5 * (dsr_loss(n1, q_block, scale, mask) + dsr_loss(n2, q_block, scale, mask))
  pd = 0.5 * (pd_loss(z1, h1, pd_temperature, mask) + pd_loss(z2, h2, pd_temperature, mask))
  # Every term is always computed (weights may be traced arrays, see ServerState.coef).
  return align_uniform_loss(n1, n2, mask, beta=beta, t=t) + gamma * dsr + delta * pd


def ssd(model: SSLModel, input_shape: Sequence[int], *, num_clients: int, beta: float = 1.0,
        gamma: float = 1.0, delta: float = 0.1, t: float = 2.0,
        scale: float = float(np.sqrt(10.0)), pd_temperature: float = 0.5, basis_seed: int = 0,
        name: str = "ssd", **kwargs) -> FederatedAlgorithm:
  """SSD on the FedAlignUniform base (:func:`fedjax_sim.algorithms.ssl.fed_ssl`).

  Args:
    model: encoder + projector (projector output dim = encoder dim = D).
    input_shape: one example's shape.
    num_clients: C, for the DSR blocks b = D // C.
    beta, gamma, delta: weights of uniformity, DSR and PD (paper: 1, 1, 0.1);
      stored in ``ServerState.coef``, so gamma = delta = 0 (FedAlignUniform)
      and the ablations run the same compiled round.
    t: uniformity temperature (2).  scale: DSR scale s (sqrt(10)).
    pd_temperature: PD softmax temperature (0.5).
    basis_seed: seed of the fixed basis Q (independent of the run seed, so every
      run of an experiment uses the same Q).
    **kwargs: :func:`fed_ssl` options (rounds, client_lr, batch_size, ...).
  """
  basis = jnp.asarray(dsr_basis(model.dim, basis_seed))
  block = dsr_block_size(model.dim, num_clients)

  def loss(h1, h2, z1, z2, mask, client_id, coef):
    q = client_block(basis, client_id, block)
    return ssd_loss(h1, h2, z1, z2, mask, q, beta=coef["beta"], gamma=coef["gamma"],
                    delta=coef["delta"], t=t, scale=scale, pd_temperature=pd_temperature)

  return fed_ssl(model, input_shape, loss, coef={"beta": beta, "gamma": gamma, "delta": delta},
                 name=name, **kwargs)


# ----------------------------------------------------------------------------- registry glue

_MODEL_FIELDS = ("dim", "encoder_kind", "encoder_hidden", "projector_hidden")


def _register_ssl(name: str, constructor) -> None:
  """Registers an SSL method: knobs ``--config.<name>.<knob>`` are the constructor's, the
  :func:`~fedjax_sim.algorithms.ssl.fed_ssl` options (weight_decay, cosine, augment) and the
  encoder + projector's fields (:class:`~fedjax_sim.algorithms.ssl.SSLModel`: dim,
  encoder_kind, encoder_hidden, projector_hidden). These methods build their own encoder; the
  engine's classification model (``--config.model``) is not used."""
  @register(name, (constructor, fed_ssl, SSLModel),
            fixed=("model", "input_shape", "loss", "coef", "rounds", "momentum", "parent",
                   "num_clients"))
  def build(ctx, **knobs):
    model = SSLModel(**{k: knobs.pop(k) for k in _MODEL_FIELDS if k in knobs})
    if "augment" in knobs and not isinstance(knobs["augment"], AugmentConfig):
      knobs["augment"] = AugmentConfig.from_dict(dict(knobs["augment"]))
    if constructor is ssd:
      knobs["num_clients"] = ctx.spec.num_clients
    c = ctx.client
    return constructor(model, tuple(ctx.spec.input_shape), rounds=ctx.rounds,
                       client_lr=c["client_lr"], momentum=c["client_momentum"],
                       batch_size=c["batch_size"], epochs=c["epochs"],
                       local_steps=c["local_steps"], **knobs)


for _name, _fn in (("fedalignuniform", fedalignuniform), ("fedsimclr", fedsimclr), ("ssd", ssd)):
  _register_ssl(_name, _fn)
