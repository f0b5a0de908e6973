"""Representation mapping (RM) and the split local model of model-heterogeneous FL.

FedRE (Zhu et al., "FedRE: A Representation Entanglement Framework for
Model-Heterogeneous Federated Learning", arXiv 2511.22265, CVPR 2026) and the
prototype baselines (FedProto, arXiv 2105.00243; FedGH, arXiv 2303.13137)
split every client's model into a feature extractor ``g_k`` (architecture
differs per client), a representation mapping ``RM`` to a COMMON dimension D,
and a classifier head ``f`` (D -> L, the same shape for every client, so it can
be shared). RM (``docs/decisions.md#fedre``): average pooling to a common dimension
(default), max pooling, FC. The official code (github.com/AIResearch-Group/
FedRE, ``HtFLlib/system/flcore/trainmodel/models.py``) replaces each backbone's
classifier by ``nn.AdaptiveAvgPool1d(feature_dim)`` and trains a linear head
``nn.Linear(feature_dim, num_classes)``; we do the same on top of the
penultimate embedding of a :data:`fedjax_sim.models.MODEL_ZOO` model
(``return_embedding=True``; its own classifier layer is left unused).

RM kinds (``rm``):

* ``avg``: adaptive average pooling, PyTorch ``AdaptiveAvgPool1d`` bins: output
  i averages input entries [floor(i d / D), ceil((i + 1) d / D)) (when d < D
  entries repeat). No parameters.
* ``max``: adaptive max pooling over the same bins. No parameters.
* ``fc``: a learned linear map d -> D (part of the client's extractor; trained
  locally, never shared).

Axis legend: B batch, N examples, d the architecture's embedding dim, D the
common dim, L classes, K cohort.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import models

PyTree = Any
RM_KINDS = ("avg", "max", "fc")


def pool_bins(d: int, dim: int) -> np.ndarray:
  """bool [d, D]: entry j belongs to output bin i (PyTorch adaptive pooling bins)."""
  bins = np.zeros((d, dim), bool)
  for i in range(dim):
    start, end = (i * d) // dim, -(-((i + 1) * d) // dim)
    bins[start:end, i] = True
  return bins


def make_rm(kind: str, d: int, dim: int) -> tuple[Callable, Callable]:
  """``(init(rng) -> rm_params, apply(rm_params, z [B, d]) -> [B, D] float32)``.

  Raises:
    ValueError: unknown kind.
  """
  if kind not in RM_KINDS:
    raise ValueError(f"unknown representation mapping '{kind}'; use one of {RM_KINDS} "
                     "(--config.fedre.rm).")
  bins = pool_bins(d, dim)
  if kind == "avg":
    mat = jnp.asarray(bins / bins.sum(0, keepdims=True), jnp.float32)  # [d, D]
    return (lambda rng: {}), (lambda p, z: z @ mat)
  if kind == "max":
    neg = jnp.asarray(np.where(bins, 0.0, -np.inf), jnp.float32)  # [d, D]
    return (lambda rng: {}), (lambda p, z: jnp.max(z[:, :, None] + neg[None], axis=1))
  dense = nn.Dense(dim)
  return (lambda rng: dense.init(rng, jnp.zeros((1, d)))["params"],
          lambda p, z: dense.apply({"params": p}, z))


def init_head(rng: jax.Array, dim: int, num_classes: int) -> dict:
  """Linear head params: kernel float32 [D, L] (LeCun normal, as flax Dense), bias [L] zeros."""
  return {"kernel": nn.initializers.lecun_normal()(rng, (dim, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


def apply_head(head: dict, z: jax.Array) -> jax.Array:
  """Logits float32 [B, L] of representations z float32 [B, D]."""
  return z @ head["kernel"] + head["bias"]


class SplitModel(NamedTuple):
  """One architecture's local model ``head(RM(g(x)))`` as pure functions.

  Params are ``{"ext": zoo params, "rm": RM params, "head": {"kernel" [D, L], "bias" [L]}}``.

  Attributes:
    arch: MODEL_ZOO name.
    embed_dim: d, the architecture's penultimate embedding dim.
    dim: D, the common dim after RM.
    init: ``rng -> params``.
    features: ``(params, x [B, ...]) -> float32 [B, D]``: RM[g(x)].
    apply: ``(params, x [B, ...]) -> logits float32 [B, L]``.
  """
  arch: str
  embed_dim: int
  dim: int
  init: Callable[[jax.Array], PyTree]
  features: Callable[[PyTree, jax.Array], jax.Array]
  apply: Callable[[PyTree, jax.Array], jax.Array]


def split_model(arch: str, input_shape: tuple, num_classes: int, dim: int,
                rm: str = "avg") -> SplitModel:
  """Builds the local model of a MODEL_ZOO architecture with RM to ``dim``."""
  zoo = models.build_zoo_model(arch, num_classes)
  x0 = jnp.zeros((1, *input_shape), jnp.float32)
  d = jax.eval_shape(lambda: zoo.init_with_output(jax.random.PRNGKey(0), x0,
                                                  return_embedding=True)[0][1]).shape[-1]
  rm_init, rm_apply = make_rm(rm, d, dim)

  def init(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    return {"ext": models.init_params(zoo, k1, input_shape), "rm": rm_init(k2),
            "head": init_head(k3, dim, num_classes)}

  def features(p, x):
    _, z = zoo.apply({"params": p["ext"]}, x, return_embedding=True)
    return rm_apply(p["rm"], z)

  def apply(p, x):
    return apply_head(p["head"], features(p, x))

  return SplitModel(arch, int(d), dim, init, features, apply)


def all_features(model: SplitModel, params: PyTree, x: jax.Array, batch_size: int) -> jax.Array:
  """RM[g(x)] float32 [N, D] of one client's rows x [N, ...], ``batch_size`` rows at a time.

  N must be a multiple of batch_size (client arrays are packed that way).
  """
  n = x.shape[0]
  xb = x.reshape(n // batch_size, batch_size, *x.shape[1:])
  z = jax.lax.map(lambda b: model.features(params, b), xb)
  return z.reshape(n, -1)


def class_prototypes(z: jax.Array, y: jax.Array, mask: jax.Array,
                     num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class mean representation of ONE client.

  Args: z float32 [N, D]; y int32 [N]; mask bool [N] (real rows).

  Returns:
    protos float32 [L, D] (zeros for absent classes), counts float32 [L].
  """
  onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype) * mask[:, None].astype(z.dtype)
  counts = onehot.sum(0)
  protos = (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None]
  return protos, counts


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-sum_c t_c log softmax(logits)_c per row: float32 [M] from logits, targets [M, L]."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def train_head(head: dict, reps: jax.Array, targets: jax.Array, valid: jax.Array,
               rng: jax.Array, *, lr: float, batch_size: int, epochs: int = 1,
               reduction: str = "sum",
               row_ids: Optional[jax.Array] = None) -> tuple[dict, jax.Array]:
  """Server-side SGD of the shared head on uploaded (representation, soft label) pairs.

  The FedRE official server (``serverre.py``, ``train_head``): one epoch over
  the shuffled pairs, plain SGD, batch 32, lr 0.01, loss = SUM over the batch
  of soft-label cross-entropy (``reduction="sum"``; ``"mean"`` divides by the
  batch's valid rows). Invalid rows (padding slots, absent classes) are sorted
  to the end of every epoch's order and masked out; a batch with no valid row
  has a zero gradient, so plain SGD leaves the head unchanged (the static
  batch count ceil(M / B) equals the official ceil(M_valid / B) in effect).

  Epoch e visits the valid rows in the order of their random scores (key
  ``fold_in(rng, e)``): by position, ``uniform(key, (M_pad,))``, or, with
  ``row_ids``, row i's ``bits(fold_in(key, row_ids[i]))`` (uint32; ties by id), so
  the order does not depend on where a pair sits in ``reps``: the server
  updates pass ids derived from (pool, client id), and the round builder's
  cohort layout (size order, padding slots, chunks, devices) then cannot
  change the result.

  Args:
    head: {"kernel" [D, L], "bias" [L]}.
    reps: float32 [M, D].  targets: float32 [M, L] (rows sum to 1).
    valid: bool [M].  rng: shuffling key.
    row_ids: optional int32 [M], distinct layout-free ids of the valid rows.

  Returns:
    (new head, mean loss per valid row over the epoch(s) float32 []).
  """
  m = reps.shape[0]
  nb = -(-m // batch_size)
  pad = nb * batch_size - m
  reps = jnp.pad(reps, ((0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  vf = valid.astype(jnp.float32)

  def loss_fn(h, idx):
    ce = soft_cross_entropy(apply_head(h, reps[idx]), targets[idx]) * vf[idx]
    total = jnp.sum(ce)
    loss = total if reduction == "sum" else total / jnp.maximum(jnp.sum(vf[idx]), 1.0)
    return loss, total

  def epoch(e, carry):
    h, loss_sum = carry
    ekey = jax.random.fold_in(rng, e)
    if row_ids is None:
      perm = jnp.argsort(jnp.where(valid, jax.random.uniform(ekey, (m + pad,)), 2.0))
    else:
      ids = jnp.pad(jnp.asarray(row_ids, jnp.int32), (0, pad))
      bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(ekey, i), (), jnp.uint32))(ids)
      perm = jnp.lexsort((ids, bits, ~valid))  # valid rows first, by score, ties by id

    def step(b, c):
      h, ls = c
      idx = jax.lax.dynamic_slice(perm, (b * batch_size,), (batch_size,))
      (_, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(h, idx)
      return jax.tree.map(lambda p, gg: p - lr * gg, h, g), ls + ce

    return jax.lax.fori_loop(0, nb, step, (h, loss_sum))

  head, loss_sum = jax.lax.fori_loop(0, epochs, epoch, (head, jnp.float32(0.0)))
  return head, loss_sum / jnp.maximum(epochs * jnp.sum(vf), 1.0)


def head_scalars(dim: int, num_classes: int) -> int:
  """Number of scalars in the linear head: D * L + L."""
  return dim * num_classes + num_classes


def split_pools(archs, spec, clients_per_round: int, client_update: Callable, *, dim: int,
                rm: str = "avg", global_head: bool = True, client_ids=None):
  """Model pools of split models, one per architecture (clients round-robin).

  Args:
    archs: distinct MODEL_ZOO names (pool names).
    spec: :class:`~fedjax_sim.algorithms.pooled.DataSpec`.
    clients_per_round: K, split over pools by ``pool_cohort_sizes``.
    client_update: ``(model: SplitModel, broadcast, params, data, rng, info) ->
      (upload, params, metrics)`` for ONE client; uploads must have the same
      shapes in every pool (they live in the common dim D).
    global_head: evaluate client k with its own extractor + RM and the
      server's head ``server_state.head`` (FedRE, FedGH, LG-FedAvg,
      FedAllRep, as the official HtFLlib code evaluates right after the head
      broadcast); False: the client's own head (local, FedProto).
    client_ids: optional explicit assignment (default round-robin).

  Returns:
    (pools tuple, models list).
  """
  from fedjax_sim.protocol import Pool
  from fedjax_sim.algorithms.pooled import assign_round_robin, pool_cohort_sizes
  if len(set(archs)) != len(archs):
    raise ValueError(f"architectures {list(archs)} repeat; list each MODEL_ZOO name once.")
  ids = list(client_ids) if client_ids is not None else assign_round_robin(
      spec.num_clients, len(archs))
  ks = pool_cohort_sizes([len(i) for i in ids], clients_per_round)
  mods = [split_model(a, spec.input_shape, spec.num_classes, dim, rm) for a in archs]
  if global_head:
    eval_params = lambda s, c: {**c, "head": s.head}
  else:
    eval_params = lambda s, c: c
  pools = tuple(
      Pool(name=m.arch, client_ids=members, clients_per_round=k,
           client_update=lambda b, c, d, r, i, m=m: client_update(m, b, c, d, r, i),
           init_client=m.init, eval_params=eval_params, apply_fn=m.apply)
      for m, members, k in zip(mods, ids, ks))
  return pools, mods


def concat_pools(tree_tuple) -> PyTree:
  """Concatenates per-pool stacked pytrees ([K_p, ...] each) to [K_tot, ...]."""
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *tree_tuple)


def upload_ids(infos, num_clients: int) -> jax.Array:
  """int32 [K_tot]: p * C + client id for pool p's slots, concatenated as :func:`concat_pools`.

  Names an upload by (pool, client), not by its slot, for :func:`train_head`'s ``row_ids``
  (padding slots repeat an id; they are invalid rows).
  """
  return jnp.concatenate([p * num_clients + i.client_ids.astype(jnp.int32)
                          for p, i in enumerate(infos)])
