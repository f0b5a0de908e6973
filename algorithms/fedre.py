"""FedRE: representation entanglement for model-heterogeneous FL.

Zhu et al., "FedRE: A Representation Entanglement Framework for
Model-Heterogeneous Federated Learning", arXiv 2511.22265 (CVPR 2026); official
code github.com/AIResearch-Group/FedRE (``clientre.py``, ``serverre.py``). We
implement the decisions recorded in ``docs/decisions.md#fedre``:

* Clients own persistent local models: extractor g_k (a MODEL_ZOO architecture,
  one model pool per architecture, clients round-robin) + RM to the common dim
  D (:mod:`fedjax_sim.algorithms.rm`, average pooling by default) + a linear
  head (D -> L). Each round a client replaces its head with the broadcast
  global classifier and trains extractor + head with cross-entropy (E epochs,
  SGD) [code].
* Upload (the paper's Eq. for RE): ONE entangled pair per client per round,
  r~_k = sum_i w_i RM[g_k(x_i)], y~_k = sum_i w_i onehot(y_i), with normalized
  random weights resampled every round [paper], computed with the model after
  local training [code].
* Variants [paper; naming reading: ours]: RSR / VAR / RAR weight the raw
  representations, RSP / VAP / RAP the class prototypes p_c (mean RM
  representation of class c); "RS" = one-hot at a uniformly random
  sample / present class ("random single"), "VA" = plain average ("vanilla
  average"), "RA" = random weights ("random average"). RAP is the
  default [code: ``torch.rand`` over the present classes, normalized]. Every
  variant is written as example weights w_i (a prototype weight v_c becomes
  w_i = v_c / n_c for the n_c examples of class c), so r~ = sum_i w_i z_i is
  one formula.
* Weight distributions (``weights``) [ours; the paper names them, the code
  has only uniform]: ``uniform`` u ~ U(0, 1); ``gaussian`` u = |e|, e ~ N(0, 1)
  (half-normal); ``laplacian`` u = |e|, e ~ Laplace(0, 1) (i.e. Exp(1)). The
  raw draws are made nonnegative by the absolute value, zeroed outside the
  support (absent classes / padding rows) and divided by their sum over the
  support, so the weights are >= 0 and sum to 1.
* ``resample=False`` is the paper's fixed-weight ablation: the weight key
  depends on the client id only, not the round.
* Server [code]: the global head is trained with soft-label cross-entropy on
  the round's K entangled pairs, 1 epoch of plain SGD, lr 0.01, batch 32, loss
  summed over the batch (:func:`fedjax_sim.algorithms.rm.train_head`), then
  broadcast. Padding slots of the cohort (``ServerInfo.valid`` False) never
  enter the server's training set.
* Evaluation: client k with its own extractor + RM and the global head (the
  official code evaluates right after the head broadcast).

Axis legend: K cohort, N examples, B batch, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.registry import register

VARIANTS = ("RSR", "VAR", "RAR", "RSP", "VAP", "RAP")
WEIGHT_DISTRIBUTIONS = ("uniform", "gaussian", "laplacian")


class ServerState(NamedTuple):
  head: dict  # {"kernel": float32 [D, L], "bias": float32 [L]}: the global classifier
  # uint32 [2]: the run's key for FIXED entangling weights (``resample=False``;
  # drawn from the init key, so it differs between run seeds); None otherwise.
  weight_key: Optional[jax.Array] = None


class Upload(NamedTuple):
  rep: jax.Array  # float32 [D]: entangled representation r~_k
  label: jax.Array  # float32 [L]: entangled label encoding y~_k (sums to 1; 0 if no data)


def sample_raw_weights(rng: jax.Array, n: int, distribution: str) -> jax.Array:
  """Nonnegative raw draws float32 [n] (see the module docstring).

  Raises:
    ValueError: unknown distribution.
  """
  if distribution == "uniform":
    return jax.random.uniform(rng, (n,))
  if distribution == "gaussian":
    return jnp.abs(jax.random.normal(rng, (n,)))
  if distribution == "laplacian":
    return jnp.abs(jax.random.laplace(rng, (n,)))
  raise ValueError(f"unknown weight distribution '{distribution}'; use one of "
                   f"{WEIGHT_DISTRIBUTIONS} (--config.fedre.weights).")


def support_weights(rng: jax.Array, support: jax.Array, mode: str,
                    distribution: str = "uniform") -> jax.Array:
  """Normalized weights float32 [n] over a support bool [n].

  mode ``single`` (RS): one-hot at a uniformly random support element;
  ``average`` (VA): 1 / |support|; ``random`` (R): raw draws normalized. Zero
  outside the support; all zeros if the support is empty.
  """
  s = support.astype(jnp.float32)
  n = support.shape[0]
  if mode == "single":
    pick = jnp.argmax(jnp.where(support, jax.random.uniform(rng, (n,)), -1.0))
    u = jax.nn.one_hot(pick, n, dtype=jnp.float32) * s
  elif mode == "average":
    u = s
  elif mode == "random":
    u = sample_raw_weights(rng, n, distribution) * s
  else:
    raise ValueError(f"unknown weighting mode '{mode}'.")
  return u / jnp.maximum(jnp.sum(u), 1e-12)


_MODES = {"RS": "single", "VA": "average", "RA": "random"}


def entangle_weights(rng: jax.Array, y: jax.Array, mask: jax.Array, *, variant: str = "RAP",
                     distribution: str = "uniform", num_classes: int) -> jax.Array:
  """Example weights float32 [N] of one client for a FedRE variant (sum 1 over real rows).

  Args:
    rng: the round's weight key (resampled every round).
    y: int32 [N] labels.  mask: bool [N] real rows.
    variant: one of :data:`VARIANTS`.  distribution: one of :data:`WEIGHT_DISTRIBUTIONS`.

  Raises:
    ValueError: unknown variant.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown FedRE variant '{variant}'; use one of {VARIANTS} "
                     "(--config.fedre.variant).")
  mode = _MODES[variant[:2]]
  if variant.endswith("R"):  # raw representations
    return support_weights(rng, mask, mode, distribution)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * mask[:, None]
  counts = onehot.sum(0)
  v = support_weights(rng, counts > 0, mode, distribution)  # [L] class weights
  return proto_example_weights(v, y, mask, num_classes)


def proto_example_weights(class_weights: jax.Array, y: jax.Array, mask: jax.Array,
                          num_classes: int) -> jax.Array:
  """w_i = v_{y_i} / n_{y_i} on real rows: sum_i w_i z_i = sum_c v_c p_c. float32 [N]."""
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * mask[:, None]
  counts = onehot.sum(0)
  return onehot @ (class_weights / jnp.maximum(counts, 1.0))


def entangle(z: jax.Array, y: jax.Array, weights: jax.Array, num_classes: int) -> Upload:
  """r~ = sum_i w_i z_i (float32 [D]), y~ = sum_i w_i onehot(y_i) (float32 [L]).

  Args: z float32 [N, D]; y int32 [N]; weights float32 [N] (0 on padding rows).
  """
  return Upload(weights @ z, weights @ jax.nn.one_hot(y, num_classes, dtype=z.dtype))


def fedre(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_lr: float,
          batch_size: int, epochs: int = 1, local_steps: int = 0, client_momentum: float = 0.0,
          lr_decay: float = 1.0, dim: int = 32, rm: str = "avg", variant: str = "RAP",
          weights: str = "uniform", resample: bool = True, server_lr: float = 0.01,
          server_batch_size: int = 32, server_epochs: int = 1, server_reduction: str = "sum",
          client_ids=None, name: str = "fedre") -> FederatedAlgorithm:
  """FedRE as a pooled :class:`FederatedAlgorithm` (one pool per architecture).

  Args:
    archs: distinct MODEL_ZOO names; clients are assigned round-robin.
    spec: :class:`~fedjax_sim.algorithms.pooled.DataSpec`.
    clients_per_round: K (split over pools proportionally to their sizes).
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay:
      local SGD (:func:`fedjax_sim.protocol.local_train`).
    dim: D, the common representation dim.  rm: ``avg`` | ``max`` | ``fc``.
    variant: RE mechanism (:data:`VARIANTS`).  weights: weight distribution.
    resample: resample the weights every round (False: fixed per client:
      client k's weights come from ``fold_in(weight_key, k)``, a key drawn
      once from the run's init key and broadcast with the head).
    server_lr, server_batch_size, server_epochs, server_reduction: the
      server's head training (:func:`~fedjax_sim.algorithms.rm.train_head`).

  Server metrics: ``head_loss``, ``valid_uploads``, ``comm/upload_scalars``
  (K_real * (D + L)) and ``comm/broadcast_scalars`` (K_real * (D L + L)).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown FedRE variant '{variant}'; use one of {VARIANTS}.")
  if weights not in WEIGHT_DISTRIBUTIONS:
    raise ValueError(f"unknown weight distribution '{weights}'; use one of "
                     f"{WEIGHT_DISTRIBUTIONS}.")
  num_classes = spec.num_classes

  def client_update(model, bcast, params, data, rng, info):
    head = bcast if resample else bcast[0]
    params = {**params, "head": head}  # replace the local head by the global classifier
    loss = lambda p, x, y, m, r: masked_cross_entropy(model.apply(p, x), y, m)
    opt = client_optimizer(client_lr, client_momentum, lr_decay, info.round)
    k_train, k_w = jax.random.split(rng)
    if not resample:  # the same weights every round, different ones per run seed
      k_w = jax.random.fold_in(bcast[1], info.client_id)
    res = local_train(loss, params, opt, data, k_train, epochs=epochs, batch_size=batch_size,
                      local_steps=local_steps)
    z = rm_lib.all_features(model, res.params, data.x, batch_size)
    w = entangle_weights(k_w, data.y, data.mask, variant=variant, distribution=weights,
                         num_classes=num_classes)
    return entangle(z, data.y, w, num_classes), res.params, res.metrics

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim, rm=rm,
                                global_head=True, client_ids=client_ids)

  def init(rng):
    k_head, k_weights = jax.random.split(rng)
    return ServerState(rm_lib.init_head(k_head, dim, num_classes),
                       None if resample else k_weights)

  def server_update(state, uploads, weights_, infos, rng):
    del weights_  # every entangled pair counts once [code]
    up = rm_lib.concat_pools(uploads)
    valid = jnp.concatenate([i.valid for i in infos]) & (jnp.sum(up.label, -1) > 0)
    head, head_loss = rm_lib.train_head(
        state.head, up.rep, up.label, valid, rng, lr=server_lr, batch_size=server_batch_size,
        epochs=server_epochs, reduction=server_reduction,
        row_ids=rm_lib.upload_ids(infos, spec.num_clients))
    k = jnp.sum(valid).astype(jnp.float32)
    return ServerState(head, state.weight_key), {
        "head_loss": head_loss, "valid_uploads": k,
        "comm/upload_scalars": k * (dim + num_classes),
        "comm/broadcast_scalars": k * rm_lib.head_scalars(dim, num_classes)}

  return FederatedAlgorithm(
      name=name, init=init, init_client=None, client_update=None, server_update=server_update,
      eval_params=None, apply_fn=None,
      broadcast=(lambda s: s.head) if resample else (lambda s: (s.head, s.weight_key)),
      personalized=True,
      pools=pools)


@register("fedre", fedre, fixed=("client_ids",), pooled=True)
def _build(ctx, **knobs):
  """FedRE over the ``--config.archs`` pools; knobs ``--config.fedre.<knob>``."""
  return fedre(ctx.archs, ctx.spec, ctx.clients_per_round, **ctx.client, **knobs)
