"""CoRe-Fed and its ablations (Re-Fed, Co-Fed) as one jitted round.

Mukhtiar, Mahmood, Sheng, "CoRe-Fed: Bridging Collaborative and Representation
Fairness via Federated Embedding Distillation", arXiv 2602.00647. The paper's
formulas are blurred in places; we implement the decisions recorded in
``docs/decisions.md#core-fed``, marked [paper], [code] (github.com/Noorain1/CoRe-Fed) or
[ours]:

* Embeddings [paper]: z_i = normalize(mean penultimate embedding of client i's
  model on its data); z_g = normalize(mean of the round's z_i).
* Contrastive alignment (Mechanism 1, NT-Xent, tau_c = 0.07) [ours, on
  training]: each client adds lambda_c * NT-Xent(z_i(batch), z_g^(t-1),
  negatives = the other clients' embeddings uploaded in round t-1) to its local
  loss. (The official code computes it on the server model and then discards
  it.)
* Embedding distillation (Mechanism 2) [paper]: z~_i = z_i + beta (rho_i z_g -
  z_i), rho_i = cos(z_i, z_g), beta = 0.5; [ours] the client adds lambda_d *
  ||z_i(batch) - stopgrad(z~_i)||^2 with z~_i built from stopgrad(z_i(batch))
  and z_g^(t-1). (Unused in the official code.)
* Contribution-aware aggregation (Mechanism 3, Eq. 11) [paper+code]:
  w_i = (1/f_i)^gamma * sigmoid(k rho_i), normalized over the round's
  contributors; f_i = fraction of the last ``window`` (tau) rounds, the current
  one included, in which client i participated, + 1e-8; tau = C/K by default;
  gamma = 0.5, k = 2.0.
* Gradient reuse [paper; collected but unused in the code]: a client not
  sampled this round contributes its last stored update, weighted as above
  with rho = cos(its stored z, this round's z_g). [ours] an update stored in
  round s is reused in rounds s+1 .. s+max_age (default max_age = tau - 1, so
  the stored round lies inside the frequency window and f_i >= 1/tau).
* Update [paper]: w_{t+1} = w_t - eta_g sum_i w_i Delta_i, Delta_i = w_t - w_i
  (eta_g = 1: the weighted parameter average the code uses).
* Ablations [ours]: Re-Fed = alignment + distillation with FedAvg (example-
  count) weights; Co-Fed = contribution weights + reuse; CoRe-Fed = all.
  ``reference_code=True`` runs what the official code effectively runs:
  contribution weights over the sampled clients only (no alignment, no
  distillation, no reuse).

Everything lives in arrays: per-client participation (a [tau, C] ring
buffer), stored updates ([C, ...], server state, only when reuse is on), last
embeddings [C, D] and upload rounds [C]. The server sees every client's stored
update because it is server state; the engine only gathers cohort members'
client state.

Axis legend: C clients, K cohort (padded), N examples, B batch, D embedding.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms.registry import register
from fedjax_sim.algorithms.losses import nt_xent_single
from fedjax_sim.metrics import l2_normalize

PyTree = Any


class CoReFedState(NamedTuple):
  """Server state.

  Attributes:
    params: the global model w_t.
    z_global: float32 [D], z_g of the last round (zeros before round 1).
    has_global: bool [], False until a round has produced z_g.
    client_z: float32 [C, D], each client's last uploaded z_i (zeros if never).
    last_round: int32 [C], round of each client's last upload (-1 if never).
    window: bool [tau, C], participation ring buffer, row r mod tau = round r.
    stored_update: [C, ...] per params leaf, each client's last Delta_i
      (``()`` when reuse is off).
  """
  params: PyTree
  z_global: jax.Array
  has_global: jax.Array
  client_z: jax.Array
  last_round: jax.Array
  window: jax.Array
  stored_update: PyTree


class CoReFedBroadcast(NamedTuple):
  """What clients receive: params, z_g [D], has_global [], client_z [C, D], last_round [C]."""
  params: PyTree
  z_global: jax.Array
  has_global: jax.Array
  client_z: jax.Array
  last_round: jax.Array


def masked_mean_embedding(z: jax.Array, mask: jax.Array) -> jax.Array:
  """normalize(mean of the real rows): z float32 [B, D], mask bool [B] -> [D]."""
  m = mask.astype(z.dtype)
  return l2_normalize(jnp.sum(z * m[:, None], 0) / jnp.maximum(jnp.sum(m), 1.0), rsqrt=True)


def alignment_loss(z: jax.Array, z_global: jax.Array, negatives: jax.Array,
                   negative_mask: jax.Array, tau_c: float) -> jax.Array:
  """NT-Xent of anchor z [D] with positive z_g [D] and negatives [M, D] (mask bool [M]).

  -log(e^{cos(z,z_g)/tau_c} / (e^{cos(z,z_g)/tau_c} + sum_j e^{cos(z,n_j)/tau_c})).
  A zero anchor is replaced by a unit vector (no gradient flows), keeping
  the gradient finite.
  """
  ok = jnp.sum(z * z) > 1e-12
  anchor = jnp.where(ok, z, jnp.zeros_like(z).at[0].set(1.0))
  return nt_xent_single(anchor, z_global, negatives, tau_c, negative_mask)


def distillation_target(z: jax.Array, z_global: jax.Array, beta: float) -> jax.Array:
  """z~ = z + beta (rho z_g - z), rho = cos(z, z_g); z, z_g float32 [D] normalized."""
  rho = jnp.dot(z, z_global)
  return z + beta * (rho * z_global - z)


def distillation_loss(z: jax.Array, z_global: jax.Array, beta: float) -> jax.Array:
  """||z - stopgrad(z~)||^2 with z~ from stopgrad(z) (float32 scalar)."""
  target = jax.lax.stop_gradient(distillation_target(jax.lax.stop_gradient(z), z_global, beta))
  return jnp.sum((z - target) ** 2)


def participation_frequency(window: jax.Array) -> jax.Array:
  """f_i = (rounds of the window client i joined) / tau + 1e-8: bool [tau, C] -> float32 [C]."""
  return jnp.mean(window.astype(jnp.float32), axis=0) + 1e-8


def contribution_weights(freq: jax.Array, rho: jax.Array, eligible: jax.Array, *,
                         gamma: float, k: float) -> jax.Array:
  """Normalized w_i = (1/f_i)^gamma sigmoid(k rho_i) over eligible clients (Eq. 11).

  Args: freq float32 [M] (> 0); rho float32 [M]; eligible bool [M].
  Returns: float32 [M], zero where not eligible, summing to 1 (or all zero).
  """
  w = (1.0 / freq) ** gamma * jax.nn.sigmoid(k * rho)
  w = jnp.where(eligible, w, 0.0)
  return w / jnp.maximum(jnp.sum(w), 1e-12)


def corefed(apply_fn: Callable, init_params: Callable[[jax.Array], PyTree],
            embed_fn: Callable, *, num_clients: int, embed_dim: int, clients_per_round: int,
            client_lr: float, batch_size: int, epochs: int = 1, local_steps: int = 0,
            client_momentum: float = 0.0, lr_decay: float = 1.0, server_lr: float = 1.0,
            alignment: bool = True, distillation: bool = True, contribution: bool = True,
            reuse: bool = True, reference_code: bool = False, tau_c: float = 0.07,
            beta: float = 0.5, gamma: float = 0.5, k: float = 2.0, lambda_c: float = 1.0,
            lambda_d: float = 1.0, window: int = 0, max_age: int = -1,
            name: str = "corefed") -> FederatedAlgorithm:
  """CoRe-Fed with switchable mechanisms (see the module docstring).

  Args:
    apply_fn: ``(params, x [B, ...]) -> logits [B, L]``.
    init_params: ``rng -> params``.
    embed_fn: ``(params, x [B, ...]) -> (logits [B, L], z float32 [B, D])``.
    num_clients: C.  embed_dim: D.  clients_per_round: K (sets the default window).
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay: as FedAvg.
    server_lr: eta_g.
    alignment, distillation, contribution, reuse: the mechanisms' switches
      (reuse needs contribution: reused updates take contribution weights).
    reference_code: contribution weights over sampled clients only (overrides
      the four switches).
    tau_c, beta, gamma, k: the paper's knobs.  lambda_c, lambda_d: loss weights.
    window: tau, the participation window in rounds (0 = max(1, C // K)).
    max_age: oldest reusable stored update in rounds (-1 = tau - 1; 0 = no reuse;
      must be <= tau - 1).

  Uploads: ``{"delta": w_t - w_i (params pytree), "z": float32 [D]}``.
  Server metrics: ``repr_disparity`` (mean (1 - rho_i) over the sampled
  clients), ``rho_mean``, ``reused_clients``, ``weight_max``, ``update_norm``.
  """
  if reference_code:
    alignment, distillation, contribution, reuse = False, False, True, False
  if reuse and not contribution:
    raise ValueError("CoRe-Fed gradient reuse needs contribution-aware weights "
                     "(set corefed.contribution=True or corefed.reuse=False).")
  tau = window if window > 0 else max(1, num_clients // clients_per_round)
  # A reused update must lie inside the frequency window (f_i >= 1/tau); with
  # tau = 1 nothing can be reused (its f_i would be 0 and its weight ~1e4).
  age_cap = max_age if max_age >= 0 else tau - 1
  if age_cap > tau - 1:
    raise ValueError(f"CoRe-Fed max_age={max_age} exceeds the window tau - 1 = {tau - 1}: a "
                     "reused update would have participation frequency 0; lower "
                     "corefed.max_age or raise corefed.window.")
  C, D = num_clients, embed_dim

  def init(rng):
    params = init_params(rng)
    stored = (jax.tree.map(lambda p: jnp.zeros((C, *p.shape), p.dtype), params)
              if reuse else ())
    return CoReFedState(params, jnp.zeros((D,), jnp.float32), jnp.bool_(False),
                        jnp.zeros((C, D), jnp.float32), jnp.full((C,), -1, jnp.int32),
                        jnp.zeros((tau, C), bool), stored)

  def broadcast(s):
    return CoReFedBroadcast(s.params, s.z_global, s.has_global, s.client_z, s.last_round)

  @jax.named_scope("corefed_embedding")
  def client_embedding(params, data):
    """normalize(mean embedding over the client's real rows), in batches of B.

    The loop runs ceil(n / B) batches (the client's own count, real rows come
    first), so under vmap a size-sorted chunk pays its largest member's
    batches, not the dataset's padded N.
    """
    n = data.num_examples

    def one(i, total):
      x = jax.lax.dynamic_slice_in_dim(data.x, i * batch_size, batch_size)
      m = jax.lax.dynamic_slice_in_dim(data.mask, i * batch_size, batch_size)
      _, z = embed_fn(params, x)
      return total + jnp.sum(z * m[:, None].astype(z.dtype), 0)

    total = jax.lax.fori_loop(0, (n + batch_size - 1) // batch_size, one,
                              jnp.zeros((D,), jnp.float32))
    return l2_normalize(total / jnp.maximum(n, 1).astype(total.dtype), rsqrt=True)

  def client_update(b, client_state, data, rng, info):
    g = b.params
    neg_mask = (b.last_round == info.round - 1) & (jnp.arange(C) != info.client_id)
    on = b.has_global.astype(jnp.float32)

    @jax.named_scope("corefed_loss")
    def loss(p, x, y, m, r):
      del r
      if not (alignment or distillation):
        ce = masked_cross_entropy(apply_fn(p, x), y, m)
        return ce, (ce, jnp.float32(0.0), jnp.float32(0.0))
      logits, z = embed_fn(p, x)
      ce = masked_cross_entropy(logits, y, m)
      zb = masked_mean_embedding(z, m)
      lc = alignment_loss(zb, b.z_global, b.client_z, neg_mask, tau_c) if alignment else 0.0
      ld = distillation_loss(zb, b.z_global, beta) if distillation else 0.0
      lc, ld = on * jnp.asarray(lc, jnp.float32), on * jnp.asarray(ld, jnp.float32)
      return ce + lambda_c * lc + lambda_d * ld, (ce, lc, ld)

    opt = client_optimizer(client_lr, client_momentum, lr_decay, info.round)
    res = local_train(lambda *a: loss(*a)[0], g, opt, data, rng, epochs=epochs,
                      batch_size=batch_size, local_steps=local_steps)
    z = client_embedding(res.params, data)
    metrics = dict(res.metrics)
    if alignment or distillation:  # the terms at the trained model on all its rows (logged)
      if alignment:
        metrics["align_loss"] = on * alignment_loss(z, b.z_global, b.client_z, neg_mask, tau_c)
      if distillation:
        metrics["distill_loss"] = on * distillation_loss(z, b.z_global, beta)
    delta = jax.tree.map(lambda a, c: a - c, g, res.params)
    return {"delta": delta, "z": z}, client_state, metrics

  @jax.named_scope("corefed_server")
  def server_update(s, uploads, weights, info, rng):
    del rng
    valid = info.valid
    v = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(v), 1.0)
    z = uploads["z"]  # [K, D], normalized
    z_g = l2_normalize(jnp.sum(z * v[:, None], 0) / count, rsqrt=True)
    rho_k = z @ z_g  # [K]
    scatter = jnp.where(valid, info.client_ids, C)  # padding slots -> dropped
    client_z = s.client_z.at[scatter].set(z, mode="drop")
    last_round = s.last_round.at[scatter].set(info.round, mode="drop")
    joined = jnp.zeros((C,), bool).at[scatter].set(True, mode="drop")
    window_ = s.window.at[info.round % tau].set(joined)
    freq = participation_frequency(window_)  # [C]

    if reuse:
      with jax.named_scope("corefed_reuse"):
        stored = jax.tree.map(lambda a, u: a.at[scatter].set(u, mode="drop"),
                              s.stored_update, uploads["delta"])
      age = info.round - last_round
      reusable = (~joined) & (last_round >= 0) & (age >= 1) & (age <= age_cap)
      w = contribution_weights(freq, client_z @ z_g, joined | reusable, gamma=gamma, k=k)  # [C]
      # One pass over all C stored rows (the reused ones and the fresh ones just
      # stored). This read is memory-bound: see docs/results/corefed_digits.md.
      # Profiled (bench/corefed_profile.py): in the round the [C, P] rows come
      # from DRAM, not cache, and this GEMV is CoRe-Fed's largest extra cost
      # (~0.3x FedAvg's round on the digits MLP). Reading only the reusable
      # rows (blocked gather, or a per-row axpy loop) and one flat [C, P]
      # buffer were tried and measured no faster beyond noise (XLA's gather
      # streams no better than this GEMV); reading the old rows before the
      # scatter makes XLA copy the buffer. So the plain pass stays.
      with jax.named_scope("corefed_reuse"):
        delta = jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), stored)
      reused = jnp.sum(reusable)
    else:
      stored = ()
      if contribution:
        w = contribution_weights(freq[info.client_ids], rho_k, valid, gamma=gamma, k=k)  # [K]
      else:
        wv = weights * v
        w = wv / jnp.maximum(jnp.sum(wv), 1e-12)
      delta = jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1),
                           uploads["delta"])
      reused = jnp.int32(0)
    params = jax.tree.map(lambda p, d: p - server_lr * d, s.params, delta)
    metrics = {
        "repr_disparity": jnp.sum((1.0 - rho_k) * v) / count,
        "rho_mean": jnp.sum(rho_k * v) / count,
        "reused_clients": reused.astype(jnp.float32),
        "weight_max": jnp.max(w),
        "update_norm": optax.global_norm(delta),
    }
    new = CoReFedState(params, z_g, jnp.bool_(True), client_z, last_round, window_, stored)
    return new, metrics

  return FederatedAlgorithm(
      name=name, init=init, init_client=lambda rng: (), client_update=client_update,
      server_update=server_update, eval_params=lambda s, c: s.params, apply_fn=apply_fn,
      broadcast=broadcast)


# Mechanism presets by registry name: (alignment, distillation, contribution, reuse).
PRESETS = {
    "corefed": (True, True, True, True),
    "refed": (True, True, False, False),
    "cofed": (False, False, True, True),
}


def _register(name: str) -> None:
  """Registers preset ``name`` (see PRESETS); knobs ``--config.<name>.<knob>`` (tau_c, beta,
  gamma, k, lambda_c, lambda_d, window, max_age, reference_code); eta_g is the engine's
  ``server_lr``."""
  alignment, distillation, contribution, reuse = PRESETS[name]

  @register(name, corefed, fixed=("alignment", "distillation", "contribution", "reuse",
                                  "server_lr"))
  def build(ctx, **knobs):
    embed_fn, dim = ctx.embedding_fn()
    return corefed(*ctx.model_fns(), embed_fn, num_clients=ctx.spec.num_clients, embed_dim=dim,
                   clients_per_round=ctx.clients_per_round, server_lr=ctx.server["lr"],
                   alignment=alignment, distillation=distillation, contribution=contribution,
                   reuse=reuse, name=name, **ctx.client, **knobs)


for _name in PRESETS:
  _register(_name)
