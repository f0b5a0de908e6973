"""FedTGP as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

Zhang et al., "FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced
Contrastive Learning for Data and Model Heterogeneity in Federated Learning",
arXiv 2401.03230 (AAAI 2024); official code github.com/TsingZ0/FedTGP, the same
``clienttgp.py`` / ``servertgp.py`` as in HtFLlib (github.com/TsingZ0/HtFLlib).

* Clients (as FedProto, :mod:`~fedjax_sim.algorithms.fedproto`): every client
  keeps its whole split model (extractor g_k + RM to the common dim D + its
  own head). The local loss is CE + lambda * mean_b ||RM(g(x_b)) - P^_{y_b}||^2 / D
  over the batch's real rows, the squared distance counted on rows whose class
  has a global prototype P^_c (the paper's client objective with the code's
  ``nn.MSELoss``, hence the division by D). After local training the client
  uploads its class prototypes P_k^c (mean RM representation of class c, the
  model after training) with the class counts.
* Trainable global prototypes (TGP) [paper; code ``Trainable_Global_Prototypes``]:
  P^_c = W_2 relu(W_1 e_c + b_1) + b_2, with e_c row c of a learned embedding
  [L, D] and a hidden width equal to D, kept on the server across rounds.
* Adaptive margin [paper; slides: "maximum margin"]: Q_c is the plain mean of the
  round's client prototypes of class c; the margin of class c is
  min_{c' != c} ||Q_c - Q_c'||_2 over the classes present this round, and
  delta = min(max_c margin_c, tau). With fewer than two classes present,
  delta = tau (the code's 1e9 sentinel clipped by tau). delta is fixed
  during the round's server training (no gradient).
* ACL, the adaptive-margin-enhanced contrastive loss [paper; code
  ``update_TGP``]: for an uploaded pair (P_k^c, c),
  -log softmax_c(-(phi(P_k^c, P^_c') + delta [c' = c]))_{c'} with phi the
  Euclidean distance; averaged over the batch. The server trains the TGP for
  S = ``server_epochs`` epochs of plain SGD over the round's pairs (reshuffled
  every epoch, batch ``server_batch_size``, the last batch partial), then
  broadcasts P^ for every class.

Where we differ:

* From the code: the server's step size and batch size are knobs of their own
  (``server_lr`` = 0.01, ``server_batch_size`` = 10); HtFLlib reuses the
  client's (its defaults 0.01 and 10). Distances are computed as
  ||p - P^||_2 of the difference (the code expands ||p||^2 - 2 p.P^ + ||P^||^2,
  which can round below 0), with a zero gradient at distance 0 (the code's is
  not finite there). The TGP is initialized with PyTorch's default initializers
  (embedding N(0, 1), linear layers U(+-1/sqrt(fan_in))) but from our key
  stream. The epoch order is drawn per (pool, client, class) row id as in
  :func:`fedjax_sim.algorithms.rm.train_head`, so the cohort's layout cannot
  change the result.
* From the code: evaluation (``inference="head"``, the default) uses each client's
  own model, as our FedProto; the code classifies by the nearest global prototype
  (smallest MSE to P^_c), available as ``inference="prototype"`` (logits
  -||RM(g(x)) - P^_c||^2 / D).
* Defaults: lambda = 10, tau = 100, S = 100 follow the official run script
  (``run_me.sh``: ``-lam 10 -se 100 -mart 100``); HtFLlib's ``main.py`` defaults
  are lambda = 1, tau = 100 and S = 100.

Server metrics: ``margin`` (delta), ``acl_loss`` (mean batch loss over the round's steps),
``server_pairs``, ``comm/upload_scalars`` (D + 1 per present class),
``comm/broadcast_scalars`` (K L (D + 1)).
Axis legend: K cohort, M pairs, D common dim, L classes, H hidden width (= D).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.checks import concrete
from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.fedproto import ProtoState, proto_client_update
from fedjax_sim.algorithms.head_training import register_split_model, split_kw, valid_slots

INFERENCE = ("head", "prototype")


class TGPState(NamedTuple):
  params: dict  # the TGP generator: {"embedding" [L, D], "hidden" {kernel [D, H], bias [H]},
  #                "out" {kernel [H, D], bias [D]}}
  protos: jax.Array  # float32 [L, D]: the broadcast global prototypes P^
  has: jax.Array  # bool [L]: P^ exists (False before the first server update)


def init_generator(rng: jax.Array, num_classes: int, dim: int, hidden: int) -> dict:
  """TGP parameters with PyTorch's default initializers (``nn.Embedding``: N(0, 1);
  ``nn.Linear``: kernel and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
  k_e, k_1, k_2, k_3, k_4 = jax.random.split(rng, 5)
  u = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / jnp.sqrt(
      jnp.float32(fan_in))
  return {"embedding": jax.random.normal(k_e, (num_classes, dim), jnp.float32),
          "hidden": {"kernel": u(k_1, (dim, hidden), dim), "bias": u(k_2, (hidden,), dim)},
          "out": {"kernel": u(k_3, (hidden, dim), hidden), "bias": u(k_4, (dim,), hidden)}}


def generate(params: dict) -> jax.Array:
  """The global prototypes P^ float32 [L, D] = W_2 relu(W_1 e_c + b_1) + b_2 per class c."""
  h = jax.nn.relu(params["embedding"] @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def _safe_norm(d2: jax.Array) -> jax.Array:
  """sqrt(d2) with a zero gradient where d2 == 0 (instead of NaN)."""
  pos = d2 > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def adaptive_margin(protos: jax.Array, counts: jax.Array, valid: jax.Array,
                    tau: float) -> jax.Array:
  """FedTGP's adaptive margin delta (float32 []) from the round's client prototypes.

  Q_c = plain mean of the prototypes of class c over the valid slots that hold c;
  margin_c = min_{c' != c, present} ||Q_c - Q_c'||_2; delta = min(max_c margin_c, tau)
  over the classes with a partner (tau if fewer than two classes are present).

  Args:
    protos: float32 [K, L, D] client prototypes.  counts: float32 [K, L].
    valid: bool [K] real slots.  tau: the margin threshold.
  """
  present = (counts > 0) & valid[:, None]
  n = jnp.sum(present, axis=0).astype(jnp.float32)
  q = jnp.einsum("kl,kld->ld", present.astype(protos.dtype), protos) / jnp.maximum(n, 1.0)[:, None]
  has = n > 0
  dist = _safe_norm(jnp.sum((q[:, None, :] - q[None, :, :]) ** 2, axis=-1))  # [L, L]
  pair = has[:, None] & has[None, :] & ~jnp.eye(has.shape[0], dtype=bool)
  gap = jnp.min(jnp.where(pair, dist, jnp.inf), axis=1)  # [L]; inf: no partner
  finite = jnp.isfinite(gap)
  max_gap = jnp.max(jnp.where(finite, gap, -jnp.inf))
  return jax.lax.stop_gradient(jnp.where(jnp.any(finite), jnp.minimum(max_gap, tau),
                                         jnp.float32(tau)))


def acl_loss(global_protos: jax.Array, reps: jax.Array, labels: jax.Array, valid: jax.Array,
             margin: jax.Array) -> jax.Array:
  """The adaptive-margin-enhanced contrastive loss, mean over the valid pairs (0 if none).

  Per pair (p, c): -log( e^{-(||p - P^_c|| + delta)} / (e^{-(||p - P^_c|| + delta)}
  + sum_{c' != c} e^{-||p - P^_c'||}) ).

  Args:
    global_protos: float32 [L, D] P^.  reps: float32 [M, D] client prototypes.
    labels: int32 [M] their classes.  valid: bool [M].  margin: delta, float32 [].
  """
  d2 = jnp.sum((reps[:, None, :] - global_protos[None, :, :]) ** 2, axis=-1)  # [M, L]
  onehot = jax.nn.one_hot(labels, global_protos.shape[0], dtype=reps.dtype)
  logits = -(_safe_norm(d2) + margin * onehot)
  ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
  v = valid.astype(reps.dtype)
  return jnp.sum(ce * v) / jnp.maximum(jnp.sum(v), 1.0)


def train_generator(params: dict, reps: jax.Array, labels: jax.Array, valid: jax.Array,
                    row_ids: jax.Array, rng: jax.Array, margin: jax.Array, *, lr: float,
                    batch_size: int, epochs: int) -> tuple[dict, jax.Array]:
  """The server's TGP training: ``epochs`` epochs of plain SGD on :func:`acl_loss`.

  Each epoch visits the valid pairs in the order of their scores
  ``bits(fold_in(fold_in(rng, e), row_ids[i]))`` (ties by id), ceil(M / B) batches
  with the invalid rows sorted last and masked out: a batch with no valid row
  leaves the parameters unchanged, the last partial batch averages over its
  valid rows (PyTorch's ``DataLoader(drop_last=False)`` with a mean loss).

  Args:
    params: TGP parameters.  reps: float32 [M, D].  labels: int32 [M].
    valid: bool [M].  row_ids: int32 [M], distinct layout-free ids of the valid rows.
    rng: shuffling key.  margin: delta.

  Returns:
    (new params, mean batch loss over the steps that had valid rows, float32 []).
  """
  m = reps.shape[0]
  nb = -(-m // batch_size)
  pad = nb * batch_size - m
  reps = jnp.pad(reps, ((0, pad), (0, 0)))
  labels = jnp.pad(labels, (0, pad))
  valid = jnp.pad(valid, (0, pad))
  ids = jnp.pad(jnp.asarray(row_ids, jnp.int32), (0, pad))

  def loss_fn(p, idx):
    return acl_loss(generate(p), reps[idx], labels[idx], valid[idx], margin)

  def epoch(e, carry):
    ekey = jax.random.fold_in(rng, e)
    bits = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(ekey, i), (), jnp.uint32))(ids)
    perm = jnp.lexsort((ids, bits, ~valid))  # valid rows first, by score, ties by id

    def step(b, c):
      p, total, used = c
      idx = jax.lax.dynamic_slice(perm, (b * batch_size,), (batch_size,))
      loss, g = jax.value_and_grad(loss_fn)(p, idx)
      live = jnp.any(valid[idx]).astype(jnp.float32)
      return jax.tree.map(lambda a, gg: a - lr * gg, p, g), total + loss * live, used + live

    return jax.lax.fori_loop(0, nb, step, carry)

  params, total, used = jax.lax.fori_loop(0, epochs, epoch,
                                          (params, jnp.float32(0.0), jnp.float32(0.0)))
  return params, total / jnp.maximum(used, 1.0)


def fedtgp(archs: Sequence[str], spec: Any, clients_per_round: int, *, lam: float = 10.0,
           tau: float = 100.0, server_epochs: int = 100, server_lr: float = 0.01,
           server_batch_size: int = 10, inference: str = "head", dim: int = 32,
           rm: str = "avg", client_ids=None, **kw) -> FederatedAlgorithm:
  """FedTGP (see the module docstring) over model pools of split models.

  Args:
    archs, spec, clients_per_round, client_ids: the pools
      (:func:`~fedjax_sim.algorithms.rm.split_pools`).
    lam: lambda, the weight of the prototype distance in the local loss (>= 0).
    tau: the margin threshold (>= 0).
    server_epochs: S, epochs of TGP training per round (>= 1).
    server_lr, server_batch_size: the TGP's SGD step size and batch size.
    inference: ``head`` (each client's own model) or ``prototype`` (nearest P^_c).
    dim: D, the common representation dim.  rm: the representation mapping.
    kw: client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay.

  Raises:
    ValueError: a knob out of range or an unknown ``inference``.
  """
  if concrete(lam) and lam < 0:
    raise ValueError(f"FedTGP lam={lam} must be >= 0; set --config.fedtgp.lam.")
  if concrete(tau) and tau < 0:
    raise ValueError(f"FedTGP tau={tau} must be >= 0; set --config.fedtgp.tau.")
  if server_epochs < 1 or server_batch_size < 1:
    raise ValueError(f"FedTGP server_epochs={server_epochs} and server_batch_size="
                     f"{server_batch_size} must be >= 1; set --config.fedtgp.server_epochs / "
                     "server_batch_size.")
  if inference not in INFERENCE:
    raise ValueError(f"unknown FedTGP inference '{inference}'; set --config.fedtgp.inference "
                     f"to one of {INFERENCE}.")
  kw = dict(kw, dim=dim, rm=rm)
  num_classes, tkw = spec.num_classes, split_kw(kw)

  client_update = proto_client_update(lam, num_classes, tkw)  # FedProto's clients

  pools, mods = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim, rm=rm,
                                   global_head=False, client_ids=client_ids)
  if inference == "prototype":
    def nearest(model):
      def apply(p, x):
        z = model.features(p, x)
        d2 = jnp.mean((z[:, None, :] - p["protos"][None]) ** 2, axis=-1)  # [B, L]
        return jnp.where(p["has"][None], -d2, -1e30)
      return apply
    pools = tuple(pool._replace(apply_fn=nearest(m),
                                eval_params=lambda s, c: {**c, "protos": s.protos, "has": s.has})
                  for pool, m in zip(pools, mods))

  def init(rng):
    return TGPState(init_generator(rng, num_classes, dim, dim), jnp.zeros((num_classes, dim)),
                    jnp.zeros((num_classes,), bool))

  def server_update(state, uploads, weights, infos, rng):
    del weights  # every uploaded prototype is one training pair [code]
    up, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
    k = up.protos.shape[0]
    margin = adaptive_margin(up.protos, up.counts, valid, tau)
    rvalid = ((up.counts > 0) & valid[:, None]).reshape(-1)
    labels = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (k, num_classes))
    ids = rm_lib.upload_ids(infos, spec.num_clients)
    row_ids = (ids[:, None] * num_classes + jnp.arange(num_classes)).reshape(-1)
    params, loss = train_generator(state.params, up.protos.reshape(-1, dim), labels.reshape(-1),
                                   rvalid, row_ids, rng, margin, lr=server_lr,
                                   batch_size=server_batch_size, epochs=server_epochs)
    pairs = jnp.sum(rvalid).astype(jnp.float32)
    has = state.has | (pairs > 0)
    kv = jnp.sum(valid).astype(jnp.float32)
    return TGPState(params, generate(params), has), {
        "margin": margin, "acl_loss": loss, "server_pairs": pairs,
        "comm/upload_scalars": pairs * (dim + 1),
        "comm/broadcast_scalars": kv * jnp.sum(has).astype(jnp.float32) * (dim + 1)}

  return FederatedAlgorithm(
      name="fedtgp", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None,
      broadcast=lambda s: ProtoState(s.protos, s.has), personalized=True, pools=pools)


register_split_model("fedtgp", fedtgp)
