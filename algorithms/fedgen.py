"""FedGen as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

Zhu, Hong and Zhou, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", ICML 2021, arXiv 2105.10056; official code
github.com/zhuangdizhu/FedGen (``serverpFedGen.py``, ``userpFedGen.py``,
``generator.py``). We implement the model-heterogeneous variant of HtFLlib
(github.com/TsingZ0/HtFLlib, ``servergen.py``, ``clientgen.py``), which the
FedRE paper runs: the generator lives in FEATURE space, the common dim D after
RM (:mod:`~fedjax_sim.algorithms.rm`), and what is shared is the linear head.

* Generator G_w(z | y) [HtFLlib, official ``Generator``]: z = W_2 ReLU(BN(W_1
  [eps; onehot(y)])) + b_2 with noise eps ~ U[0, 1)^noise_dim (both codes draw
  ``torch.rand``), BN in training mode (batch statistics, eps 1e-5, learned
  scale and shift), hidden width ``hidden_dim`` (:func:`generate`).
* Server (paper Eq. 4) [HtFLlib]: after the round's clients upload their heads
  h_k and label counts n_k [L], the server takes ``generator_steps`` Adam steps
  (lr ``generator_lr``, betas (0.9, 0.999), eps 1e-8, state fresh every round) on

    J(w) = mean_b CE( sum_k a_k h_k(G_w(eps_b | y_b)), y_b ) + eta L_div,
    y_b ~ p^(y),

  a_k = n_k / sum_j n_j the cohort's example weights (Eq. 4 averages the
  clients' logits; HtFLlib weights them by examples) and B generated samples
  per step (:func:`generator_loss`); then the global head is the example-weighted
  mean of the uploaded heads and is broadcast with G_w and p^(y).
* Client (paper Eq. 5) [HtFLlib]: replaces its head by the global head and
  trains extractor + RM + head on

    CE(f_k(x), y) + alpha mean_b CE( h_k(G_w(eps_b | y^_b)), y^_b ),  y^_b ~ p^(y),

  B generated samples per step, the gradient of the second term reaching the
  head only (:func:`client_regularizer`). Evaluation: its extractor with the
  global head (HtFLlib evaluates right after the head broadcast).

Where we differ (``docs/decisions.md#fedgen``):

* p^(y): the label distribution of every client that has reported its counts
  so far (the server keeps the last counts per client, [C, L]); HtFLlib reads
  all clients' counts at start-up, which this equals once every client has
  joined (from round 0 when all join, as in the FedRE setting). The official
  code samples uniformly over the round's "qualified" labels.
* Round 0 has no regularizer (alpha is applied only once the generator has been
  trained, i.e. once counts were reported), as the official code
  (``regularization = glob_iter > 0``); HtFLlib regularizes with the untrained
  generator in round 0.
* Not implemented from the official code: its per-label teacher weights
  (n_{k,y} / sum_j n_{j,y} instead of a_k), the decaying weights (alpha_t =
  10 * 0.98^t) and the latent KL term beta of the client loss, the adversarial
  student term, and Adam's state carried across rounds with lr decay; HtFLlib
  has none of these either. The diversity loss L_div = exp(-mean_{i,j}
  ||eps_i - eps_j||^2 / d_eps * ||z_i - z_j||_1 / D) of the official code is
  available (``eta``, default 0 as HtFLlib; the official code uses 1).
* W_1 has no bias: before BN in training mode a bias cancels (HtFLlib's has
  one, with zero gradient; under Adam its rounding-noise gradient would move it
  by ~lr per step). Weights and biases start as PyTorch's ``nn.Linear``
  (U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

Communication per real client: up D L + L (head) + L (counts); down D L + L
(head) + the generator's parameters + L (p^).

Axis legend: K cohort, B batch, D common dim, L classes, H hidden_dim, E noise_dim.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import comm
from fedjax_sim.checks import concrete
from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy, tree_weighted_mean)
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.head_training import valid_slots
from fedjax_sim.algorithms.registry import register

PyTree = Any
BN_EPS = 1e-5


class GenUpload(NamedTuple):
  head: dict  # {"kernel": float32 [D, L], "bias": float32 [L]}: the trained head
  counts: jax.Array  # float32 [L]: the client's training examples per class


class GenState(NamedTuple):
  head: dict  # the global head
  generator: dict  # G_w's params (:func:`init_generator`)
  counts: jax.Array  # float32 [C, L]: each client's last reported label counts (0: none yet)


def init_generator(rng: jax.Array, noise_dim: int, num_classes: int, hidden_dim: int,
                   dim: int) -> dict:
  """G_w's params: ``w1`` [E + L, H], ``scale``/``shift`` [H] (BN), ``w2`` [H, D], ``b2`` [D]."""
  k1, k2, k3 = jax.random.split(rng, 3)
  u = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0) / np.sqrt(
      fan_in)
  return {"w1": u(k1, (noise_dim + num_classes, hidden_dim), noise_dim + num_classes),
          "scale": jnp.ones((hidden_dim,), jnp.float32),
          "shift": jnp.zeros((hidden_dim,), jnp.float32),
          "w2": u(k2, (hidden_dim, dim), hidden_dim), "b2": u(k3, (dim,), hidden_dim)}


def generate(gen: dict, labels: jax.Array, eps: jax.Array, num_classes: int) -> jax.Array:
  """z = G_w(eps | y), float32 [B, D], from labels int32 [B] and noise eps float32 [B, E].

  BN uses the batch's mean and biased variance (training mode).
  """
  h = jnp.concatenate([eps, jax.nn.one_hot(labels, num_classes, dtype=eps.dtype)], -1) @ gen["w1"]
  mean, var = jnp.mean(h, 0), jnp.var(h, 0)
  h = (h - mean) * jax.lax.rsqrt(var + BN_EPS) * gen["scale"] + gen["shift"]
  return jax.nn.relu(h) @ gen["w2"] + gen["b2"]


def sample_labels_noise(rng: jax.Array, p_hat: jax.Array, batch: int,
                        noise_dim: int) -> tuple[jax.Array, jax.Array]:
  """(y^ int32 [B] ~ p^(y), eps float32 [B, E] ~ U[0, 1)); p^ all zeros draws uniformly."""
  k_y, k_e = jax.random.split(rng)
  p = jnp.where(jnp.sum(p_hat) > 0, p_hat, jnp.ones_like(p_hat))
  labels = jax.random.categorical(k_y, jnp.log(p), shape=(batch,))
  return labels, jax.random.uniform(k_e, (batch, noise_dim))


def diversity_loss(eps: jax.Array, z: jax.Array) -> jax.Array:
  """exp(-mean_{i,j} d2(eps_i, eps_j) d1(z_i, z_j)), d2 the mean squared and d1 the mean
  absolute difference (official ``DiversityLoss('l1')``). eps [B, E], z [B, D] -> float32 []."""
  d_eps = jnp.mean((eps[:, None] - eps[None]) ** 2, -1)
  d_z = jnp.mean(jnp.abs(z[:, None] - z[None]), -1)
  return jnp.exp(-jnp.mean(d_eps * d_z))


def generator_loss(gen: dict, heads: dict, head_weights: jax.Array, labels: jax.Array,
                   eps: jax.Array, *, num_classes: int, eta: float = 0.0) -> jax.Array:
  """J(w): CE of the weighted ensemble of the uploaded heads on generated features.

  Args:
    gen: G_w's params.
    heads: the uploaded heads stacked, {"kernel" [K, D, L], "bias" [K, L]}.
    head_weights: a_k float32 [K] (sum 1; 0 for padding slots).
    labels: y int32 [B].  eps: float32 [B, E].
    eta: weight of :func:`diversity_loss`.

  Returns:
    mean_b CE(sum_k a_k h_k(G_w(eps_b | y_b)), y_b) + eta L_div, float32 [].
  """
  z = generate(gen, labels, eps, num_classes)
  logits = jnp.einsum("k,bd,kdl->bl", head_weights, z, heads["kernel"]) + (
      head_weights @ heads["bias"])
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return ce + eta * diversity_loss(eps, z)


def client_regularizer(head: dict, gen: dict, labels: jax.Array, eps: jax.Array,
                       num_classes: int) -> jax.Array:
  """mean_b CE(h(G_w(eps_b | y^_b)), y^_b), float32 []; G_w's output is a constant (the
  gradient reaches the head only)."""
  z = jax.lax.stop_gradient(generate(gen, labels, eps, num_classes))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(rm_lib.apply_head(head, z),
                                                                  labels))


def train_generator(gen: dict, heads: dict, head_weights: jax.Array, p_hat: jax.Array,
                    rng: jax.Array, *, steps: int, batch: int, lr: float, noise_dim: int,
                    num_classes: int, eta: float = 0.0) -> tuple[dict, jax.Array]:
  """``steps`` Adam steps on :func:`generator_loss`, step s drawing (y, eps) with key
  ``fold_in(rng, s)`` (:func:`sample_labels_noise`). Returns (G_w, mean loss float32 [])."""
  opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)

  def step(s, carry):
    g, state, total = carry
    labels, eps = sample_labels_noise(jax.random.fold_in(rng, s), p_hat, batch, noise_dim)
    loss, grad = jax.value_and_grad(generator_loss)(g, heads, head_weights, labels, eps,
                                                    num_classes=num_classes, eta=eta)
    upd, state = opt.update(grad, state, g)
    return optax.apply_updates(g, upd), state, total + loss

  gen, _, total = jax.lax.fori_loop(0, steps, step, (gen, opt.init(gen), jnp.float32(0.0)))
  return gen, total / max(steps, 1)


def fedgen(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_lr: float,
           batch_size: int, epochs: int = 1, local_steps: int = 0, client_momentum: float = 0.0,
           lr_decay: float = 1.0, dim: int = 32, rm: str = "avg", noise_dim: int = 512,
           hidden_dim: int = 512, generator_lr: float = 0.005, generator_steps: int = 100,
           alpha: float = 1.0, eta: float = 0.0, client_ids=None) -> FederatedAlgorithm:
  """FedGen over model pools (see the module docstring).

  Args:
    archs: distinct MODEL_ZOO names; clients are assigned round-robin.
    spec: :class:`~fedjax_sim.algorithms.registry.DataSpec`.
    clients_per_round: K, split over pools proportionally to their sizes.
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay: local SGD;
      B is also the generated batch (clients and server, as HtFLlib).
    dim: D, the common representation dim (the generator's output).  rm: the RM kind.
    noise_dim: E (HtFLlib ``-nd`` 512).  hidden_dim: H (``-hd`` 512).
    generator_lr: Adam's lr (``-glr`` 0.005).
    generator_steps: Adam steps per round (HtFLlib ``-se``, "server_epochs", 100).
    alpha: weight of the client's generated-feature cross-entropy (HtFLlib: 1).
    eta: weight of the generator's diversity loss (HtFLlib: 0; official code: 1).
    client_ids: optional explicit pool assignment (default round-robin).

  Server metrics: ``generator_loss``, ``comm/upload_scalars``, ``comm/broadcast_scalars``.

  Raises:
    ValueError: repeated architectures, a negative alpha or eta, generator_steps < 1, or a
      nonpositive noise_dim, hidden_dim or generator_lr.
  """
  for name, v, ok in (("alpha", alpha, alpha >= 0 if concrete(alpha) else True),
                      ("eta", eta, eta >= 0 if concrete(eta) else True),
                      ("generator_lr", generator_lr,
                       generator_lr > 0 if concrete(generator_lr) else True),
                      ("generator_steps", generator_steps, generator_steps >= 1),
                      ("noise_dim", noise_dim, noise_dim >= 1),
                      ("hidden_dim", hidden_dim, hidden_dim >= 1)):
    if not ok:
      bound = ">= 0" if name in ("alpha", "eta") else "> 0"
      raise ValueError(f"{name}={v} must be {bound}; set --config.fedgen.{name}.")
  num_classes, num_clients = spec.num_classes, spec.num_clients

  def client_update(model, bcast, params, data, rng, info):
    head, gen, p_hat = bcast
    on = (jnp.sum(p_hat) > 0).astype(jnp.float32)  # a trained generator exists

    def loss(p, x, y, m, r):
      labels, eps = sample_labels_noise(r, p_hat, batch_size, noise_dim)
      reg = client_regularizer(p["head"], gen, labels, eps, num_classes)
      return masked_cross_entropy(model.apply(p, x), y, m) + alpha * on * reg

    opt = client_optimizer(client_lr, client_momentum, lr_decay, info.round)
    res = local_train(loss, {**params, "head": head}, opt, data, rng, epochs=epochs,
                      batch_size=batch_size, local_steps=local_steps)
    counts = jnp.sum(jax.nn.one_hot(data.y, num_classes) * data.mask[:, None], 0)
    return GenUpload(res.params["head"], counts), res.params, res.metrics

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim, rm=rm,
                                global_head=True, client_ids=client_ids)

  def init(rng):
    k_head, k_gen = jax.random.split(rng)
    return GenState(rm_lib.init_head(k_head, dim, num_classes),
                    init_generator(k_gen, noise_dim, num_classes, hidden_dim, dim),
                    jnp.zeros((num_clients, num_classes), jnp.float32))

  def p_hat_of(counts):
    total = jnp.sum(counts)
    return jnp.sum(counts, 0) / jnp.maximum(total, 1.0)

  def server_update(state, uploads, weights, infos, rng):
    up, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
    # The cohort's uploads in a table by client id [C, ...] (zeros for the rest): the server's
    # sums then run in one order whatever the cohort layout (Adam's 100 steps would amplify
    # the rounding differences of another summation order).
    slot = jnp.where(valid, jnp.concatenate([i.client_ids for i in infos]), num_clients)
    table = lambda v: jnp.zeros((num_clients, *v.shape[1:]), v.dtype).at[slot].set(
        v, mode="drop")
    w = table(jnp.concatenate(weights).astype(jnp.float32))
    heads = jax.tree.map(table, up.head)
    counts = jnp.where((table(valid.astype(jnp.float32)) > 0)[:, None], table(up.counts),
                       state.counts)
    p_hat = p_hat_of(counts)
    any_up = jnp.sum(w) > 0
    a = w / jnp.maximum(jnp.sum(w), 1e-12)
    gen, gen_loss = jax.lax.cond(
        any_up,
        lambda: train_generator(state.generator, heads, a, p_hat, rng, steps=generator_steps,
                                batch=batch_size, lr=generator_lr, noise_dim=noise_dim,
                                num_classes=num_classes, eta=eta),
        lambda: (state.generator, jnp.float32(0.0)))
    head = jax.lax.cond(any_up, lambda: tree_weighted_mean(heads, w), lambda: state.head)
    k = jnp.sum(valid).astype(jnp.float32)
    hs = rm_lib.head_scalars(dim, num_classes)
    return GenState(head, gen, counts), {
        "generator_loss": gen_loss,
        "comm/upload_scalars": k * (hs + num_classes),
        "comm/broadcast_scalars": k * (hs + comm.tree_scalars(gen) + num_classes)}

  return FederatedAlgorithm(
      name="fedgen", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None,
      broadcast=lambda s: (s.head, s.generator, p_hat_of(s.counts)), personalized=True,
      pools=pools)


@register("fedgen", fedgen, fixed=("client_ids",), pooled=True)
def _build(ctx, **knobs):
  """FedGen over the ``--config.archs`` pools; knobs ``--config.fedgen.<knob>``."""
  return fedgen(ctx.archs, ctx.spec, ctx.clients_per_round, **ctx.client, **knobs)
