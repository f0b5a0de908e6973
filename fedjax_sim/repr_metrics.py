"""Representation-quality metrics for federated self-supervised learning.

Used to evaluate FedAlignUniform, FedSimCLR and SSD (arXiv 2508.01251;
``docs/decisions.md#ssd``): the engine's classification evaluation does not
apply to an encoder without a classifier.

* Alignment and uniformity (Wang & Isola, ICML 2020, arXiv 2005.10242,
  Eqs. 4-5): L_align = E ||f(x) - f(x+)||^alpha (alpha = 2) and L_uniform =
  log E_{x != y} exp(-t ||f(x) - f(y)||^2) (t = 2), on L2-normalized features.
  LOWER L_uniform is MORE uniform; the SSD paper reports -L_uniform.
* Local uniformity: L_uniform of each client's own training examples under the
  global model, averaged over clients with >= 2 examples. Global uniformity:
  L_uniform of the union of all clients' training examples (SSD's "global
  uniformity"). Test uniformity: on the global test set.
* k-NN accuracy: InstDisc's weighted vote (Wu et al. 2018, arXiv 1805.01978;
  the SSD code's ``knn_predict``): cosine similarity to the bank of all
  clients' training features, top k, weights exp(sim / T). SSD's CIFAR
  setting is k = 200, T = 0.1 for a 50,000-example bank; on digits' 1,347-
  example bank we default to k = 20. [ours]
* Linear probe: multinomial logistic regression on the frozen encoder
  features (standardized with the training mean and std), full-batch Adam
  (lr 0.01, 500 steps, L2 1e-4), trained on all clients' training examples
  with their labels and tested on the global test set. [ours: the SSD code's
  linear_eval trains a linear layer with SGD on augmented images; we use
  clean images]

Labels are read only here, never in training.

Axis legend: C clients, N examples per client, M pooled examples, Q queries,
D embedding, L classes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.client_data import ClientData
from fedjax_sim.errors import ConfigError
from fedjax_sim.metrics import l2_normalize, representation_disparity


def alignment(z1: jax.Array, z2: jax.Array, mask: Optional[jax.Array] = None,
              alpha: float = 2.0) -> jax.Array:
  """L_align = mean_i ||z1_i - z2_i||^alpha over real rows.

  Args: z1, z2 float32 [B, D] (already normalized); mask bool [B] or None.
  Returns: float32 scalar (0 when no row is real).
  """
  d2 = jnp.sum(jnp.square(z1 - z2), axis=-1)
  d = d2 if alpha == 2.0 else jnp.power(d2, alpha / 2.0)
  if mask is None:
    return jnp.mean(d)
  return jnp.sum(jnp.where(mask, d, 0.0)) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def uniformity(z: jax.Array, mask: Optional[jax.Array] = None, t: float = 2.0) -> jax.Array:
  """L_uniform = log mean_{i != j} exp(-t ||z_i - z_j||^2) over real rows.

  Same value as the official code's ``pdist(z).pow(2).mul(-t).exp().mean().log()``
  (pairs i < j; the mean is the same over ordered pairs).

  Args: z float32 [B, D] (already normalized); mask bool [B] or None; t > 0.
  Returns: float32 scalar (0 when fewer than two rows are real).
  """
  n = z.shape[0]
  sq = jnp.sum(z * z, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
  pair = ~jnp.eye(n, dtype=bool)
  if mask is not None:
    pair = pair & mask[:, None] & mask[None, :]
  # -1e30, not -inf: keeps logsumexp and its gradient finite with no valid pair.
  lse = jax.nn.logsumexp(jnp.where(pair, -t * d2, -1e30))
  npairs = jnp.sum(pair.astype(jnp.float32))
  return jnp.where(npairs > 0, lse - jnp.log(jnp.maximum(npairs, 1.0)), 0.0)


def local_uniformity(z: jax.Array, mask: jax.Array, t: float = 2.0) -> tuple[jax.Array, jax.Array]:
  """Per-client L_uniform.

  Args: z float32 [C, N, D] (normalized); mask bool [C, N].
  Returns: (values float32 [C], has_pairs bool [C]: the client has >= 2 examples).
  """
  vals = jax.vmap(lambda a, m: uniformity(a, m, t))(z, mask)
  return vals, jnp.sum(mask, axis=1) >= 2


def knn_accuracy(bank: jax.Array, bank_y: jax.Array, query: jax.Array, query_y: jax.Array, *,
                 num_classes: int, k: int = 20, temperature: float = 0.1,
                 bank_mask: Optional[jax.Array] = None) -> jax.Array:
  """Weighted k-NN accuracy (InstDisc vote) with cosine similarity.

  Args:
    bank: float32 [M, D] features (normalized inside); bank_y int32 [M].
    query: float32 [Q, D] (normalized inside); query_y int32 [Q].
    num_classes: L.  k: neighbours (capped at M).  temperature: T.
    bank_mask: bool [M] or None; False rows are never neighbours.
  Returns: float32 scalar accuracy.
  """
  sim = l2_normalize(query) @ l2_normalize(bank).T  # [Q, M]
  if bank_mask is not None:
    sim = jnp.where(bank_mask[None, :], sim, -1e30)
  top, idx = jax.lax.top_k(sim, min(k, bank.shape[0]))
  w = jnp.where(top > -2.0, jnp.exp(top / temperature), 0.0)
  scores = jnp.sum(jax.nn.one_hot(bank_y[idx], num_classes) * w[..., None], axis=1)
  return jnp.mean((jnp.argmax(scores, -1) == query_y).astype(jnp.float32))


def linear_probe_accuracy(train_h: jax.Array, train_y: jax.Array, test_h: jax.Array,
                          test_y: jax.Array, *, num_classes: int, steps: int = 500,
                          lr: float = 0.01, l2: float = 1e-4,
                          train_mask: Optional[jax.Array] = None) -> jax.Array:
  """Accuracy of a multinomial logistic regression on frozen features.

  Args:
    train_h: float32 [M, D]; train_y int32 [M]; test_h float32 [Q, D]; test_y int32 [Q].
    num_classes: L.  steps, lr: full-batch Adam.  l2: weight penalty on W.
    train_mask: bool [M] or None; False rows are ignored.
  Returns: float32 scalar test accuracy.
  """
  wt = (jnp.ones(train_h.shape[:1]) if train_mask is None else train_mask.astype(jnp.float32))
  wt = wt / jnp.sum(wt)
  mu = wt @ train_h
  sd = jnp.sqrt(wt @ jnp.square(train_h - mu)) + 1e-6
  xs, xt = (train_h - mu) / sd, (test_h - mu) / sd
  params = (jnp.zeros((train_h.shape[1], num_classes)), jnp.zeros((num_classes,)))
  opt = optax.adam(lr)

  def loss(p):
    w, b = p
    ce = optax.softmax_cross_entropy_with_integer_labels(xs @ w + b, train_y)
    return jnp.sum(wt * ce) + l2 * jnp.sum(w * w)

  def step(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  ((w, b), _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return jnp.mean((jnp.argmax(xt @ w + b, -1) == test_y).astype(jnp.float32))


def _features(features_fn, params, x, batch_size):
  m = x.shape[0]
  nb = -(-m // batch_size)
  xp = jnp.pad(x, [(0, nb * batch_size - m)] + [(0, 0)] * (x.ndim - 1))
  h, z = jax.lax.map(lambda b: features_fn(params, b), xp.reshape(nb, batch_size, *x.shape[1:]))
  return h.reshape(nb * batch_size, -1)[:m], z.reshape(nb * batch_size, -1)[:m]


@functools.partial(jax.jit, static_argnames=("features_fn", "augment_fn", "num_classes", "t",
                                             "knn_k", "knn_t", "probe_steps", "batch_size"))
def _evaluate_arrays(params, key, flat_x, mask, idx, pool_mask, train_y, test_x, test_y, *,
                     features_fn, augment_fn, num_classes, t, knn_k, knn_t, probe_steps,
                     batch_size):
  """Jitted body of :func:`make_repr_eval` (module level: compiled once per shape/setting)."""
  c, n = mask.shape
  feats = lambda p, x: _features(features_fn, p, x, batch_size)
  h, z = feats(params, flat_x)
  th, tz = feats(params, test_x)
  out = {}
  for name, f, tf in (("enc", h, th), ("proj", z, tz)):
    fn = l2_normalize(f)
    out[f"uniformity_global_{name}"] = uniformity(fn[idx], pool_mask, t)
    vals, has = local_uniformity(fn.reshape(c, n, -1), mask, t)
    out[f"uniformity_local_{name}"] = jnp.sum(jnp.where(has, vals, 0.0)) / jnp.maximum(
        jnp.sum(has), 1)
    out[f"uniformity_test_{name}"] = uniformity(l2_normalize(tf), None, t)
  if augment_fn is not None:
    k1, k2 = jax.random.split(key)
    h1, z1 = feats(params, augment_fn(k1, test_x))
    h2, z2 = feats(params, augment_fn(k2, test_x))
    out["alignment_test_enc"] = alignment(l2_normalize(h1), l2_normalize(h2))
    out["alignment_test_proj"] = alignment(l2_normalize(z1), l2_normalize(z2))
  out["knn_accuracy"] = knn_accuracy(h[idx], train_y, th, test_y, num_classes=num_classes,
                                     k=knn_k, temperature=knn_t, bank_mask=pool_mask)
  out["linear_probe_accuracy"] = linear_probe_accuracy(
      h[idx], train_y, th, test_y, num_classes=num_classes, steps=probe_steps,
      train_mask=pool_mask)
  return out


@functools.partial(jax.jit, static_argnames=("features_fn", "client_chunk"))
def _disparity_arrays(params, x, mask, *, features_fn, client_chunk):
  """Jitted body of ``make_repr_eval(..., metrics=("disparity",))``: x [C, N, ...], mask [C, N]."""
  def client_mean(params, x, mask):
    _, z = features_fn(params, x)
    m = mask.astype(z.dtype)
    return jnp.sum(z * m[:, None], 0) / jnp.maximum(jnp.sum(m), 1.0)

  chunk = min(client_chunk, x.shape[0])
  zs = jax.lax.map(lambda a: client_mean(params, *a), (x, mask), batch_size=chunk)
  d, _ = representation_disparity(zs, jnp.any(mask, axis=1))
  return {"repr_disparity": d, "client_embedding": l2_normalize(zs)}


FeatureFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
METRIC_GROUPS = ("quality", "disparity")


def make_repr_eval(features_fn: FeatureFn, train: ClientData,
                   test_x: Optional[jax.Array] = None, test_y: Optional[jax.Array] = None, *,
                   num_classes: Optional[int] = None, metrics: Sequence[str] = ("quality",),
                   augment_fn: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None,
                   t: float = 2.0, knn_k: int = 20, knn_t: float = 0.1, probe_steps: int = 500,
                   batch_size: int = 1024, pool_size: Optional[int] = None,
                   client_chunk: int = 32):
  """Builds ``evaluate(params, key=None) -> dict`` for a global model's representations.

  The one representation evaluation: SSD / FedAlignUniform / FedSimCLR
  (``metrics=("quality",)``, the default) and CoRe-Fed's report
  (``metrics=("disparity",)``). Each group is its own jitted program, so a
  group's values do not depend on which other groups are asked for.

  Args:
    features_fn: ``(params, x [B, ...]) -> (h [B, D], z [B, D'])``. "quality"
      probes and k-NNs the raw encoder features h and measures uniformity and
      alignment of both; "disparity" uses only z (CoRe-Fed: ``embed_fn``,
      ``(params, x) -> (logits [B, L], z [B, D'])``).
    train: all clients' training data, ClientData [C, N, ...].
    test_x: float32 [Q, ...]; test_y int32 [Q]: the global test set ("quality" only).
    num_classes: L ("quality" only).
    metrics: the groups to compute, any of ``METRIC_GROUPS``:
      "quality": ``uniformity_{global,local,test}_{enc,proj}`` (L_uniform,
        lower = more uniform), ``alignment_test_{enc,proj}`` (when augment_fn
        is given), ``knn_accuracy``, ``linear_probe_accuracy`` (floats).
      "disparity": ``repr_disparity`` (float; mean_i (1 - cos(z_i, z_g)), z_i
        = normalize(mean of z over client i's real rows), z_g = normalize(mean
        of the z_i), clients without rows excluded; see
        :func:`fedjax_sim.metrics.representation_disparity`) and
        ``client_embedding`` (float32 np.ndarray [C, D'], the z_i).
    augment_fn: ``(key, x [B, ...]) -> x'`` for test-set alignment (two views);
      None skips alignment.
    t: uniformity temperature.  knn_k, knn_t: k-NN.  probe_steps: probe's Adam steps.
    batch_size: "quality"'s feature-extraction batch.
    pool_size: pad the pooled real training rows (M) to this static size, so
      datasets of different M (partitions of different seeds) share one
      compiled evaluation; default M.
    client_chunk: "disparity" embeds this many clients' N rows at a time.

  Returns:
    ``evaluate(params, key=None)``: a dict with the groups' keys. ``key`` (a
    PRNG key) draws the alignment views; it is required when augment_fn is given.

  Raises:
    ConfigError: an unknown group, or "quality" without test_x, test_y and num_classes.
    ValueError: pool_size below the number of real training rows.
  """
  groups = tuple(metrics)
  unknown = [g for g in groups if g not in METRIC_GROUPS]
  if unknown or not groups:
    raise ConfigError(f"make_repr_eval metrics={groups}: choose groups from {METRIC_GROUPS}.")
  quality = "quality" in groups
  if quality and (test_x is None or test_y is None or num_classes is None):
    raise ConfigError("make_repr_eval metrics=('quality',) needs test_x, test_y and "
                      "num_classes; pass them or use metrics=('disparity',).")
  to_host = lambda out: {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
                         for k, v in jax.device_get(out).items()}

  def disparity(params):
    if "disparity" not in groups:
      return {}
    return _disparity_arrays(params, train.x, train.mask, features_fn=features_fn,
                             client_chunk=client_chunk)

  if not quality:
    return lambda params, key=None: to_host(disparity(params))

  c, n = train.y.shape
  flat_x = train.x.reshape(c * n, *train.x.shape[2:])
  mask = np.asarray(train.mask)
  real = np.flatnonzero(mask.reshape(-1)).astype(np.int32)  # [M] real rows
  pool = pool_size or real.size
  if pool < real.size:
    raise ValueError(f"pool_size={pool} < {real.size} real training examples.")
  idx = jnp.asarray(np.pad(real, (0, pool - real.size)))
  pool_mask = jnp.asarray(np.arange(pool) < real.size)
  train_y = jnp.asarray(train.y).reshape(-1)[idx]
  mask = jnp.asarray(mask)

  static = dict(features_fn=features_fn, augment_fn=augment_fn, num_classes=num_classes, t=t,
                knn_k=knn_k, knn_t=knn_t, probe_steps=probe_steps, batch_size=batch_size)

  def evaluate(params, key=None):
    if key is None:
      if augment_fn is not None:
        raise ConfigError("make_repr_eval with augment_fn: pass evaluate(params, key) (the "
                          "alignment views are drawn with it).")
      key = jax.random.PRNGKey(0)  # unused without augment_fn
    out = _evaluate_arrays(params, key, flat_x, mask, idx, pool_mask, train_y, test_x, test_y,
                           **static)
    return to_host({**out, **disparity(params)})

  return evaluate
